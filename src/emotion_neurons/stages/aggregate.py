"""Stage 3: reduce the kept instances' statistics into per-emotion K, T, P, M (METHOD.md section 3)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import load_params
from ..io import read_table
from ..stats import aggregate

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stage 3: aggregate kept-instance statistics per emotion")
    ap.add_argument("--params", required=True)
    ap.add_argument("--kept", required=True)
    ap.add_argument("--stores", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    kept = read_table(a.kept)
    groups = {e: kept.loc[kept["emotion"] == e, "id"].tolist() for e in p["emotions"]}
    aggregate(a.stores, groups, p["spans"], a.out, attrs={"task": p["task"], "filter": p.get("filter")})
    log.info("aggregated %s", {e: len(v) for e, v in groups.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
