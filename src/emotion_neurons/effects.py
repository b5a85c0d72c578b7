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
import warnings
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

BASELINE = "baseline"
ALL = "all"
MEAN = "mean"
#: `control_of` names the selector a random control is matched to ("" otherwise); tables without the column
#: (older runs, hand-built tests) get "".
CONDITION_COLS: tuple[str, ...] = ("condition", "selector", "r", "intervention", "alpha", "mask_seed", "control_of")
_REQUIRED_COND: tuple[str, ...] = CONDITION_COLS[:-1]
#: Columns that identify one mask setting; SER effects are computed per such group.
SETTING_COLS: tuple[str, ...] = ("selector", "control_of", "r", "intervention", "alpha", "mask_seed")
#: The setting of a random control apart from its seed: the seeds of one group are averaged.
GROUP_COLS: tuple[str, ...] = ("control_of", "r", "intervention", "alpha")
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
ID_COLS: tuple[str, ...] = ("selector", "control_of", "r", "intervention", "alpha", "mask_emotion", "target", "metric")

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


def _with_control(d: pd.DataFrame) -> pd.DataFrame:
    if "control_of" not in d.columns:
        d["control_of"] = ""
    d["control_of"] = d["control_of"].fillna("").astype(str)
    return d


def _prep_evc(df: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    _require(df, list(_REQUIRED_COND) + ["target", *extra, *EVC_METRICS.values()], "EVC")
    d = _with_control(df.copy())
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


def _check_boot(n_boot: int, ci: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not (0.0 < float(ci) < 1.0):
        raise ValueError(f"ci must lie in (0, 1), got {ci}")


def _cluster_weights(clusters: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """[n_boot, n] weight of each row in each resample: clusters drawn with replacement, rows move with them.

    Clusters are numbered in order of first appearance, so with one row per cluster this is the ordinary
    bootstrap of rows (and draws the same numbers from `rng`).
    """
    codes, uniq = pd.factorize(pd.Series(np.asarray(clusters, dtype=object)), sort=False)
    c = len(uniq)
    idx = rng.integers(0, c, size=(n_boot, c))
    Wc = np.bincount((idx + np.arange(n_boot)[:, None] * c).ravel(), minlength=n_boot * c)
    return Wc.reshape(n_boot, c).astype(np.float64)[:, codes]


def _seed_weights(n_seeds: int, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """[n_boot, n_seeds] how often each seed is drawn in each resample (all ones for a single seed)."""
    if n_seeds == 1:
        return np.ones((n_boot, 1))
    idx = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    Ws = np.bincount((idx + np.arange(n_boot)[:, None] * n_seeds).ravel(), minlength=n_boot * n_seeds)
    return Ws.reshape(n_boot, n_seeds).astype(np.float64)


def _quantiles(boot: np.ndarray, ci: float) -> tuple[float, float]:
    col = boot[~np.isnan(boot)]
    if col.size == 0:
        return np.nan, np.nan
    lo, hi = np.quantile(col, [(1.0 - ci) / 2.0, 1.0 - (1.0 - ci) / 2.0])
    return float(lo), float(hi)


def _two_level_bootstrap(
    X: np.ndarray, clusters: np.ndarray, rng: np.random.Generator, n_boot: int, ci: float
) -> list[dict[str, float]]:
    """Mean over seeds of the mean paired difference, with a bootstrap over clusters AND seeds.

    `X` [S, n, m]: per seed s (a random control's mask seed; S = 1 for a selector) the paired difference of
    row i in metric j. A row counts in metric j only where no seed has a NaN there, so every seed is
    averaged over the same rows. Each resample draws clusters (source utterances) with replacement, shared
    by all seeds since they were evaluated on the same rows, and S of the S seeds with replacement; the
    statistic is the mean over the drawn seeds of the cluster-weighted mean difference. The interval thus
    holds both the instance sampling variance and the seed-to-seed variance of the random masks (with
    S = 1 it is the ordinary paired cluster bootstrap). `seed_sd` is the sample sd of the per-seed means.
    """
    S, n, m = X.shape
    valid = ~np.isnan(X).any(axis=0)
    Xz = np.where(valid[None], X, 0.0)
    W = _cluster_weights(clusters, rng, n_boot)
    Ws = _seed_weights(S, rng, n_boot)
    den = W @ valid.astype(np.float64)  # [B, m]
    num = np.einsum("bi,sim->bsm", W, Xz)  # [B, S, m]
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.einsum("bs,bsm->bm", Ws, num) / S / den
    nv = valid.sum(axis=0)
    rows = []
    for j in range(m):
        if nv[j] == 0:
            rows.append(dict(n=0, delta=np.nan, ci_lo=np.nan, ci_hi=np.nan, seed_sd=np.nan))
            continue
        per_seed = Xz[:, :, j].sum(axis=1) / nv[j]
        delta = float(per_seed.mean())
        sd = float(per_seed.std(ddof=1)) if S > 1 else np.nan
        if np.ptp(X[:, valid[:, j], j]) <= 1e-12:  # identical up to float rounding: every resample agrees
            lo = hi = delta
        else:
            lo, hi = _quantiles(boot[:, j], ci)
        rows.append(dict(n=int(nv[j]), delta=delta, ci_lo=lo, ci_hi=hi, seed_sd=sd))
    return rows


def _masked_mean(A: np.ndarray, valid: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where(valid, A, 0.0).sum(axis=0) / valid.sum(axis=0)


def _sources(d: pd.DataFrame) -> pd.Series:
    """Source utterance of each EVC row: column `source` if present, else the id up to its `->target` suffix.

    The targets of one source share its audio and words, so they are resampled together.
    """
    if "source" in d.columns:
        return d["source"].astype(str)
    return d["id"].astype(str).str.rsplit("->", n=1).str[0]


def _prep_pairs(df: pd.DataFrame) -> pd.DataFrame:
    d = _prep_evc(df, extra=["id"])
    d["id"] = d["id"].astype(str)
    d["_source"] = _sources(d)
    if not (d["condition"] == BASELINE).any():
        raise ValueError(f"EVC table has no baseline rows (condition == {BASELINE!r})")
    dup = d.duplicated(["condition", "id", "target"])
    if dup.any():
        row = d[dup].iloc[0]
        raise ValueError(
            f"duplicate instance (id={row['id']!r}, target={row['target']!r}) in condition "
            f"{row['condition']!r}; pairing with the baseline needs unique (id, target) per condition"
        )
    return d


def _wide(d: pd.DataFrame, cond: str) -> pd.DataFrame:
    return d[d["condition"] == cond].set_index(["id", "target"])


def _shared(frames: list[pd.DataFrame], what: str) -> pd.MultiIndex:
    idx = frames[0].index
    for f in frames[1:]:
        idx = idx[idx.isin(f.index)]
    if len(idx) == 0:
        raise ValueError(f"{what} share no (id, target) instances")
    return idx


def _evc_rows(
    ref: pd.DataFrame, others: list[pd.DataFrame], sign: float, rng_names: tuple[str, ...],
    targets: list[str], n_boot: int, seed: int, ci: float, what: str,
) -> list[dict[str, object]]:
    """Per target x metric: mean of `others` (seeds) and of `ref` over their shared instances, and the
    two-level bootstrap of `sign * (other - ref)` clustered by source utterance."""
    src = list(EVC_METRICS.values())
    shared = _shared([ref, *others], what)
    R = ref.loc[shared, src].to_numpy(np.float64)
    Oth = np.stack([o.loc[shared, src].to_numpy(np.float64) for o in others])
    X = sign * (Oth - R[None])
    tgt_of = shared.get_level_values("target").to_numpy()
    source = ref.loc[shared, "_source"].to_numpy()
    rows = []
    for tgt in targets:
        sel = np.ones(len(shared), bool) if tgt == ALL else tgt_of == tgt
        if not sel.any():
            continue
        stats = _two_level_bootstrap(
            X[:, sel], source[sel], _rng_for(seed, *rng_names, tgt), int(n_boot), float(ci)
        )
        valid = ~np.isnan(X[:, sel]).any(axis=0)
        ref_mean = _masked_mean(R[sel], valid)
        oth_mean = np.mean([_masked_mean(o[sel], valid) for o in Oth], axis=0)
        for j, (metric, st) in enumerate(zip(EVC_METRICS, stats, strict=True)):
            rows.append({"target": tgt, "metric": metric, "n": st["n"], "other": float(oth_mean[j]),
                         "ref": float(ref_mean[j]), **{k: st[k] for k in ("delta", "ci_lo", "ci_hi", "seed_sd")}})
    return rows


def evc_deltas(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Per non-baseline condition x target (plus "all") x metric: value, baseline, delta and a CI.

    Paired: only instances present in both the condition and the baseline count, matched on (id, target);
    `value` and `baseline` are means over those shared instances, so `delta = value - baseline` is the
    mean paired difference. The CI is the percentile interval of that mean over `n_boot` resamples of the
    SOURCE utterances (with replacement): all targets of one source move together, since they share its
    audio and words (for one target this is the bootstrap of instances). Each random seed is its own row here.
    """
    _check_boot(n_boot, ci)
    d = _prep_pairs(df)
    base = _wide(d, BASELINE)
    meta = d.drop_duplicates("condition").set_index("condition")[list(CONDITION_COLS[1:])]
    targets = _target_order(d)
    rows: list[dict[str, object]] = []
    for cond in _condition_order(d["condition"]):
        if cond == BASELINE:
            continue
        what = f"condition {cond!r} and the baseline"
        for st in _evc_rows(base, [_wide(d, cond)], 1.0, (cond,), targets, n_boot, seed, ci, what):
            rows.append({"condition": cond, **meta.loc[cond].to_dict(), "target": st["target"],
                         "metric": st["metric"], "n": st["n"], "value": st["other"], "baseline": st["ref"],
                         "delta": st["delta"], "ci_lo": st["ci_lo"], "ci_hi": st["ci_hi"]})
    cols = [*CONDITION_COLS, "target", "metric", "n", "value", "baseline", "delta", "ci_lo", "ci_hi"]
    return pd.DataFrame(rows, columns=cols)


def _random_groups(d: pd.DataFrame) -> dict[tuple, list[str]]:
    """(control_of, r, intervention, alpha) -> the condition ids of that random control's seeds (seed order)."""
    rnd = d[d["selector"].astype(str) == "random"].drop_duplicates("condition")
    out: dict[tuple, list[str]] = {}
    for key, g in rnd.groupby(list(GROUP_COLS), dropna=False, sort=False):
        out[tuple(key)] = g.sort_values("mask_seed", kind="stable")["condition"].tolist()
    return out


def _group_key(row: pd.Series, control_of: str) -> tuple:
    return (control_of, *(row[c] for c in GROUP_COLS[1:]))


def _lookup(groups: dict[tuple, list[str]], key: tuple) -> list[str] | None:
    for k, v in groups.items():
        if k[0] == key[0] and all(_same(a, b) for a, b in zip(k[1:], key[1:], strict=True)):
            return v
    return None


def _same(a: object, b: object) -> bool:
    try:
        fa, fb = float(a), float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return a == b
    return (np.isnan(fa) and np.isnan(fb)) or abs(fa - fb) <= 1e-12


def evc_random_deltas(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """`evc_deltas` with every random control collapsed over its seeds (the report's "by selector" table).

    Non-random conditions are as in `evc_deltas` (`n_seeds = 1`). A random control (one per selector, r,
    intervention, alpha) becomes one row per target x metric: `value` = mean over seeds of the per-seed
    mean, `delta` = mean over seeds of the paired difference to the baseline, CI from the two-level
    bootstrap (source utterances and seeds, see `_two_level_bootstrap`), `delta_seed_sd` = sd across seeds.
    The condition id loses its `-s<seed>` suffix and `mask_seed` is -1.
    """
    _check_boot(n_boot, ci)
    d = _prep_pairs(df)
    base = _wide(d, BASELINE)
    meta = d.drop_duplicates("condition").set_index("condition")[list(CONDITION_COLS[1:])]
    targets = _target_order(d)
    cols = [*CONDITION_COLS, "target", "metric", "n", "value", "baseline", "delta", "ci_lo", "ci_hi",
            "n_seeds", "delta_seed_sd"]
    rows: list[dict[str, object]] = []
    groups = _random_groups(d)
    first_of = {v[0]: v for v in groups.values()}
    for cond in _condition_order(d["condition"]):
        if cond == BASELINE or (meta.loc[cond, "selector"] == "random" and cond not in first_of):
            continue
        conds = first_of.get(cond, [cond])
        name = _SEED_SUFFIX.sub("", cond) if cond in first_of else cond
        what = f"condition(s) {conds} and the baseline"
        m = meta.loc[cond].to_dict()
        if cond in first_of:
            m["mask_seed"] = -1
        for st in _evc_rows(base, [_wide(d, c) for c in conds], 1.0, (name,), targets, n_boot, seed, ci, what):
            rows.append({"condition": name, **m, "target": st["target"], "metric": st["metric"], "n": st["n"],
                         "value": st["other"], "baseline": st["ref"], "delta": st["delta"], "ci_lo": st["ci_lo"],
                         "ci_hi": st["ci_hi"], "n_seeds": len(conds), "delta_seed_sd": st["seed_sd"]})
    return pd.DataFrame(rows, columns=cols)


def evc_vs_random(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Every selector condition against its matched random control, paired on the same instances.

    For a selector condition (selector S, r, intervention, alpha) and the random control of S's mask at the
    same r, intervention and alpha: `value` (S), `random` (mean over seeds) over the instances every one of
    them has, `delta = value - random` = mean over seeds and instances of the paired difference, and its
    CI from the two-level bootstrap (source utterances and seeds). Selectors without a control are skipped.
    """
    _check_boot(n_boot, ci)
    d = _prep_pairs(df)
    meta = d.drop_duplicates("condition").set_index("condition")[list(CONDITION_COLS[1:])]
    targets = _target_order(d)
    groups = _random_groups(d)
    cols = [*CONDITION_COLS[:-1], "random_condition", "target", "metric", "n", "value", "random", "delta",
            "ci_lo", "ci_hi", "n_seeds"]
    rows: list[dict[str, object]] = []
    for cond in _condition_order(d["condition"]):
        m = meta.loc[cond]
        if cond == BASELINE or m["selector"] == "random":
            continue
        conds = _lookup(groups, _group_key(m, str(m["selector"])))
        if not conds:
            continue
        rname = _SEED_SUFFIX.sub("", conds[0])
        what = f"condition {cond!r} and its random control {conds}"
        for st in _evc_rows(_wide(d, cond), [_wide(d, c) for c in conds], -1.0, (cond, rname), targets,
                            n_boot, seed, ci, what):
            rows.append({"condition": cond, **{k: m[k] for k in CONDITION_COLS[1:-1]}, "random_condition": rname,
                         "target": st["target"], "metric": st["metric"], "n": st["n"], "value": st["ref"],
                         "random": st["other"], "delta": st["delta"], "ci_lo": st["ci_lo"], "ci_hi": st["ci_hi"],
                         "n_seeds": len(conds)})
    return pd.DataFrame(rows, columns=cols)


# ------------------------------------------------------------------------------------------ SER


def _prep_ser(df: pd.DataFrame) -> pd.DataFrame:
    _require(df, [*_REQUIRED_COND, "mask_emotion", "emotion", "correct"], "SER")
    d = _with_control(df.copy())
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


def _ser_effect_stats(
    Y: np.ndarray, base: np.ndarray, ind: np.ndarray, masks: list[str], emotions: list[str], W: np.ndarray
) -> np.ndarray:
    """[B, 3, E + 1]: SE, ACE, ESS per mask emotion (and their mean) under utterance weights W [B, n].

    `Y` [M, n] correctness of utterance i under mask m (NaN: not evaluated), `base` [n] the baseline's,
    `ind` [n, E] one-hot gold emotion. Accuracies are weighted means, so W = 1 gives `ser_effects`' values.
    """
    valid = ~np.isnan(Y)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.einsum("bi,mi,ie->bme", W, np.where(valid, Y, 0.0), ind) / np.einsum(
            "bi,mi,ie->bme", W, valid.astype(np.float64), ind
        )
        bacc = (W @ (base[:, None] * ind)) / (W @ ind)
    C = (acc - bacc[:, None, :]) * 100.0  # [B, M, E]
    B, E = W.shape[0], len(emotions)
    out = np.full((B, 3, E + 1), np.nan)
    for j, e in enumerate(emotions):
        if e not in masks:
            continue
        i = masks.index(e)
        others = [k for k in range(len(masks)) if k != i]
        se = C[:, i, j]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: no cross masks
            ace = np.nanmean(C[:, others, j], axis=1) if others else np.full(B, np.nan)
        out[:, 0, j], out[:, 1, j], out[:, 2, j] = se, ace, se - ace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out[:, :, E] = np.nanmean(out[:, :, :E], axis=2)
    return out


def _ser_arrays(
    d: pd.DataFrame, conds: list[str], ids: pd.Index, emotions: list[str]
) -> tuple[list[np.ndarray], list[str]]:
    """Per condition: correctness [M, n] of each shared utterance under each mask emotion (emotion order)."""
    masks = sorted(set(d[d["condition"].isin(conds)]["mask_emotion"]) - {""},
                   key=lambda e: (emotions.index(e) if e in emotions else len(emotions), e))
    out = []
    for c in conds:
        g = d[(d["condition"] == c) & (d["mask_emotion"] != "")]
        Y = g.pivot_table(index="mask_emotion", columns="id", values="correct", aggfunc="mean")
        out.append(Y.reindex(index=masks, columns=ids).to_numpy(np.float64))
    return out, masks


def _ser_boot(
    d: pd.DataFrame, ref: list[str] | None, seeds: list[str], emotions: list[str],
    rng: np.random.Generator, n_boot: int, ci: float,
) -> dict[str, dict[str, float]]:
    """SE/ACE/ESS of the mean over `seeds` (minus those of `ref`, paired, when given) with a two-level
    bootstrap over utterances (all mask emotions of an utterance move together) and seeds."""
    base_t = d[d["condition"] == BASELINE].drop_duplicates("id").set_index("id")
    ids = base_t.index
    for c in [*(ref or []), *seeds]:
        ids = ids[ids.isin(d.loc[d["condition"] == c, "id"])]
    if len(ids) == 0:
        raise ValueError(f"SER conditions {seeds} share no utterances with the baseline")
    base = base_t.loc[ids, "correct"].to_numpy(np.float64)
    ind = (base_t.loc[ids, "emotion"].to_numpy()[:, None] == np.array(emotions)[None]).astype(np.float64)
    Ys, masks = _ser_arrays(d, [*(ref or []), *seeds], ids, emotions)
    Yr, Ys = (Ys[0], Ys[1:]) if ref else (None, Ys)
    W = np.vstack([np.ones((1, len(ids))), _cluster_weights(ids.to_numpy(), rng, n_boot)])
    Ws = _seed_weights(len(seeds), rng, n_boot)
    per = np.stack([_ser_effect_stats(Y, base, ind, masks, emotions, W) for Y in Ys])  # [S, 1+B, 3, E+1]
    point_seed = per[:, 0]
    boot = np.einsum("bs,sbke->bke", Ws, np.nan_to_num(per[:, 1:], nan=0.0)) / len(seeds)
    nan_any = np.isnan(per[:, 1:]).any(axis=0)
    boot[nan_any] = np.nan
    point = point_seed.mean(axis=0)
    sd = point_seed.std(axis=0, ddof=1) if len(seeds) > 1 else np.full(point.shape, np.nan)
    if Yr is not None:
        sel = _ser_effect_stats(Yr, base, ind, masks, emotions, W)
        point, boot = sel[0] - point, sel[1:] - boot
    out: dict[str, dict[str, float]] = {}
    for j, e in enumerate([*emotions, MEAN]):
        row: dict[str, float] = {}
        for k, name in enumerate(("SE", "ACE", "ESS")):
            row[name] = float(point[k, j])
            lo, hi = _quantiles(boot[:, k, j], ci) if not np.isnan(point[k, j]) else (np.nan, np.nan)
            row[f"{name}_lo"], row[f"{name}_hi"] = lo, hi
            if Yr is None:
                row[f"{name}_seed_sd"] = float(sd[k, j])
        out[e] = row
    return out


_SER_STATS = ["SE", "SE_lo", "SE_hi", "ACE", "ACE_lo", "ACE_hi", "ESS", "ESS_lo", "ESS_hi"]


def _ser_masked(df: pd.DataFrame, n_boot: int, ci: float):
    """The SER rows, their emotions, the masked (non-baseline, emotion-specific) rows, each condition's
    settings and the random controls grouped by the mask they control: what both random comparisons start from."""
    _check_boot(n_boot, ci)
    d = _prep_ser(df)
    if not (d["condition"] == BASELINE).any():
        raise ValueError(f"SER table has no baseline rows (condition == {BASELINE!r})")
    emotions = sorted(d["emotion"].unique().tolist())
    nb = d[(d["condition"] != BASELINE) & (d["mask_emotion"] != "")]
    meta = nb.drop_duplicates("condition").set_index("condition")[list(CONDITION_COLS[1:])]
    return d, emotions, nb, meta, _random_groups(nb)


def ser_random_effects(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """SE / ACE / ESS per mask setting with bootstrap intervals, random controls collapsed over their seeds.

    Selector settings get the bootstrap over utterances (`n_seeds = 1`); a random control's seeds are
    averaged and its interval comes from the two-level bootstrap over utterances and seeds, so it widens
    when the seeds disagree (`<stat>_seed_sd` = sd across seeds). Label-agnostic rows (no mask emotion)
    are skipped, as in `ser_effects`.
    """
    d, emotions, nb, meta, groups = _ser_masked(df, n_boot, ci)
    first_of = {v[0]: v for v in groups.values()}
    rows = []
    for cond in _condition_order(nb["condition"]):
        m = meta.loc[cond].to_dict()
        if m["selector"] == "random" and cond not in first_of:
            continue
        conds = first_of.get(cond, [cond])
        name = _SEED_SUFFIX.sub("", cond) if cond in first_of else cond
        if cond in first_of:
            m["mask_seed"] = -1
        res = _ser_boot(d, None, conds, emotions, _rng_for(seed, name), int(n_boot), float(ci))
        for e, st in res.items():
            rows.append({"condition": name, **m, "mask_emotion": e, **st, "n_seeds": len(conds)})
    cols = [*CONDITION_COLS, "mask_emotion", *_SER_STATS, "n_seeds", "SE_seed_sd", "ACE_seed_sd", "ESS_seed_sd"]
    return pd.DataFrame(rows, columns=cols)


def ser_vs_random(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Every selector setting's SE / ACE / ESS minus those of its matched random control (mean over seeds),
    on the same utterances, with the two-level bootstrap interval (utterances and seeds)."""
    d, emotions, nb, meta, groups = _ser_masked(df, n_boot, ci)
    rows = []
    for cond in _condition_order(nb["condition"]):
        m = meta.loc[cond]
        if m["selector"] == "random":
            continue
        conds = _lookup(groups, _group_key(m, str(m["selector"])))
        if not conds:
            continue
        rname = _SEED_SUFFIX.sub("", conds[0])
        res = _ser_boot(d, [cond], conds, emotions, _rng_for(seed, cond, rname), int(n_boot), float(ci))
        for e, st in res.items():
            rows.append({"condition": cond, **{k: m[k] for k in CONDITION_COLS[1:-1]}, "random_condition": rname,
                         "mask_emotion": e, **st, "n_seeds": len(conds)})
    cols = [*CONDITION_COLS[:-1], "random_condition", "mask_emotion", *_SER_STATS, "n_seeds"]
    return pd.DataFrame(rows, columns=cols)


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


def _wa_w(y: np.ndarray, W: np.ndarray) -> np.ndarray:
    return (W * y).sum(-1) / W.sum(-1)


def _uar_w(y: np.ndarray, emo: np.ndarray, W: np.ndarray) -> np.ndarray:
    """UAR under row weights W [..., n]: mean over the classes present of each class's weighted accuracy."""
    accs = []
    for k in np.unique(emo):
        on = emo == k
        with np.errstate(invalid="ignore", divide="ignore"):
            accs.append((W[..., on] * y[on]).sum(-1) / W[..., on].sum(-1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(accs, -1), -1)


def ser_injections(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """The label-agnostic injections (`two_pass`, `mix`, `union`: no mask emotion) against the baseline, over
    the utterances both have: WA and UAR, their paired changes (`dWA`, `dUAR`, fractions) with bootstrap
    intervals resampling utterances, and the first pass's audit: `first_pred_acc` (share of pseudo-labels
    equal to the gold label) and `first_from_answer` (share taken from a parsed answer, not the scores)."""
    from .interventions import INTERVENTIONS

    _check_boot(n_boot, ci)
    cols = [*CONDITION_COLS, "n", "WA", "UAR", "WA_base", "UAR_base", "dWA", "dWA_lo", "dWA_hi", "dUAR", "dUAR_lo",
            "dUAR_hi", "first_pred_acc", "first_from_answer"]
    d = _prep_ser(df)
    agn = {n for n in INTERVENTIONS.names() if INTERVENTIONS[n].routing != "label"}
    base = d[d["condition"].eq(BASELINE)].drop_duplicates("id").set_index("id")
    rows = []
    for cond, g in d[d["intervention"].astype(str).isin(agn)].groupby("condition", sort=False):
        g = g.drop_duplicates("id").set_index("id")
        ids = sorted(set(g.index) & set(base.index))
        if not ids:
            continue
        emo = base.loc[ids, "emotion"].to_numpy()
        y1 = g.loc[ids, "correct"].to_numpy(float)
        y0 = base.loc[ids, "correct"].to_numpy(float)
        W = _cluster_weights(np.array(ids, dtype=object), _rng_for(seed, cond), int(n_boot))
        one = np.ones(len(ids))
        row = {c: g[c].iloc[0] for c in CONDITION_COLS}
        row.update(n=len(ids), WA=float(_wa_w(y1, one)), UAR=float(_uar_w(y1, emo, one)),
                   WA_base=float(_wa_w(y0, one)), UAR_base=float(_uar_w(y0, emo, one)))
        boot = {"WA": _wa_w(y1, W) - _wa_w(y0, W), "UAR": _uar_w(y1, emo, W) - _uar_w(y0, emo, W)}
        for name, b in boot.items():
            row[f"d{name}"] = row[name] - row[f"{name}_base"]
            row[f"d{name}_lo"], row[f"d{name}_hi"] = _quantiles(b, ci)
        has_first = "first_pred" in g.columns and g.loc[ids, "first_pred"].notna().all()  # union: no first pass
        fp = g.loc[ids, "first_pred"].astype(str).to_numpy() if has_first else None
        row["first_pred_acc"] = float(np.mean(fp == emo)) if has_first else np.nan
        src = g.loc[ids, "first_pred_from"] if has_first and "first_pred_from" in g.columns else None
        row["first_from_answer"] = float(src.eq("answer").mean()) if src is not None else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)
