"""Stage 2b: turn judgements into success flags and keep `c` successes per emotion (METHOD.md section 3)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any

import numpy as np
import pandas as pd

from .io import read_table, write_table

log = logging.getLogger(__name__)


class TooFewSuccesses(RuntimeError):
    pass


def decide(df: pd.DataFrame, task: str, wer_max: float | None) -> pd.DataFrame:
    """Add emotion_ok / content_ok / success. EVC success = target realised AND content kept AND no refusal."""
    df = df.copy()
    if task == "ser":
        df["success"] = df["correct"].astype(bool)
        return df
    df["emotion_ok"] = df["pred"].eq(df["target"]) & ~df["empty"].astype(bool)
    wer = pd.to_numeric(df["wer"], errors="coerce").fillna(np.inf)
    df["content_ok"] = (wer <= wer_max) if wer_max is not None else ~df["empty"].astype(bool)
    df["refusal"] = df["refusal"].astype(bool)
    df["success"] = df["emotion_ok"] & df["content_ok"] & ~df["refusal"]
    return df


def keep(
    df: pd.DataFrame, task: str, emotions: list[str], c: int, seed: int, *, use_filter: bool = True,
    on_too_few: str = "error", min_per_emotion: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Choose up to `c` instances per emotion, all classes capped at the smallest available count.

    Only identification instances count. The choice is deterministic: ids are sorted, then permuted by `seed`.
    """
    group_col = "target" if task == "evc" else "emotion"
    df = df[df["split"].eq("ident")] if "split" in df else df
    pool = df[df["success"]] if use_filter else df[df["status"].eq("ok")]
    counts = {e: int((pool[group_col] == e).sum()) for e in emotions}
    budget = min([c, *counts.values()])
    summary = pd.DataFrame(
        {
            "emotion": emotions,
            "instances": [int((df[group_col] == e).sum()) for e in emotions],
            "successes": [int(((df[group_col] == e) & df["success"]).sum()) for e in emotions],
            "available": [counts[e] for e in emotions],
            "kept": [budget] * len(emotions),
        }
    )
    if budget < max(1, min_per_emotion):
        short = [e for e in emotions if counts[e] < max(1, min_per_emotion)]
        msg = (
            f"too few successful identification instances: {counts} (need >= {max(1, min_per_emotion)} per "
            f"emotion; short: {short}). Lower filter thresholds, raise the data size, or set filter.on_too_few: warn"
        )
        if on_too_few == "error" or budget == 0:
            raise TooFewSuccesses(msg)
        warnings.warn(msg, stacklevel=2)
    if budget < c:
        log.warning("only %d successes for the smallest emotion; every emotion keeps %d (c=%d)", budget, budget, c)
    rng = np.random.default_rng(seed)
    parts = []
    for e in emotions:
        ids = np.array(sorted(pool.loc[pool[group_col] == e, "id"]))
        chosen = ids[rng.permutation(len(ids))[:budget]] if len(ids) else ids
        parts.append(pd.DataFrame({"id": sorted(chosen), "emotion": e}))
    return pd.concat(parts, ignore_index=True), summary


def main(argv: list[str] | None = None) -> int:
    from .config import load_params

    ap = argparse.ArgumentParser(description="Stage 2b: keep c successful instances per emotion")
    ap.add_argument("--params", required=True)
    ap.add_argument("--judged", nargs="+", required=True)
    ap.add_argument("--kept", required=True)
    ap.add_argument("--summary", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p: dict[str, Any] = load_params(a.params)
    f = p["filter"]
    df = pd.concat([read_table(x) for x in a.judged], ignore_index=True)
    if df.empty:
        raise TooFewSuccesses(f"no judged identification outputs in {a.judged}")
    df = decide(df, p["task"], f.get("wer_max"))
    kept, summary = keep(
        df, p["task"], p["emotions"], int(f["c"]), int(f["seed"]), use_filter=bool(f.get("enabled", True)),
        on_too_few=f.get("on_too_few", "error"), min_per_emotion=int(f.get("min_per_emotion", 1)),
    )
    write_table(a.summary, summary)
    write_table(a.kept, kept)
    log.info("kept per emotion:\n%s", summary.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
