"""Stage 4a: select one neuron mask from the aggregated statistics (or the random control of a selector's mask)
and save it with provenance, including the tie counts at the cut-off."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from typing import Any

from ..config import load_params
from ..selectors import RANDOM, SELECTORS, load_mask, random_control, save_mask, select_with_info
from ..stats import load_aggregate

log = logging.getLogger(__name__)


def _named_ties(info: dict[str, Any], emotions: list[str]) -> dict[str, Any]:
    return {e: t for e, t in zip(emotions, info["ties"], strict=True)}


def select_mask(p: dict[str, Any], aggregate: str, out: str) -> None:
    """The mask of selector `p["selector"]` with its parameters `p["params"]` (config `select.<selector>`)."""
    arrays, attrs = load_aggregate(aggregate)
    P = arrays["P"]
    emotions = [str(e) for e in attrs["emotions"]]
    name = p["selector"]
    params = SELECTORS[name].check_params(dict(p.get("params") or {}))
    mask, info = select_with_info(
        P, name, float(p["r"]), p.get("scope", "global"), int(p.get("mask_seed", 0)), M=arrays.get("M"), **params
    )
    prov = {
        **{k: attrs.get(k) for k in ("model_id", "revision", "component", "hook_site", "spans", "n_instances", "task", "filter")},
        "selector": name, "r": p["r"], "scope": p.get("scope", "global"), "seed": p.get("mask_seed", 0),
        "data_hash": hashlib.sha256(P.tobytes()).hexdigest()[:16],
        "ties": _named_ties(info, emotions),
    }
    if params or name in info:  # the selector's parameters and what it reports about itself
        prov[name] = {**params, **info.get(name, {})}
    save_mask(out, mask, emotions, prov)
    log.info("%s: %s neurons per emotion", out, mask.reshape(mask.shape[0], -1).sum(1).tolist())


def control_mask(p: dict[str, Any], source: str, out: str) -> None:
    """Random control matched to the realised size (and by default the per-layer counts) of `source`."""
    src, meta = load_mask(source)
    match = p.get("match", "layers")
    mask = random_control(src, int(p["mask_seed"]), match, stream=str(p["control_of"]))
    keep = ("model_id", "revision", "component", "hook_site", "spans", "n_instances", "task", "filter", "scope")
    prov = {
        **{k: meta.get(k) for k in keep},
        "selector": "random", "r": p["r"], "seed": p["mask_seed"], "match": match,
        "control_of": p["control_of"], "source_mask": str(source), "source_counts": meta.get("counts"),
    }
    save_mask(out, mask, list(meta["emotions"]), prov)
    log.info("%s: %s neurons per emotion (control of %s)", out, mask.reshape(mask.shape[0], -1).sum(1).tolist(), source)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stage 4a: select emotion-sensitive neurons")
    ap.add_argument("--params", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--aggregate", help="aggregate.zarr of the task (selectors)")
    src.add_argument("--control-of", help="selector mask .safetensors the random control is matched to")
    ap.add_argument("--out", required=True, help="mask .safetensors (a .json provenance file is written beside it)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    if a.control_of:
        if p.get("selector") != RANDOM:
            raise ValueError(f"--control-of is for random controls, but the params name selector {p.get('selector')!r}")
        control_mask(p, a.control_of, a.out)
    else:
        if p.get("selector") == RANDOM:
            raise ValueError("a random control needs --control-of <selector mask>, not --aggregate")
        select_mask(p, a.aggregate, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
