"""Stage 4b: generate on held-out instances under one condition (mask x intervention x alpha).

EVC steers each instance with the mask of its target emotion. SER applies each emotion's mask in turn to all
test instances (the rows of the mask-emotion x evaluated-emotion change matrix). The baseline runs unedited.
A label-agnostic injection (`two_pass`, `mix`; SER) does not know the test label: an unintervened first
pass gives each utterance its prediction and option scores, recorded per utterance (columns
`first_pred`, `first_pred_from`, `first_scores`, `injection_weights`, and the first pass's own table
`first-pass.tsv`) so the second pass can be audited; the second pass steers with the mask the injection builds
from them; `union` steers the OR of all masks in one pass. `erase` moves masked neurons to the mean
activation over the other emotions, read from the stage-3 aggregate (`--aggregate`; needs `capture.act_sums`).

CLI (unchanged for the existing conditions): --params --manifest --shard --n-shards --out [--mask]
[--batch-size] [--aggregate, for `erase` only].
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import load_params
from ..interventions import InterventionSpec, injection_weights, other_emotion_means
from ..io import atomic_dir, write_table
from ..prompts import parse_answer
from ..types import Instance
from .generate import batch_size_of, load_adapter, load_shard, run, settings_from

log = logging.getLogger(__name__)


def erase_values(aggregate: str | Path | None, emotions: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """Mbar [E, L, N] in the mask's emotion order: each emotion's mean activation over the OTHER emotions."""
    if not aggregate:
        raise ValueError("intervention erase needs --aggregate (the stage-3 aggregate.zarr with M)")
    from ..stats import load_aggregate

    arrays, attrs = load_aggregate(aggregate)
    if "M" not in arrays:
        raise ValueError(
            f"{aggregate} has no mean activation M: erase needs capture.act_sums float16 or float32 in stage 1"
        )
    agg_emotions = list(attrs.get("emotions") or [])
    missing = [e for e in emotions if e not in agg_emotions]
    if missing:
        raise ValueError(f"{aggregate}: mask emotions {missing} are not in the aggregate's {agg_emotions}")
    mbar = other_emotion_means(arrays["M"])[[agg_emotions.index(e) for e in emotions]]
    if mbar.shape != tuple(shape):
        raise ValueError(f"{aggregate}: M is {mbar.shape[1:]} per emotion but the mask is {tuple(shape)[1:]}")
    return mbar


def first_pass_weights(
    first: pd.DataFrame, emotions: list[str], routing: str, temperature: float
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Per instance id, the weights over `emotions` of a label-agnostic injection, and the audit columns.

    The pseudo-label is the first pass's parsed answer; an unparsable answer falls back to the option with
    the highest score (`first_pred_from` says which). Scores are in `emotions` order.
    """
    ok = first[first["status"].eq("ok")]
    ids, scores, preds, froms = [], [], [], []
    for row in ok.itertuples(index=False):
        options = [o for o in str(row.options).split("|") if o]
        by_option = json.loads(row.option_scores)
        missing = [e for e in emotions if e not in options]
        if missing:
            raise ValueError(f"instance {row.id}: mask emotions {missing} are not among its options {options}")
        s = np.array([by_option[options.index(e)] for e in emotions], dtype=np.float64)
        answer = parse_answer(str(row.output_text) if row.output_text == row.output_text else "", options)
        if answer in emotions:
            pred, src = emotions.index(answer), "answer"
        else:
            pred, src = int(np.argmax(s)), "scores"
        ids.append(row.id)
        scores.append(s)
        preds.append(pred)
        froms.append(src)
    S = np.array(scores).reshape(len(ids), len(emotions))
    W = injection_weights(routing, S, preds, temperature)
    audit = pd.DataFrame(
        {
            "id": ids,
            "first_pred": [emotions[p] for p in preds],
            "first_pred_from": froms,
            "first_output_text": ok["output_text"].tolist(),
            "first_scores": [json.dumps(dict(zip(emotions, np.round(s, 6).tolist(), strict=True))) for s in S],
            "injection_weights": [json.dumps(dict(zip(emotions, np.round(w, 6).tolist(), strict=True))) for w in W],
        }
    )
    return dict(zip(ids, W, strict=True)), audit


def main(argv: list[str] | None = None, adapter=None) -> int:
    """One condition on one shard; `adapter`: an already loaded model (emotion_neurons.group loads it once for
    a group of conditions)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["group"]:  # the rule's entry point: a group of conditions, one model load
        from ..group import parse_group_args

        a = parse_group_args("evaluate", argv[1:])
        evaluate_group(load_params(a.params), a.manifest, a.run_dir, a.shard, a.n_shards, a.batch_size, a.cache, a.out)
        return 0
    ap = argparse.ArgumentParser(description="Stage 4b: generate held-out outputs under an intervention")
    ap.add_argument("--params", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--n-shards", type=int, required=True)
    ap.add_argument("--mask", default="", help="mask .safetensors (omitted for the baseline)")
    ap.add_argument("--aggregate", default="", help="stage-3 aggregate.zarr (erase: mean activations M)")
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
    spec = InterventionSpec(
        cond["intervention"], float(cond["alpha"]), p["eval"].get("positions", "all"),
        float(p["eval"].get("mix_temperature") or 1.0),
    )
    kind = spec.cls
    if kind.routing != "label" and task != "ser":
        raise ValueError(f"intervention {spec.kind!r} is a label-agnostic SER injection; task {task!r} has labels")
    adapter = adapter if adapter is not None else load_adapter(p["model"])
    settings = settings_from(task, p["task_cfg"], p["model"])
    masks = emotions = values = None
    if spec.kind != "none":
        import torch

        from ..selectors import load_mask

        mask_np, meta = load_mask(a.mask)
        emotions = list(meta["emotions"])
        masks = torch.from_numpy(mask_np).bool()
        n_sites = len(adapter.resolve_sites(p["component"], p["hook_site"]))
        if masks.shape[1] != n_sites:
            raise ValueError(f"mask {a.mask} has {masks.shape[1]} layers but the model has {n_sites}")
        if kind.needs_means:
            values = torch.from_numpy(erase_values(a.aggregate, emotions, tuple(masks.shape)))

    def rows(idx: list[int]) -> Any:
        return masks[idx] if values is None else (masks[idx], values[idx])

    common = dict(
        batch_size=batch_size_of(p, a.batch_size), component=p["component"], site=p["hook_site"],
        intervention=spec, on_bad_audio=p["data"].get("on_bad_audio", "skip"),
    )
    with atomic_dir(a.out) as tmp:
        write_table(tmp / "strata.tsv", strata)
        if task == "evc" or spec.kind == "none":

            def by_target(batch: list[Instance]) -> Any:
                return rows([emotions.index(i.group) for i in batch])

            df = run(
                adapter, instances, settings, out_table=tmp / "outputs.tsv",
                wav_dir=tmp / "wavs" if task == "evc" else None, mask_fn=by_target if masks is not None else None,
                **common,
            )
            df["mask_emotion"] = df["target"] if (task == "evc" and masks is not None) else ""
        elif kind.routing == "label":
            parts = []
            for e_idx, emo in enumerate(emotions):

                def fixed(batch: list[Instance], _e: int = e_idx) -> Any:
                    return rows([_e] * len(batch))

                part = run(adapter, instances, settings, out_table=tmp / f"outputs-{emo}.tsv", wav_dir=None,
                           mask_fn=fixed, **common)
                part["mask_emotion"] = emo
                parts.append(part)
                Path(tmp / f"outputs-{emo}.tsv").unlink()
            df = pd.concat(parts, ignore_index=True)
        else:
            df = injected(adapter, instances, settings, tmp, masks, emotions, spec, common)
        write_table(tmp / "outputs.tsv", df)
    return 0


def injected(adapter, instances, settings, tmp: Path, masks, emotions: list[str], spec: InterventionSpec,
             common: dict[str, Any]) -> pd.DataFrame:
    """The two passes of a label-agnostic injection: unintervened (with option scores), then steered. `union`
    needs no first pass (its mask is the same for every utterance), so it runs one."""
    from ..interventions import weighted_masks

    if spec.cls.routing == "union":
        union = weighted_masks(masks, np.ones((1, len(emotions))))

        def same(batch: list[Instance]) -> Any:
            return union.expand(len(batch), -1, -1)

        df = run(adapter, instances, settings, out_table=tmp / "outputs.tsv", wav_dir=None, mask_fn=same, **common)
        df["mask_emotion"] = ""
        return df
    first_common = {**common, "intervention": None}
    first = run(adapter, instances, settings, out_table=tmp / "first-pass.tsv", wav_dir=None,
                option_scores=True, **first_common)
    weights, audit = first_pass_weights(first, emotions, spec.cls.routing, spec.temperature)

    def by_first_pass(batch: list[Instance]) -> Any:
        return weighted_masks(masks, np.stack([weights[i.id] for i in batch]))

    df = run(adapter, instances, settings, out_table=tmp / "outputs.tsv", wav_dir=None, mask_fn=by_first_pass,
             **common)
    df = df.merge(audit, on="id", how="left")
    df["mask_emotion"] = ""  # no fixed mask emotion: rows are compared with the baseline (WA, UAR)
    log.info("%s: first-pass predictions %s", spec.kind, audit["first_pred"].value_counts().to_dict())
    return df


def evaluate_group(
    p: dict[str, Any], manifest: str, run_dir: str, shard: int, n_shards: int, batch_size: int | None,
    cache: str, out: str,
) -> dict[str, int]:
    """Evaluate `p["conditions"]` (each with the parameters `p["common"]`) into `out/<condition>/`; mask paths
    (and, for interventions that need M, the condition's `aggregate` or else `<source_task>/aggregate/<ident>.zarr`) are relative to
    `run_dir`."""
    from ..config import dumps, short_hash
    from ..group import check_unique, link_tree, result_params
    from ..interventions import INTERVENTIONS
    from ..io import file_sha

    conds = p["conditions"]
    check_unique(conds, "evaluate group params")
    manifest_sha = file_sha(manifest)
    adapter = None
    n = {"conditions": len(conds), "cached": 0, "computed": 0, "model_loads": 0}
    with atomic_dir(out) as tmp:
        for cond in conds:
            cp = {**p["common"], "condition": cond}
            mask = f"{run_dir}/{cond['mask']}.safetensors" if cond.get("mask") else ""
            agg = ""
            if INTERVENTIONS[cond["intervention"]].needs_means:
                # a cross-dataset condition names its aggregate (its ident is not the masks' setting)
                agg = f"{run_dir}/{cond.get('aggregate') or cond['source_task'] + '/aggregate/' + cond['ident']}.zarr"
            if mask and not Path(mask).exists():
                raise FileNotFoundError(f"condition {cond['condition']!r}: its mask {mask} does not exist")
            key = short_hash(
                {"params": result_params(cp), "mask": file_sha(mask) if mask else "", "manifest": manifest_sha, "shard": shard,
                 "n_shards": n_shards, "batch_size": batch_size}, 32,
            )
            hit = Path(cache) / key
            if hit.is_dir():
                n["cached"] += 1
                log.info("condition %s: from the cache (%s)", cond["condition"], hit)
            else:
                if adapter is None:  # loaded only when a condition needs it: an all-cached rerun loads nothing
                    adapter = load_adapter(cp["model"])
                    n["model_loads"] += 1
                argv = ["--params", dumps(cp), "--manifest", manifest, "--shard", str(shard),
                        "--n-shards", str(n_shards), "--out", str(hit)]
                if mask:
                    argv += ["--mask", mask]
                if agg:
                    argv += ["--aggregate", agg]
                if batch_size is not None:
                    argv += ["--batch-size", str(batch_size)]
                log.info("condition %s: evaluating", cond["condition"])
                main(argv, adapter=adapter)
                n["computed"] += 1
            link_tree(hit, tmp / cond["condition"])
    log.info("group done: %s", n)
    return n


if __name__ == "__main__":
    from ..retry import run_stage

    sys.exit(run_stage(main))
