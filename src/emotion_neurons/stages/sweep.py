"""Stage 4c (last step): every identification setting's metric tables side by side, the c sweep and the
filtering ablation (Paper A's factors c and filtering, METHOD.md 3.5).

Each setting (`filter.c` x `filter.enabled`) has its own metrics folder, computed as for a single run. Here
each of its tables gets the columns `ident`, `c`, `filtered` and the tables are stacked, so the report and the
user see one table per kind. Two more tables hold the by-selector effects (EVC deltas, SER SE/ACE/ESS with
random controls collapsed over seeds) as one factor varies and the other stays at the primary setting's value:
`c_sweep.tsv` (filtering fixed, every c) and `filter_ablation.tsv` (c fixed, filtered and unfiltered).
A setting with `source_task` holds the other task's masks evaluated on this one (cross-task transfer); its
rows are marked in `masks_from` and cut into `task_transfer.tsv`, never into the sweeps.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import load_params
from ..io import read_table, write_table

log = logging.getLogger(__name__)

#: The by-selector table of each task, the one the sweeps are cut from.
MAIN_TABLE: dict[str, str] = {"evc": "deltas_by_selector", "ser": "effects_by_selector"}
IDENT_COLS: tuple[str, ...] = ("ident", "c", "filtered", "masks_from")


def stack(task: str, idents: list[dict[str, Any]], dirs: list[str | Path]) -> dict[str, pd.DataFrame]:
    """Table name -> the rows of every setting with its `ident`, `c`, `filtered`, `masks_from` first."""
    if len(idents) != len(dirs):
        raise ValueError(f"{len(idents)} identification settings but {len(dirs)} metrics folders")
    parts: dict[str, list[pd.DataFrame]] = {}
    for idt, d in zip(idents, dirs, strict=True):
        if Path(d).name != idt["ident"]:
            raise ValueError(f"metrics folder {d} does not belong to setting {idt['ident']!r} (order of --inputs)")
        for f in sorted(Path(d).glob("*.tsv")):
            t = read_table(f)
            clash = [c for c in IDENT_COLS if c in t.columns]
            if clash:
                raise ValueError(f"{f} already has column(s) {clash}")
            t.insert(0, "masks_from", idt.get("source_task") or task)
            t.insert(0, "filtered", bool(idt["filtered"]))
            t.insert(0, "c", int(idt["c"]))
            t.insert(0, "ident", idt["ident"])
            parts.setdefault(f.stem, []).append(t)
    return {name: pd.concat(ts, ignore_index=True) for name, ts in parts.items()}


def sweeps(task: str, tables: dict[str, pd.DataFrame], idents: list[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """`c_sweep` and `filter_ablation`, cut from the task's by-selector table around the primary setting."""
    main = tables.get(MAIN_TABLE[task])
    if main is None:
        raise ValueError(f"no {MAIN_TABLE[task]}.tsv among the metric tables of task {task}")
    primary = idents[0]
    own = main[main["masks_from"].eq(task)]
    c_sweep = own[own["filtered"].eq(primary["filtered"])].sort_values("c", kind="stable")
    ablation = own[own["c"].eq(primary["c"])].sort_values("filtered", ascending=False, kind="stable")
    out = {"c_sweep": c_sweep.reset_index(drop=True), "filter_ablation": ablation.reset_index(drop=True)}
    if any(i.get("source_task") for i in idents):
        out["task_transfer"] = main[main["masks_from"].ne(task)].reset_index(drop=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stack the metrics of every identification setting; c sweep, filtering ablation")
    ap.add_argument("--params", required=True)
    ap.add_argument("--inputs", nargs="+", required=True, help="metrics folders, one per setting, in params order")
    ap.add_argument("--outdir", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    tables = stack(p["task"], p["idents"], a.inputs)
    tables.update(sweeps(p["task"], tables, p["idents"]))
    out = Path(a.outdir)
    for name, df in tables.items():
        write_table(out / f"{name}.tsv", df)
    log.info("wrote %s", sorted(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
