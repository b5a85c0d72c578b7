"""Stage 2b: turn judgements into success flags and keep `c` successes per emotion (METHOD.md section 3)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any

import numpy as np
import pandas as pd

from ..io import read_table, write_table

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
    Too few (fewer than `c` available for some emotion): `on_too_few: error` raises TooFewSuccesses naming
    the short emotions and their counts; `warn` warns and every emotion keeps the smallest count, but still
    raises below the floor `min_per_emotion` (at least 1).
    """
    if on_too_few not in ("error", "warn"):
        raise ValueError(f"filter.on_too_few must be 'error' or 'warn', got {on_too_few!r}")
    floor = max(1, int(min_per_emotion))
    if on_too_few == "warn" and floor > c:
        raise ValueError(
            f"filter.min_per_emotion = {min_per_emotion} exceeds filter.c = {c}: no emotion can keep that many"
        )
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
    if task == "evc" and {"wer", "wer_edits", "ref_words"} <= set(df.columns):
        # content judge over the identification outputs: mean per-utterance WER and corpus WER side by side
        ok = df[df["status"].eq("ok")] if "status" in df else df
        grp = [ok[ok[group_col] == e] for e in emotions]
        summary["wer"] = [pd.to_numeric(g["wer"], errors="coerce").mean() for g in grp]
        summary["corpus_wer"] = [_ratio(g["wer_edits"], g["ref_words"]) for g in grp]
    what = "successful identification instances" if use_filter else "identification outputs (filter off)"
    have = ", ".join(f"{e}: {n}" for e, n in counts.items())
    short_c = ", ".join(f"{e}: {counts[e]} < {c}" for e in emotions if counts[e] < c)
    if short_c and on_too_few == "error":
        raise TooFewSuccesses(
            f"filter.c = {c} but there are too few {what} per emotion ({have}); short: {short_c}. Lower "
            "filter.c, relax the judges' thresholds (filter.wer_max), add data, or set filter.on_too_few: warn "
            "to keep the smallest count for every emotion"
        )
    if budget < floor:
        short = ", ".join(f"{e}: {counts[e]} < {floor}" for e in emotions if counts[e] < floor)
        raise TooFewSuccesses(
            f"filter.min_per_emotion = {floor} but there are too few {what} per emotion ({have}); short: "
            f"{short}. Relax the judges' thresholds (filter.wer_max), add data, or lower filter.min_per_emotion"
        )
    if short_c:
        warnings.warn(
            f"filter.c = {c} but there are too few {what} per emotion ({have}); short: {short_c}. "
            f"Every emotion keeps {budget}, so the masks rest on fewer instances than asked",
            stacklevel=2,
        )
        log.warning("every emotion keeps %d instead of c = %d (short: %s)", budget, c, short_c)
    rng = np.random.default_rng(seed)
    parts = []
    for e in emotions:
        ids = np.array(sorted(pool.loc[pool[group_col] == e, "id"]))
        chosen = ids[rng.permutation(len(ids))[:budget]] if len(ids) else ids
        parts.append(pd.DataFrame({"id": sorted(chosen), "emotion": e}))
    return pd.concat(parts, ignore_index=True), summary


def _ratio(num: pd.Series, den: pd.Series) -> float:
    n, d = pd.to_numeric(num, errors="coerce"), pd.to_numeric(den, errors="coerce")
    ok = n.notna() & d.notna()
    total = float(d[ok].sum())
    return float(n[ok].sum()) / total if total > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    from ..config import load_params

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
