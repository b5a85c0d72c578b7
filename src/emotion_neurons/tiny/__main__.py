"""Build the embedded tiny setup: `python -m emotion_neurons.tiny --out .tiny`.

Synthesises the ESD-layout corpus (10 voices x 20 sentences x 5 emotions), trains the emotion judge (a tiny
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

SPEAKERS = [f"00{i}" for i in range(11, 21)]
IDENT = SPEAKERS[:5]
UNSEEN = SPEAKERS[5:]
TRAINING_SEEDS = (0, 1, 2)


def build_all(
    out: Path, force: bool = False, n_sentences: int = 20, seeds: tuple[int, ...] = TRAINING_SEEDS
) -> dict[str, Path]:
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
    stamp = {"recipe_version": corpus.RECIPE_VERSION, "speakers": SPEAKERS, "n_sentences": n_sentences}
    esd = out / "esd"
    if (esd / "corpus.json").is_file() and json.loads((esd / "corpus.json").read_text()) != stamp:
        force_corpus = True  # another recipe: rebuild
    else:
        force_corpus = not (esd / "corpus.json").is_file()
    if force or force_corpus:
        if esd.exists():
            shutil.rmtree(esd)
        t0 = time.perf_counter()
        corpus.build(esd, speakers=SPEAKERS, n_sentences=n_sentences)
        (esd / "corpus.json").write_text(json.dumps(stamp) + "\n")
        log.info("built %s in %.1f s", esd, time.perf_counter() - t0)
    made["esd"] = esd

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

    for seed in seeds:
        target = out / f"qwen-seed{seed}"
        info = miniature.build(target, esd, miniature.Recipe(seed=seed), force=force)
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
    ap.add_argument("--n-sentences", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(TRAINING_SEEDS), help="miniature training seeds")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    build_all(Path(a.out), a.force, a.n_sentences, tuple(a.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
