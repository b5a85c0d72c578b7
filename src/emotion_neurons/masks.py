"""Stage 4a: select one neuron mask from the aggregated statistics and save it with provenance."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys

from .config import load_params
from .selectors import save_mask, select
from .stats import load_aggregate

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stage 4a: select emotion-sensitive neurons")
    ap.add_argument("--params", required=True)
    ap.add_argument("--aggregate", required=True)
    ap.add_argument("--out", required=True, help="mask .safetensors (a .json provenance file is written beside it)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    arrays, attrs = load_aggregate(a.aggregate)
    P = arrays["P"]
    mask = select(
        P, p["selector"], float(p["r"]), p.get("scope", "global"), int(p.get("mask_seed", 0)),
        M=arrays.get("M"), lape_quantile=p.get("lape_quantile"), mad_signed=bool(p.get("mad_signed", False)),
    )
    prov = {
        **{k: attrs.get(k) for k in ("model_id", "revision", "component", "hook_site", "spans", "n_instances", "task", "filter")},
        "selector": p["selector"], "r": p["r"], "scope": p.get("scope", "global"), "seed": p.get("mask_seed", 0),
        "data_hash": hashlib.sha256(P.tobytes()).hexdigest()[:16],
    }
    save_mask(a.out, mask, list(attrs["emotions"]), prov)
    log.info("%s: %s neurons per emotion", a.out, mask.reshape(mask.shape[0], -1).sum(1).tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
