"""Stage 1 (generate with capture) and the generation half of stage 4 (generate under an intervention).

One engine (`engine.Engine`: batches in, outputs and statistics out) serves both; `run` is the stage's file
handling around it: load the audio, write the outputs table, the wavs and (with capture) a zarr store per shard. All outputs are
atomic; a crashed shard leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from .. import SPANS, __version__
from ..config import code_version, load_params
from ..io import AudioError, atomic_dir, load_audio, read_jsonl, write_table, write_wav
from ..models import available
from ..types import GenerationSettings, Instance

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("output_text", "output_wav", "output_sr", "n_generated", "seconds", "option_probs")


def _rank(seed: int, key: str) -> str:
    """Seeded, order-free rank of a key (sha256), so a sample never depends on manifest or sort order."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def source_key(inst: Instance) -> str:
    """The source utterance of an instance: the EVC targets of one utterance share it."""
    return inst.id.rsplit("->", 1)[0] if inst.task == "evc" else inst.id


def stratified_cap(instances: list[Instance], cap: int, seed: int = 0) -> tuple[list[Instance], pd.DataFrame]:
    """At most `cap` instances, balanced over emotions (the EVC target / SER label) and, within each emotion,
    over speakers, as far as the counts allow; which instances of a stratum is drawn from `seed`.

    Why: the first ids in sort order are one speaker's clips of one emotion (METHOD.md section 5). The cap is
    split equally over emotions, then over the speakers of each emotion (leftovers go to the speakers with the
    fewest so far over all emotions, then by a seeded order); inside a stratum, instances are ranked by a
    seeded hash of their source utterance, so the EVC targets of one speaker get the same sources where the
    counts allow (paired comparisons across targets). Returns the kept instances in id order and a table of
    available and kept counts per (emotion, speaker).
    """
    strata: dict[tuple[str, str], list[Instance]] = {}
    for inst in instances:
        strata.setdefault((inst.group, inst.speaker), []).append(inst)
    if cap >= len(instances):
        kept_n = {k: len(v) for k, v in strata.items()}
        return sorted(instances, key=lambda i: i.id), _strata_table(strata, kept_n)
    for items in strata.values():
        items.sort(key=lambda i: (_rank(seed, source_key(i)), i.id))
    emotions = sorted({e for e, _ in strata}, key=lambda e: _rank(seed, f"emotion:{e}"))
    size_e = {e: sum(len(v) for (ee, _), v in strata.items() if ee == e) for e in emotions}
    alloc_e = _fill(size_e, cap, lambda e, a: (a[e], emotions.index(e)))
    spk_total: dict[str, int] = {}
    kept_n: dict[tuple[str, str], int] = {}
    for e in emotions:
        sizes = {s: len(v) for (ee, s), v in strata.items() if ee == e}
        order = sorted(sizes, key=lambda s: _rank(seed, f"speaker:{s}"))

        def prio(s, a, _o=order):
            return (a[s], spk_total.get(s, 0), _o.index(s))

        alloc = _fill(sizes, alloc_e[e], prio, on_pick=lambda s: spk_total.__setitem__(s, spk_total.get(s, 0) + 1))
        kept_n.update({(e, s): n for s, n in alloc.items()})
    kept = sorted((i for k, items in strata.items() for i in items[: kept_n[k]]), key=lambda i: i.id)
    return kept, _strata_table(strata, kept_n)


def _strata_table(strata: dict[tuple[str, str], list[Instance]], kept_n: dict[tuple[str, str], int]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"emotion": e, "speaker": s, "available": len(v), "kept": kept_n[(e, s)]} for (e, s), v in sorted(strata.items())],
        columns=["emotion", "speaker", "available", "kept"],
    )


def _fill(sizes: dict[str, int], total: int, prio, on_pick=None) -> dict[str, int]:
    """Hand out `total` units one at a time to the open key with the smallest `prio(key, alloc)` (water-filling)."""
    alloc = dict.fromkeys(sizes, 0)
    for _ in range(min(total, sum(sizes.values()))):
        k = min((k for k in sizes if alloc[k] < sizes[k]), key=lambda k: prio(k, alloc))
        alloc[k] += 1
        if on_pick is not None:
            on_pick(k)
    return alloc


def load_shard(
    manifest: str | Path, split: str, shard: int, n_shards: int, limit: int | None = None, seed: int = 0
) -> tuple[list[Instance], pd.DataFrame]:
    """The shard's instances of `split` in id order; with `limit`, a stratified sample (`stratified_cap`).

    Also returns the per-(emotion, speaker) table of available and kept counts, logged and written beside
    the stage's outputs so every run says what it kept.
    """
    from .prepare import shard_of

    rows = [Instance.from_dict(d) for d in read_jsonl(manifest)]
    inst = sorted((i for i in rows if i.split == split and shard_of(i.id, n_shards) == shard), key=lambda i: i.id)
    kept, table = stratified_cap(inst, int(limit) if limit else len(inst), seed)
    if limit:
        log.info(
            "cap %d per shard (seed %d): kept %d of %d %s instances; kept per (emotion, speaker): %s",
            limit, seed, len(kept), len(inst), split,
            ", ".join(f"{r.emotion}/{r.speaker}={r.kept}/{r.available}" for r in table.itertuples()),
        )
    return kept, table


def wav_name(instance_id: str) -> str:
    """Output wav file name of an instance: readable, visible and unique.

    The stem keeps the id's letters, digits, '_', '-' and '.' (others become '_', leading dots too, so no name
    is hidden) and ends with 10 hex digits of the id's SHA-1, so `a/b` and `a_b` never share a file.
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", instance_id.replace("->", "-"))[:80]
    stem = re.sub(r"^\.+", lambda m: "_" * len(m.group()), stem)
    return f"{stem}-{hashlib.sha1(instance_id.encode()).hexdigest()[:10]}.wav"


def settings_from(task: str, tcfg: dict[str, Any], model_cfg: dict[str, Any]) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=int(tcfg["max_new_tokens"]),
        want_audio=task == "evc",
        speaker=model_cfg.get("speaker") or "",
        seed=int(tcfg.get("seed", 0)),
        extra=dict(tcfg.get("generation_extra") or {}),
    )


def load_audios(
    adapter, instances: list[Instance], on_bad_audio: str = "skip"
) -> tuple[list[Instance], dict[str, np.ndarray], list[dict[str, Any]]]:
    """Read each instance's audio once at the adapter's rate: the usable instances, audio by path, and a
    `bad_audio` row per skipped instance (`on_bad_audio: error` raises instead)."""
    audios: dict[str, np.ndarray] = {}
    good: list[Instance] = []
    bad: list[dict[str, Any]] = []
    for inst in instances:
        try:
            if inst.wav not in audios:
                audios[inst.wav] = load_audio(
                    inst.wav, adapter.input_sample_rate, max_seconds=getattr(adapter, "max_audio_seconds", None)
                )
            good.append(inst)
        except AudioError as e:
            if on_bad_audio == "error":
                raise
            log.warning("skipping %s: %s", inst.id, e)
            bad.append({**inst.to_dict(), "status": f"bad_audio: {e}"})
    return good, audios, bad


def run(
    adapter,
    instances: list[Instance],
    settings: GenerationSettings,
    *,
    out_table: str | Path,
    wav_dir: str | Path | None,
    batch_size: int = 1,
    component: str = "thinker",
    site: str = "gate",
    stats_out: str | Path | None = None,
    sum_squares: bool = False,
    act_sums: str = "float16",
    intervention=None,
    mask_fn=None,
    on_bad_audio: str = "skip",
    store_attrs: dict[str, Any] | None = None,
    option_scores: bool = False,
) -> pd.DataFrame:
    """Generate for `instances`; capture statistics into `stats_out` and/or edit with `intervention`.

    The stage's file handling around `engine.Engine`: audio loading and the bad-audio policy, the statistics
    store, the wavs and the outputs table. `mask_fn(instances) -> bool tensor [B, L, N]` (or `(masks,
    values)`) gives each row its mask when an intervention is set; `option_scores` adds a column
    `option_scores` (JSON list: log-probability of each option's number at the first generated position).
    """
    from ..engine import Engine
    from ..stats import InstanceStatsWriter

    engine = Engine(adapter, settings, component=component, site=site, batch_size=batch_size)
    good, audios, rows = load_audios(adapter, instances, on_bad_audio)
    if rows:
        log.warning("%d of %d instances skipped for bad audio (status bad_audio in %s)", len(rows), len(instances),
                    Path(out_table).name)

    writer = None
    if stats_out is not None:
        n_neurons = adapter.n_neurons(component)
        attrs = {
            "model_version": __version__,
            "code_version": code_version("generate", adapter.name if adapter.name in available() else None),
            "component": component,
            "hook_site": site,
            "device_map": adapter.device_map(),
            **(store_attrs or {}),
        }
        writer = InstanceStatsWriter(
            stats_out, [i.id for i in good], len(engine.sites), n_neurons, attrs, sum_squares, act_sums
        )

    wav_dir = Path(wav_dir) if wav_dir else None
    try:
        batches = engine.run(
            good, audios, intervention=intervention, mask_fn=mask_fn, record=writer is not None,
            sum_squares=sum_squares, option_scores=option_scores,
        )
        with contextlib.closing(batches), tqdm(
            total=len(good), desc="generate", unit="inst", file=sys.stderr, mininterval=5
        ) as bar:
            for res in batches:
                if writer is not None:
                    writer.write([i.id for i in res.instances], res.stats)
                bar.update(len(res.instances))
                for b, (inst, out) in enumerate(zip(res.instances, res.outputs, strict=True)):
                    wav_path = ""
                    if out.wav is not None and wav_dir is not None:
                        target = wav_dir / wav_name(inst.id)
                        write_wav(target, out.wav, out.sample_rate)
                        # relative to the table's folder, so the shard folder can be renamed into place
                        wav_path = str(target.relative_to(Path(out_table).parent))
                    row = {
                        **inst.to_dict(),
                        "options": "|".join(inst.options),
                        "status": "ok",
                        "output_text": out.text,
                        "output_wav": wav_path,
                        "output_sr": out.sample_rate,
                        "n_generated": out.n_generated,
                        "seconds": round(res.seconds, 4),
                        # SER: first-step probability per option (JSON), "" when not recorded
                        "option_probs": json.dumps(out.option_probs, sort_keys=True) if out.option_probs else "",
                    }
                    if res.option_scores is not None:
                        sc = res.option_scores[b, : len(inst.options)]
                        row["option_scores"] = json.dumps([round(float(x), 6) for x in sc])
                    rows.append(row)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None and not writer.final.exists():
            with contextlib.suppress(Exception):
                writer.abort()
        raise
    columns = [*Instance.__dataclass_fields__, "status", *OUTPUT_COLUMNS, *(["option_scores"] if option_scores else [])]
    df = pd.DataFrame(rows, columns=columns if not rows else None)
    if "options" in df:
        df["options"] = df["options"].map(lambda o: "|".join(o) if isinstance(o, list) else o)
    write_table(out_table, df)
    return df


def load_adapter(model_cfg: dict[str, Any]):
    from ..models import get_adapter

    if model_cfg.get("deterministic", True):
        import torch

        # cuDNN's attention kernel made full-size Qwen2.5-Omni greedy decoding differ from run to run on an
        # H100 (bench/RESULTS-gpu-fullsize.md); without it, baseline and alpha-0 runs are bit-identical
        torch.backends.cuda.enable_cudnn_sdp(False)
    adapter = get_adapter(model_cfg["adapter"])
    adapter.load(model_cfg["id"], model_cfg.get("revision"), model_cfg.get("device", "auto"), model_cfg.get("dtype", "auto"))
    cache = model_cfg.get("cache_implementation", "dynamic")
    compile_mode = model_cfg.get("compile", "off")
    if cache != "dynamic" or compile_mode != "off":
        set_decoding = getattr(adapter, "set_decoding", None)
        if set_decoding is None:
            raise ValueError(
                f"model.cache_implementation={cache!r} / model.compile={compile_mode!r}: adapter "
                f"{model_cfg['adapter']!r} has no fast decoding path; use dynamic / off"
            )
        set_decoding(cache, compile_mode, static_cache_bucket=int(model_cfg.get("static_cache_bucket", 256)))
    t2w_batch = int(model_cfg.get("token2wav_batch_size", 1))
    talker_compile = model_cfg.get("talker_compile", "off")
    if t2w_batch != 1 or talker_compile != "off":
        set_speech = getattr(adapter, "set_speech", None)
        if set_speech is None:
            raise ValueError(
                f"model.token2wav_batch_size={t2w_batch} / model.talker_compile={talker_compile!r}: adapter "
                f"{model_cfg['adapter']!r} has no speech fast path; use 1 / off"
            )
        set_speech(t2w_batch, talker_compile)
    return adapter


def batch_size_of(p: dict[str, Any], override: int | None) -> int:
    """The batch size to run: `model.batch_size` of the params, which is part of the stage-1 key and of the
    evaluation params (bf16 GPU outputs depend on it). A different `--batch-size` still runs, with a warning,
    and is recorded in the store's attributes."""
    keyed = int(p["model"].get("batch_size", 1))
    if override and int(override) != keyed:
        log.warning("--batch-size %d differs from model.batch_size %d, which the outputs are keyed on", override, keyed)
        return int(override)
    return keyed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stage 1: generate identification outputs and record neuron statistics")
    ap.add_argument("--params", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--n-shards", type=int, required=True)
    ap.add_argument("--out", required=True, help="shard directory (outputs.tsv, stats.zarr, wavs/)")
    ap.add_argument("--batch-size", type=int, default=None, help="overrides model.batch_size (warns: the outputs are keyed on model.batch_size)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    task = p["task"]
    cap = p["task_cfg"].get("max_instances_per_shard")
    sample_seed = int(p["task_cfg"].get("sample_seed", 0))
    instances, strata = load_shard(a.manifest, "ident", a.shard, a.n_shards, cap, sample_seed)
    log.info("shard %d/%d: %d identification instances", a.shard, a.n_shards, len(instances))
    batch_size = batch_size_of(p, a.batch_size)
    adapter = load_adapter(p["model"])
    settings = settings_from(task, p["task_cfg"], p["model"])
    with atomic_dir(a.out) as tmp:
        write_table(tmp / "strata.tsv", strata)
        run(
            adapter,
            instances,
            settings,
            out_table=tmp / "outputs.tsv",
            wav_dir=tmp / "wavs" if task == "evc" else None,
            batch_size=batch_size,
            component=p["component"],
            site=p["hook_site"],
            stats_out=tmp / "stats.zarr",
            sum_squares=bool(p["capture"].get("sum_squares", False)),
            act_sums=p["capture"].get("act_sums", "none"),
            on_bad_audio=p["data"].get("on_bad_audio", "skip"),
            store_attrs={
                "model_id": p["model"]["id"],
                "revision": p["model"].get("revision"),
                "task": task,
                "spans": list(SPANS),
                "shard": a.shard,
                "n_shards": a.n_shards,
                "batch_size": batch_size,
                "max_instances_per_shard": cap,
                "sample_seed": sample_seed,
            },
        )
    return 0


if __name__ == "__main__":
    from ..retry import run_stage

    sys.exit(run_stage(main))
