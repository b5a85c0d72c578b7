"""Cache hygiene: remove the per-condition results and params files no output folder of the config uses.

Run by the local rule `cache_gc` (`snakemake cache_gc --cores 1 --configfile ...`), which computes the spec
from the config; the work is in `emotion_neurons.cache`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..cache import gc
from ..config import load_params

SPEC_KEYS = ("caches", "live", "params_dir", "keep_params", "stage1_dir", "keep_stage1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True, help=f"JSON with keys {', '.join(SPEC_KEYS)} (or @file)")
    ap.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = load_params(a.spec)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    missing = [k for k in ("caches", "live") if k not in spec]
    if unknown or missing:
        raise SystemExit(f"--spec: unknown keys {unknown}, missing keys {missing}; expected {list(SPEC_KEYS)}")
    if a.spec.startswith("@"):  # a long spec travels as a params file: never remove the one being read
        spec["keep_params"] = [*spec.get("keep_params", []), a.spec[1:]]
    summary = gc(**spec, dry_run=a.dry_run)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("entries", "stage1_unused")}))
    print(
        f"cache_gc: {'would remove' if a.dry_run else 'removed'} {summary['removed']} entries "
        f"({summary['bytes'] / 1e6:.1f} MB); {len(summary.get('stage1_unused', []))} stage-1 store(s) not used by "
        f"this config ({summary.get('stage1_unused_bytes', 0) / 1e9:.2f} GB, kept: "
        f"{', '.join(Path(p).name for p in summary.get('stage1_unused', [])) or 'none'})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
