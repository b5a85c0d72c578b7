"""Build the embedded tiny setup: `python -m emotion_neurons.tiny --out .tiny`.

Synthesises the ESD-layout corpus (12 voices x 30 sentences x 5 emotions) and the transfer corpus `esd_b`
(10 other voices x 20 other sentences x 5 emotions, other acting), trains the emotion judge (a tiny
emotion2vec) and the miniature Qwen2.5-Omni for each training seed (docs/miniature.md), builds the random tiny
models used by the adapter tests, and links the packaged faster-whisper tiny.en. Everything is deterministic and
offline; trained parts are cached by a hash of their recipe, other existing parts are kept (use --force).
Prints the held-out accuracies of the judge and of each miniature.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("emotion_neurons.tiny")

SPEAKERS = [f"00{i}" for i in range(11, 23)]
IDENT = SPEAKERS[:7]
UNSEEN = SPEAKERS[7:]
N_SENTENCES = 30
# the transfer corpus (`.tiny/esd_b`, style b): other voices, sentences and acting; never trained on
SPEAKERS_B = [f"00{i}" for i in range(31, 41)]
N_SENTENCES_B = 20
TRAINING_SEEDS = (0, 1, 2)


def build_all(
    out: Path,
    force: bool = False,
    n_sentences: int = N_SENTENCES,
    seeds: tuple[int, ...] = TRAINING_SEEDS,
    jobs: int | None = None,
) -> dict[str, Path]:
    """Build (or keep, when cached) every part of the tiny setup; `jobs` miniature trainings at once (default:
    all of them; each uses one torch thread, so the result does not depend on `jobs`)."""
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}

    def step(name: str, fn) -> None:
        target = out / name
        if target.exists() and not force:
            log.info("%s exists, kept", target)
        else:
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.exists():
                shutil.rmtree(target)
            t0 = time.perf_counter()
            fn(target)
            log.info("built %s in %.1f s", target, time.perf_counter() - t0)
        made[name] = target

    from . import audio_flamingo3, corpus, emotion2vec, miniature, qwen_omni

    step("qwen2_5_omni", qwen_omni.build)
    step("audio_flamingo3", audio_flamingo3.build)
    def build_corpus(name: str, speakers: list[str], n: int, style: str) -> Path:
        stamp = {"recipe_version": corpus.RECIPE_VERSION, "speakers": speakers, "n_sentences": n, "style": style}
        root = out / name
        stamp_path = root / "corpus.json"
        current = stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp
        if force or not current:  # missing, or another recipe: rebuild
            tmp = out / f".{name}.tmp"
            for p in (tmp, root):
                if p.exists():
                    shutil.rmtree(p)
            t0 = time.perf_counter()
            corpus.build(tmp, speakers=speakers, n_sentences=n, style=style)
            (tmp / "corpus.json").write_text(json.dumps(stamp) + "\n")
            tmp.rename(root)
            log.info("built %s in %.1f s", root, time.perf_counter() - t0)
        made[name] = root
        return root

    esd = build_corpus("esd", SPEAKERS, n_sentences, "a")
    build_corpus("esd_b", SPEAKERS_B, N_SENTENCES_B, "b")

    # the miniatures train in worker processes (one torch thread each, so the weights do not depend on how many
    # run at once) while this process trains the judge
    todo = [k for k in seeds if force or not miniature.is_cached(out / f"qwen-seed{k}", esd, miniature.Recipe(seed=k))]
    pool = None
    futures = {}
    if todo:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        n_jobs = max(1, min(jobs or len(todo), len(todo)))
        log.info("training miniatures of seeds %s in %d processes", todo, n_jobs)
        pool = ProcessPoolExecutor(max_workers=n_jobs, mp_context=multiprocessing.get_context("spawn"))
        futures = {k: pool.submit(miniature.build_seed, out / f"qwen-seed{k}", esd, k, force) for k in todo}

    # the judge: cached by the corpus content and the training code
    judge = out / "emotion2vec"
    key = hashlib.sha256(
        (miniature.corpus_digest(esd) + inspect.getsource(emotion2vec.train) + ",".join(IDENT)).encode()
    ).hexdigest()[:16]
    info_path = judge / "tiny_info.json"
    cached = info_path.is_file() and json.loads(info_path.read_text()).get("recipe_hash") == key
    if force or not cached:
        if judge.is_symlink() or judge.is_file():
            judge.unlink()
        elif judge.exists():
            shutil.rmtree(judge)
        info = emotion2vec.train(judge, esd, IDENT, UNSEEN)
        info["recipe_hash"] = key
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    info = json.loads(info_path.read_text())
    print(
        f"emotion judge {judge}: held-out (unseen voices) accuracy {info['held_out_accuracy']:.3f} "
        f"(train {info['train_accuracy']:.3f}, chance {info['chance']:.2f})",
        flush=True,
    )
    made["emotion2vec"] = judge

    try:
        for fut in futures.values():
            fut.result()  # re-raises a worker's error
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for seed in seeds:
        target = out / f"qwen-seed{seed}"
        info = miniature.build(target, esd, miniature.Recipe(seed=seed))  # cached now: reads miniature.json
        print(f"miniature {target}: held-out UAR {info['held_out_uar']:.3f} (chance {info['chance']:.2f})", flush=True)
        made[target.name] = target

    def link_whisper(p: Path) -> None:
        from ..judges import whisper_tiny_path

        p.symlink_to(Path(whisper_tiny_path()).resolve(), target_is_directory=True)

    step("whisper-tiny.en", link_whisper)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=".tiny")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--n-sentences", type=int, default=N_SENTENCES)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(TRAINING_SEEDS), help="miniature training seeds")
    ap.add_argument("--jobs", type=int, default=None, help="miniature trainings at once (default: all seeds)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    build_all(Path(a.out), a.force, a.n_sentences, tuple(a.seeds), a.jobs)
    print(f"tiny setup {a.out}: built in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
