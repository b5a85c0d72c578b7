"""Evaluation metrics for EVC and SER (METHOD.md section 3, stage 5).

Inputs are long tables, one row per (condition, instance); a condition is one intervention setting and
`condition == "baseline"` marks the unintervened run every effect is measured against. Keeping the
per-instance rows (rather than pre-aggregated numbers) is what makes the paired bootstrap and the
re-aggregation over random-mask seeds possible.

Units: summaries report fractions (0-1) and raw WER/CER; EVC deltas are in the same units as the metric;
the SER change matrix and SE/ACE/ESS are in accuracy points (x100), as in Paper B.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

BASELINE = "baseline"
ALL = "all"
MEAN = "mean"
CONDITION_COLS: tuple[str, ...] = ("condition", "selector", "r", "intervention", "alpha", "mask_seed")
#: Columns that identify one mask setting; SER effects are computed per such group.
SETTING_COLS: tuple[str, ...] = ("selector", "r", "intervention", "alpha", "mask_seed")
#: Summary metric name -> instance column it averages.
EVC_METRICS: dict[str, str] = {
    "target_acc": "emotion_ok",
    "target_prob": "target_prob",
    "wer": "wer",
    "cer": "cer",
    "refusal_rate": "refusal",
    "success_rate": "success",
}
#: Columns that identify a row of a report table apart from its condition id and mask seed
#: (used by `average_random` to decide which random-mask rows belong together).
ID_COLS: tuple[str, ...] = ("selector", "r", "intervention", "alpha", "mask_emotion", "target", "metric")

_SEED_SUFFIX = re.compile(r"-s\d+$")


# ------------------------------------------------------------------------------------------ helpers


def _require(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} table must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} table is missing required column(s): {', '.join(missing)}")
    if df.empty:
        raise ValueError(f"{what} table is empty")


def _as_float(s: pd.Series) -> pd.Series:
    """Numeric/bool column as float; 'true'/'false' strings (CSV round trips) are understood too."""
    if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
        return pd.to_numeric(s, errors="coerce").astype(float)
    text = s.astype(str).str.strip().str.lower()
    mapped = text.map({"true": 1.0, "false": 0.0})
    num = pd.to_numeric(s, errors="coerce")
    out = mapped.where(mapped.notna(), num).astype(float)
    bad = out.isna() & s.notna() & ~text.isin(["nan", "none", "", "<na>"])
    if bad.any():
        raise ValueError(f"column {s.name!r} has non-numeric values, e.g. {s[bad].iloc[0]!r}")
    return out


def _check_consistent(df: pd.DataFrame, keys: list[str], cols: Sequence[str]) -> None:
    """Every condition id must describe exactly one setting, or grouping by id would mix settings."""
    cols = [c for c in cols if c not in keys]
    if not cols:
        return
    counts = df.groupby(keys, dropna=False, sort=False)[cols].nunique(dropna=False)
    bad = counts[(counts > 1).any(axis=1)]
    if not bad.empty:
        key = bad.index[0]
        col = [c for c in cols if bad.iloc[0][c] > 1][0]
        raise ValueError(f"condition {key!r} has several values of {col!r}; condition ids must be unique")


def _condition_order(conditions: pd.Series) -> list[str]:
    """Conditions in order of first appearance, baseline first."""
    seen = list(dict.fromkeys(conditions.tolist()))
    return ([BASELINE] if BASELINE in seen else []) + [c for c in seen if c != BASELINE]


def _rng_for(seed: int, *names: str) -> np.random.Generator:
    """A stream per (seed, condition, target): a condition's CI does not depend on the other rows."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(n).encode()) for n in names])


def _prep_evc(df: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    _require(df, list(CONDITION_COLS) + ["target", *extra, *EVC_METRICS.values()], "EVC")
    d = df.copy()
    d["condition"] = d["condition"].astype(str)
    d["target"] = d["target"].astype(str)
    if (d["target"] == ALL).any():
        raise ValueError(f"target {ALL!r} is reserved for the pooled row; rename that target")
    for col in EVC_METRICS.values():
        d[col] = _as_float(d[col])
    _check_consistent(d, ["condition"], CONDITION_COLS)
    return d


def _with_all(d: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([d, d.assign(target=ALL)], ignore_index=True)


def _target_order(d: pd.DataFrame) -> list[str]:
    return sorted(d["target"].unique().tolist()) + [ALL]


# ------------------------------------------------------------------------------------------ EVC


def _corpus_wer(d: pd.DataFrame) -> pd.Series:
    """Sum of word edits / sum of reference words per (condition, target); NaN without those columns."""
    keys = ["condition", "target"]
    if not {"wer_edits", "ref_words"} <= set(d.columns):
        return pd.Series(np.nan, index=d.groupby(keys, sort=False).size().index, name="corpus_wer")
    e, n = _as_float(d["wer_edits"]), _as_float(d["ref_words"])
    ok = e.notna() & n.notna()
    g = d.assign(_e=e.where(ok, 0.0), _n=n.where(ok, 0.0)).groupby(keys, sort=False)[["_e", "_n"]].sum()
    return (g["_e"] / g["_n"].where(g["_n"] > 0)).rename("corpus_wer")


def evc_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per condition and target (plus the pooled target "all"): n and the mean of every EVC metric.

    Means skip NaN (e.g. a WER that could not be computed), so `n` counts rows, not valid values.
    `wer` is the mean per-utterance WER; `corpus_wer` beside it is sum(word edits) / sum(reference words)
    over the same rows (columns `wer_edits`, `ref_words` of the judged table; NaN when they are absent).
    """
    d0 = _prep_evc(df)
    targets = _target_order(d0)
    d = _with_all(d0)
    agg = d.groupby(["condition", "target"], sort=False).agg(
        n=("target", "size"), **{m: (c, "mean") for m, c in EVC_METRICS.items()}
    )
    agg["corpus_wer"] = _corpus_wer(d).reindex(agg.index)
    agg = agg.reset_index()
    meta = d.drop_duplicates("condition")[list(CONDITION_COLS)]
    out = meta.merge(agg, on="condition", how="right")
    out["condition"] = pd.Categorical(out["condition"], _condition_order(d["condition"]), ordered=True)
    out["target"] = pd.Categorical(out["target"], targets, ordered=True)
    out = out.sort_values(["condition", "target"], kind="stable").reset_index(drop=True)
    out["condition"] = out["condition"].astype(str)
    out["target"] = out["target"].astype(str)
    cols = [m for k in EVC_METRICS for m in ((k, "corpus_wer") if k == "wer" else (k,))]
    return out[[*CONDITION_COLS, "target", "n", *cols]]


def _paired_bootstrap(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_boot: int, ci: float
) -> list[dict[str, float]]:
    """Per metric column: means over valid pairs, their difference and a percentile bootstrap CI.

    One resample of instance ids is shared by all metrics; a pair with a NaN in a metric is left out of
    that metric's mean only (in the point estimate and in every resample).
    """
    n, m = a.shape
    diff = a - b
    valid = ~np.isnan(diff)
    idx = rng.integers(0, n, size=(n_boot, n))
    W = np.bincount((idx + np.arange(n_boot)[:, None] * n).ravel(), minlength=n_boot * n)
    W = W.reshape(n_boot, n).astype(np.float64)
    num = W @ np.where(valid, diff, 0.0)
    den = W @ valid.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = num / den
    q = [(1.0 - ci) / 2.0, 1.0 - (1.0 - ci) / 2.0]
    rows = []
    for j in range(m):
        v = valid[:, j]
        nv = int(v.sum())
        if nv == 0:
            rows.append(dict(n=0, value=np.nan, baseline=np.nan, delta=np.nan, ci_lo=np.nan, ci_hi=np.nan))
            continue
        value, base = float(a[v, j].mean()), float(b[v, j].mean())
        delta = value - base
        dj = diff[v, j]
        if np.ptp(dj) <= 1e-12:  # identical up to float rounding: every resample gives the same mean
            lo = hi = delta
        else:
            col = boot[:, j]
            lo, hi = (float(x) for x in np.quantile(col[~np.isnan(col)], q))
        rows.append(dict(n=nv, value=value, baseline=base, delta=delta, ci_lo=lo, ci_hi=hi))
    return rows


def evc_deltas(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Per non-baseline condition x target (plus "all") x metric: value, baseline, delta and a CI.

    Paired: only instances present in both the condition and the baseline count, matched on (id, target);
    `value` and `baseline` are means over those shared instances, so `delta = value - baseline` is the
    mean paired difference. The CI is the percentile interval of that mean over `n_boot` resamples of the
    shared instances (with replacement).
    """
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not (0.0 < float(ci) < 1.0):
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    d = _prep_evc(df, extra=["id"])
    d["id"] = d["id"].astype(str)
    if not (d["condition"] == BASELINE).any():
        raise ValueError(f"EVC table has no baseline rows (condition == {BASELINE!r})")
    dup = d.duplicated(["condition", "id", "target"])
    if dup.any():
        row = d[dup].iloc[0]
        raise ValueError(
            f"duplicate instance (id={row['id']!r}, target={row['target']!r}) in condition "
            f"{row['condition']!r}; pairing with the baseline needs unique (id, target) per condition"
        )
    src = list(EVC_METRICS.values())
    base = d[d["condition"] == BASELINE].set_index(["id", "target"])[src]
    meta = d.drop_duplicates("condition").set_index("condition")[list(CONDITION_COLS[1:])]
    targets = _target_order(d)
    rows: list[dict[str, object]] = []
    for cond in _condition_order(d["condition"]):
        if cond == BASELINE:
            continue
        g = d[d["condition"] == cond].set_index(["id", "target"])[src]
        shared = g.index[g.index.isin(base.index)]
        if len(shared) == 0:
            raise ValueError(f"condition {cond!r} shares no (id, target) instances with the baseline")
        a = g.loc[shared].to_numpy(np.float64)
        b = base.loc[shared].to_numpy(np.float64)
        tgt_of = shared.get_level_values("target").to_numpy()
        for tgt in targets:
            sel = np.ones(len(shared), bool) if tgt == ALL else tgt_of == tgt
            if not sel.any():
                continue
            stats = _paired_bootstrap(a[sel], b[sel], _rng_for(seed, cond, tgt), int(n_boot), float(ci))
            for metric, st in zip(EVC_METRICS, stats, strict=True):
                rows.append(
                    {"condition": cond, **meta.loc[cond].to_dict(), "target": tgt, "metric": metric, **st}
                )
    cols = [*CONDITION_COLS, "target", "metric", "n", "value", "baseline", "delta", "ci_lo", "ci_hi"]
    return pd.DataFrame(rows, columns=cols)


# ------------------------------------------------------------------------------------------ SER


def _prep_ser(df: pd.DataFrame) -> pd.DataFrame:
    _require(df, [*CONDITION_COLS, "mask_emotion", "emotion", "correct"], "SER")
    d = df.copy()
    d["condition"] = d["condition"].astype(str)
    d["mask_emotion"] = d["mask_emotion"].fillna("").astype(str)
    d["emotion"] = d["emotion"].astype(str)
    d["correct"] = _as_float(d["correct"])
    if d["correct"].isna().any():
        raise ValueError("column 'correct' has missing values; an unparsed answer counts as False")
    _check_consistent(d, ["condition", "mask_emotion"], CONDITION_COLS)
    return d


def ser_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per condition and mask emotion: n, WA (overall accuracy), UAR (mean per-class recall), acc_<emo>.

    Emotions are the gold labels of the whole table (sorted), so every row has the same columns; UAR
    averages the classes present in that row's data.
    """
    d = _prep_ser(df)
    emotions = sorted(d["emotion"].unique().tolist())
    keys = ["condition", "mask_emotion"]
    per = d.groupby([*keys, "emotion"], sort=False)["correct"].mean().unstack("emotion")
    per = per.reindex(columns=emotions)
    acc_cols = [f"acc_{e}" for e in emotions]
    per.columns = acc_cols
    overall = d.groupby(keys, sort=False)["correct"].agg(n="size", WA="mean")
    out = overall.join(per)
    out["UAR"] = out[acc_cols].mean(axis=1, skipna=True)
    out = out.reset_index()
    meta = d.drop_duplicates(keys)[[*CONDITION_COLS, "mask_emotion"]]
    out = meta.merge(out, on=keys, how="right")
    order = {c: i for i, c in enumerate(_condition_order(d["condition"]))}
    out = out.iloc[np.argsort(out["condition"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)
    return out[[*CONDITION_COLS, "mask_emotion", "n", "WA", "UAR", *acc_cols]]


def ser_effects(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Change matrix and SE / ACE / ESS per mask setting (selector, r, intervention, alpha, mask_seed).

    `change`: one row per (setting, mask emotion e), one column per evaluated emotion e' holding
    `Acc[e->e'] - Acc_base(e')` in points. `effects`: per (setting, e) `SE = change[e, e]`,
    `ACE = mean over e' != e of change[e', e]` (the other masks, same evaluated emotion e), `ESS = SE - ACE`,
    `n_cross` (masks averaged in ACE), plus a row `mask_emotion == "mean"` averaging the emotions.
    Non-baseline rows without a mask emotion (label-agnostic injection) have no change-matrix row and
    are skipped here; `ser_summary` reports them.
    """
    d = _prep_ser(df)
    is_base = d["condition"] == BASELINE
    if not is_base.any():
        raise ValueError(f"SER table has no baseline rows (condition == {BASELINE!r})")
    base_acc = d[is_base].groupby("emotion")["correct"].mean()
    emotions = sorted(d["emotion"].unique().tolist())
    clash = set(emotions) & {*SETTING_COLS, "mask_emotion"}
    if clash:
        raise ValueError(f"emotion name(s) {sorted(clash)} clash with column names of the change matrix")
    base_vec = base_acc.reindex(emotions).to_numpy(np.float64)
    nb = d[~is_base & (d["mask_emotion"] != "")]
    keys = list(SETTING_COLS)
    change_rows: list[dict[str, object]] = []
    effect_rows: list[dict[str, object]] = []
    for setting, g in nb.groupby(keys, dropna=False, sort=False):
        skey = dict(zip(keys, setting, strict=True))
        acc = g.groupby(["mask_emotion", "emotion"])["correct"].mean().unstack("emotion")
        masks = [e for e in emotions if e in acc.index] + sorted(e for e in acc.index if e not in emotions)
        acc = acc.reindex(index=masks, columns=emotions)
        C = (acc.to_numpy(np.float64) - base_vec[None, :]) * 100.0
        for i, e in enumerate(masks):
            change_rows.append({**skey, "mask_emotion": e, **dict(zip(emotions, C[i].tolist(), strict=True))})
        se_l, ace_l, ess_l = [], [], []
        for i, e in enumerate(masks):
            if e not in emotions:
                se = ace = np.nan
                n_cross = 0
            else:
                j = emotions.index(e)
                se = C[i, j]
                cross = np.array([C[k, j] for k in range(len(masks)) if k != i], dtype=np.float64)
                cross = cross[~np.isnan(cross)]
                n_cross = int(cross.size)
                ace = float(cross.mean()) if n_cross else np.nan
            ess = se - ace
            se_l.append(se)
            ace_l.append(ace)
            ess_l.append(ess)
            effect_rows.append(
                {**skey, "mask_emotion": e, "SE": se, "ACE": ace, "ESS": ess, "n_cross": n_cross}
            )
        with np.errstate(invalid="ignore"):
            means = [float(np.nanmean(x)) if np.any(~np.isnan(x)) else np.nan for x in (se_l, ace_l, ess_l)]
        effect_rows.append(
            {
                **skey,
                "mask_emotion": MEAN,
                "SE": means[0],
                "ACE": means[1],
                "ESS": means[2],
                "n_cross": np.nan,
            }
        )
    change = pd.DataFrame(change_rows, columns=[*keys, "mask_emotion", *emotions])
    effects = pd.DataFrame(effect_rows, columns=[*keys, "mask_emotion", "SE", "ACE", "ESS", "n_cross"])
    return change, effects


# ------------------------------------------------------------------------------------------ random


def average_random(
    table: pd.DataFrame, value_cols: Sequence[str], keys: Sequence[str] | None = None
) -> pd.DataFrame:
    """Collapse the rows of selector "random" over `mask_seed` into their mean (and sample std).

    Rows belong together when they agree on `keys` (default: the columns of `ID_COLS` present in the
    table). Collapsed rows get `mask_seed = -1`, the condition id without its `-s<seed>` suffix,
    `<col>_std` (ddof=1, NaN for one seed) and `n_seeds`; other numeric columns that differ across seeds
    are averaged, all other columns keep the first seed's value. Non-random rows pass through with `n_seeds = 1`.
    """
    value_cols = list(value_cols)
    _require(table, ["selector", "mask_seed", *value_cols], "report")
    keys = [c for c in ID_COLS if c in table.columns] if keys is None else list(keys)
    _require(table, keys, "report")
    overlap_ = set(keys) & set(value_cols)
    if overlap_:
        raise ValueError(f"column(s) {sorted(overlap_)} cannot be both keys and value columns")
    std_cols = [f"{c}_std" for c in value_cols]
    out_cols = [*table.columns, *std_cols, "n_seeds"]
    tab = table.reset_index(drop=True)
    is_rand = (tab["selector"].astype(str) == "random").to_numpy()

    rows: list[tuple[int, dict[str, object]]] = []
    for i in np.flatnonzero(~is_rand):
        row = tab.iloc[i].to_dict()
        row.update({s: np.nan for s in std_cols}, n_seeds=1)
        rows.append((int(i), row))
    rand = tab[is_rand]
    if not rand.empty:
        skip = {*keys, *value_cols, "condition", "mask_seed"}
        others = [c for c in tab.columns if c not in skip]
        for _, g in rand.groupby(keys, dropna=False, sort=False) if keys else [((), rand)]:
            row = g.iloc[0].to_dict()
            for c, s in zip(value_cols, std_cols, strict=True):
                vals = _as_float(g[c])
                row[c] = float(vals.mean())
                row[s] = float(vals.std(ddof=1)) if vals.notna().sum() > 1 else np.nan
            for c in others:
                numeric = pd.api.types.is_numeric_dtype(g[c]) and not pd.api.types.is_bool_dtype(g[c])
                if numeric and g[c].nunique(dropna=False) > 1:  # equal values (e.g. n) keep their type
                    row[c] = float(g[c].mean())
            if "condition" in g.columns:
                row["condition"] = _SEED_SUFFIX.sub("", str(row["condition"]))
            row["mask_seed"] = -1
            row["n_seeds"] = int(g["mask_seed"].nunique(dropna=False))
            rows.append((int(g.index[0]), row))
    rows.sort(key=lambda t: t[0])
    return pd.DataFrame([r for _, r in rows], columns=out_cols)
