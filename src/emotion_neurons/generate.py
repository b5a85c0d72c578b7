"""Stage 1 (generate with capture) and the generation half of stage 4 (generate under an intervention).

One engine serves both: load the adapter once, run batches, optionally record statistics and/or apply an
intervention, write the outputs table, the wavs and (with capture) a zarr store per shard. All outputs are
atomic; a crashed shard leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import SPANS, __version__
from .config import code_version, load_params
from .io import AudioError, atomic_dir, load_audio, read_jsonl, write_table, write_wav
from .models import available
from .types import GenerationSettings, Instance

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("output_text", "output_wav", "output_sr", "n_generated", "seconds", "option_probs")


def load_shard(manifest: str | Path, split: str, shard: int, n_shards: int, limit: int | None = None) -> list[Instance]:
    from .data import shard_of

    rows = [Instance.from_dict(d) for d in read_jsonl(manifest)]
    inst = [i for i in rows if i.split == split and shard_of(i.id, n_shards) == shard]
    inst.sort(key=lambda i: i.id)
    if limit:
        inst = inst[:limit]
    return inst


def settings_from(task: str, tcfg: dict[str, Any], model_cfg: dict[str, Any]) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=int(tcfg["max_new_tokens"]),
        want_audio=task == "evc",
        speaker=model_cfg.get("speaker") or "",
        seed=int(tcfg.get("seed", 0)),
        extra=dict(tcfg.get("generation_extra") or {}),
    )


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
    intervention=None,
    mask_fn=None,
    on_bad_audio: str = "skip",
    store_attrs: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Generate for `instances`; capture statistics into `stats_out` and/or edit with `intervention`.

    `mask_fn(instances) -> bool tensor [B, L, N]` gives each row its mask when an intervention is set.
    """
    import torch

    from .hooks import Intervention, SpanTracker, StatsRecorder
    from .stats import InstanceStatsWriter

    sites = adapter.resolve_sites(component, site)
    tracker = SpanTracker(adapter.component_stop_token_ids(component))
    root = adapter.decoder_root(component)

    audios: dict[str, np.ndarray] = {}
    good: list[Instance] = []
    rows: list[dict[str, Any]] = []
    for inst in instances:
        try:
            if inst.wav not in audios:
                audios[inst.wav] = load_audio(inst.wav, adapter.input_sample_rate)
            good.append(inst)
        except AudioError as e:
            if on_bad_audio == "error":
                raise
            log.warning("skipping %s: %s", inst.id, e)
            rows.append({**inst.to_dict(), "status": f"bad_audio: {e}"})

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
        writer = InstanceStatsWriter(stats_out, [i.id for i in good], len(sites), n_neurons, attrs, sum_squares)

    bs = max(1, batch_size if adapter.supports_batching else 1)
    wav_dir = Path(wav_dir) if wav_dir else None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(tracker.attached(root))
            iv = None
            if intervention is not None and intervention.kind != "none":
                iv = stack.enter_context(Intervention(sites, tracker, intervention).attached())
            rec = stack.enter_context(StatsRecorder(sites, tracker, sum_squares).attached()) if writer else None
            bar = stack.enter_context(tqdm(total=len(good), desc="generate", unit="inst", file=sys.stderr, mininterval=5))
            for b0 in range(0, len(good), bs):
                batch = good[b0 : b0 + bs]
                t0 = time.perf_counter()
                prepared = adapter.prepare(batch, [audios[i.wav] for i in batch])
                tracker.start(adapter.prefill_span_codes(component, prepared))
                if rec is not None:
                    rec.reset(len(batch))
                if iv is not None:
                    iv.set_masks(mask_fn(batch))
                with torch.inference_mode():
                    outs = adapter.generate(prepared, settings)
                if writer is not None:
                    writer.write([i.id for i in batch], rec.result())
                dt = (time.perf_counter() - t0) / len(batch)
                bar.update(len(batch))
                for inst, out in zip(batch, outs, strict=True):
                    wav_path = ""
                    if out.wav is not None and wav_dir is not None:
                        target = wav_dir / (inst.id.replace("/", "_").replace(">", "") + ".wav")
                        write_wav(target, out.wav, out.sample_rate)
                        # relative to the table's folder, so the shard folder can be renamed into place
                        wav_path = str(target.relative_to(Path(out_table).parent))
                    rows.append(
                        {
                            **inst.to_dict(),
                            "options": "|".join(inst.options),
                            "status": "ok",
                            "output_text": out.text,
                            "output_wav": wav_path,
                            "output_sr": out.sample_rate,
                            "n_generated": out.n_generated,
                            "seconds": round(dt, 4),
                            # SER: first-step probability per option (JSON), "" when not recorded
                            "option_probs": json.dumps(out.option_probs, sort_keys=True) if out.option_probs else "",
                        }
                    )
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None and not writer.final.exists():
            with contextlib.suppress(Exception):
                writer.abort()
        raise
    columns = [*Instance.__dataclass_fields__, "status", *OUTPUT_COLUMNS]
    df = pd.DataFrame(rows, columns=columns if not rows else None)
    if "options" in df:
        df["options"] = df["options"].map(lambda o: "|".join(o) if isinstance(o, list) else o)
    write_table(out_table, df)
    return df


def load_adapter(model_cfg: dict[str, Any]):
    from .models import get_adapter

    if model_cfg.get("deterministic", True):
        import torch

        # cuDNN's attention kernel made full-size Qwen2.5-Omni greedy decoding differ from run to run on an
        # H100 (bench/RESULTS-gpu-fullsize.md); without it, baseline and alpha-0 runs are bit-identical
        torch.backends.cuda.enable_cudnn_sdp(False)
    adapter = get_adapter(model_cfg["adapter"])
    adapter.load(model_cfg["id"], model_cfg.get("revision"), model_cfg.get("device", "auto"), model_cfg.get("dtype", "auto"))
    return adapter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stage 1: generate identification outputs and record neuron statistics")
    ap.add_argument("--params", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--n-shards", type=int, required=True)
    ap.add_argument("--out", required=True, help="shard directory (outputs.tsv, stats.zarr, wavs/)")
    ap.add_argument("--batch-size", type=int, default=None, help="overrides model.batch_size (runtime only)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    task = p["task"]
    instances = load_shard(a.manifest, "ident", a.shard, a.n_shards, p["task_cfg"].get("max_instances_per_shard"))
    log.info("shard %d/%d: %d identification instances", a.shard, a.n_shards, len(instances))
    adapter = load_adapter(p["model"])
    settings = settings_from(task, p["task_cfg"], p["model"])
    with atomic_dir(a.out) as tmp:
        run(
            adapter,
            instances,
            settings,
            out_table=tmp / "outputs.tsv",
            wav_dir=tmp / "wavs" if task == "evc" else None,
            batch_size=a.batch_size or int(p["model"].get("batch_size", 1)),
            component=p["component"],
            site=p["hook_site"],
            stats_out=tmp / "stats.zarr",
            sum_squares=bool(p["capture"].get("sum_squares", False)),
            on_bad_audio=p["data"].get("on_bad_audio", "skip"),
            store_attrs={
                "model_id": p["model"]["id"],
                "revision": p["model"].get("revision"),
                "task": task,
                "spans": list(SPANS),
                "shard": a.shard,
                "n_shards": a.n_shards,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
