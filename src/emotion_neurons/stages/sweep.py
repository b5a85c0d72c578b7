"""Stage 4c (last step): every identification setting's metric tables side by side, the c sweep and the
filtering ablation (Paper A's factors c and filtering, METHOD.md 3.5).

Each setting (`filter.c` x `filter.enabled`) has its own metrics folder, computed as for a single run. Here
each of its tables gets the columns `ident`, `c`, `filtered` and the tables are stacked, so the report and the
user see one table per kind. Two more tables hold the by-selector effects (EVC deltas, SER SE/ACE/ESS with
random controls collapsed over seeds) as one factor varies and the other stays at the primary setting's value:
`c_sweep.tsv` (filtering fixed, every c) and `filter_ablation.tsv` (c fixed, filtered and unfiltered).
A setting with `source_task` holds the other task's masks evaluated on this one (cross-task transfer); its
rows are marked in `masks_from` and cut into `task_transfer.tsv`, never into the sweeps. A setting with
`source_dataset` holds another dataset's masks (`masks_from` = `dataset:<name>`), likewise kept out of the sweeps.

Cross-dataset transfer (`transfer.datasets`, params `datasets`): `dataset_transfer.tsv` holds the by-selector
table of every (source, target) pair, the source's masks on the target's evaluation split, with the Jaccard
overlap of the source's and the target's masks of the same selector setting and emotion where the target is
identified too; `dataset_overlap.tsv` holds that overlap per pair, mask and emotion.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..conditions import mask_name
from ..config import load_params
from ..io import read_table
from .metrics import write_tables

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
            src = f"dataset:{idt['source_dataset']}" if idt.get("source_dataset") else idt.get("source_task") or task
            t.insert(0, "masks_from", src)
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
        other = main["masks_from"].ne(task) & ~main["masks_from"].astype(str).str.startswith("dataset:")
        out["task_transfer"] = main[other].reset_index(drop=True)
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two boolean masks (0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def mask_overlap(pairs: list[dict[str, Any]], masks: dict[str, dict[str, str | Path]]) -> pd.DataFrame:
    """Per pair whose source and target are both identified: for every selector mask and emotion, the sizes of
    the two masks, the neurons they share and their Jaccard overlap (row `mean`: the mean over emotions)."""
    from ..selectors import load_mask

    loaded: dict[tuple[str, str], tuple[np.ndarray, dict[str, Any]]] = {}

    def get(ds: str, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        if (ds, name) not in loaded:
            loaded[ds, name] = load_mask(masks[ds][name])
        return loaded[ds, name]

    rows = []
    for pr in pairs:
        src, tgt = pr["source"], pr["target"]
        if src not in masks or tgt not in masks:
            continue
        for name in sorted(set(masks[src]) & set(masks[tgt])):
            (ma, meta_a), (mb, meta_b) = get(src, name), get(tgt, name)
            if ma.shape[1:] != mb.shape[1:]:
                raise ValueError(f"mask {name}: {masks[src][name]} is {ma.shape[1:]} per emotion but "
                                 f"{masks[tgt][name]} is {mb.shape[1:]} (masks of different models?)")
            emos_b = list(meta_b.get("emotions", []))
            per = []
            for i, e in enumerate(meta_a.get("emotions", [])):
                if e not in emos_b:
                    continue
                a, b = ma[i], mb[emos_b.index(e)]
                j = jaccard(a, b)
                per.append(j)
                rows.append({"source_dataset": src, "target_dataset": tgt, "mask": name, "mask_emotion": e,
                             "n_source": int(a.sum()), "n_target": int(b.sum()),
                             "n_shared": int(np.logical_and(a, b).sum()), "jaccard": j})
            if per:
                rows.append({"source_dataset": src, "target_dataset": tgt, "mask": name, "mask_emotion": "mean",
                             "n_source": np.nan, "n_target": np.nan, "n_shared": np.nan, "jaccard": float(np.mean(per))})
    cols = ["source_dataset", "target_dataset", "mask", "mask_emotion", "n_source", "n_target", "n_shared", "jaccard"]
    return pd.DataFrame(rows, columns=cols)


def dataset_transfer(task: str, spec: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """`dataset_transfer` (the by-selector table of each pair, `source_dataset` and `target_dataset` first, and
    `jaccard` where both datasets have the mask) and `dataset_overlap` (emotion by emotion)."""
    parts = []
    for pr in spec["pairs"]:
        f = Path(pr["dir"]) / f"{MAIN_TABLE[task]}.tsv"
        if not f.exists():
            raise FileNotFoundError(f"transfer pair {pr['source']} -> {pr['target']}: no {f}")
        t = read_table(f)
        t.insert(0, "target_dataset", pr["target"])
        t.insert(0, "source_dataset", pr["source"])
        parts.append(t)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    overlap = mask_overlap(spec["pairs"], spec.get("masks") or {})
    if not table.empty:
        emo = "mask_emotion" if task == "ser" else "target"
        # the mask a row's setting used (a random control has none of its own: no overlap)
        names = [mask_name(s, float(r)) if s != "random" else "" for s, r in zip(table["selector"], table["r"], strict=True)]
        key = table[["source_dataset", "target_dataset"]].assign(mask=names, mask_emotion=table[emo].astype(str))
        if task == "evc":
            key["mask_emotion"] = key["mask_emotion"].replace({"all": "mean"})
        j = key.merge(overlap[["source_dataset", "target_dataset", "mask", "mask_emotion", "jaccard"]],
                      how="left", on=["source_dataset", "target_dataset", "mask", "mask_emotion"])
        table["jaccard"] = j["jaccard"].to_numpy()
    return {"dataset_transfer": table, "dataset_overlap": overlap}


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
    if p.get("datasets"):
        tables.update(dataset_transfer(p["task"], p["datasets"]))
    write_tables(a.outdir, tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
