"""Stage 4b: generate on held-out instances under one condition (mask x intervention x alpha).

EVC steers each instance with the mask of its target emotion. SER applies each emotion's mask in turn to all
test instances (the rows of the mask-emotion x evaluated-emotion change matrix). The baseline runs unedited.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from .config import load_params
from .generate import batch_size_of, load_adapter, load_shard, run, settings_from
from .hooks import InterventionSpec
from .io import atomic_dir, write_table

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None, adapter=None) -> int:
    """One condition on one shard; `adapter`: an already loaded model (emotion_neurons.group loads it once for
    a group of conditions)."""
    ap = argparse.ArgumentParser(description="Stage 4b: generate held-out outputs under an intervention")
    ap.add_argument("--params", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--n-shards", type=int, required=True)
    ap.add_argument("--mask", default="", help="mask .safetensors (omitted for the baseline)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=None, help="overrides model.batch_size (warns: the outputs are keyed on model.batch_size)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    task, cond = p["task"], p["condition"]
    instances, strata = load_shard(
        a.manifest, "eval", a.shard, a.n_shards, p["eval"].get("max_instances_per_shard"),
        int(p["eval"].get("sample_seed") or 0),
    )
    log.info("condition %s, shard %d/%d: %d instances", cond["condition"], a.shard, a.n_shards, len(instances))
    spec = InterventionSpec(cond["intervention"], float(cond["alpha"]), p["eval"].get("positions", "all"))
    adapter = adapter if adapter is not None else load_adapter(p["model"])
    settings = settings_from(task, p["task_cfg"], p["model"])
    masks = emotions = None
    if spec.kind != "none":
        import torch

        from .selectors import load_mask

        mask_np, meta = load_mask(a.mask)
        emotions = list(meta["emotions"])
        masks = torch.from_numpy(mask_np).bool()
        n_sites = len(adapter.resolve_sites(p["component"], p["hook_site"]))
        if masks.shape[1] != n_sites:
            raise ValueError(f"mask {a.mask} has {masks.shape[1]} layers but the model has {n_sites}")
    common = dict(
        batch_size=batch_size_of(p, a.batch_size), component=p["component"], site=p["hook_site"],
        intervention=spec, on_bad_audio=p["data"].get("on_bad_audio", "skip"),
    )
    with atomic_dir(a.out) as tmp:
        write_table(tmp / "strata.tsv", strata)
        if task == "evc" or spec.kind == "none":

            def by_target(batch):
                return masks[[emotions.index(i.group) for i in batch]]

            df = run(
                adapter, instances, settings, out_table=tmp / "outputs.tsv",
                wav_dir=tmp / "wavs" if task == "evc" else None, mask_fn=by_target if masks is not None else None,
                **common,
            )
            df["mask_emotion"] = df["target"] if (task == "evc" and masks is not None) else ""
        else:
            parts = []
            for e_idx, emo in enumerate(emotions):

                def fixed(batch, _e=e_idx):
                    return masks[[_e] * len(batch)]

                part = run(adapter, instances, settings, out_table=tmp / f"outputs-{emo}.tsv", wav_dir=None,
                           mask_fn=fixed, **common)
                part["mask_emotion"] = emo
                parts.append(part)
                Path(tmp / f"outputs-{emo}.tsv").unlink()
            df = pd.concat(parts, ignore_index=True)
        write_table(tmp / "outputs.tsv", df)
    return 0


if __name__ == "__main__":
    from .retry import run_stage

    sys.exit(run_stage(main))
