"""One self-contained HTML report per run, organised as the papers' figures (issue 12).

Every figure carries its 95% interval (from the metric tables, or a bootstrap over utterances for the baseline)
and one sentence saying how to read it. A section whose data the run does not have is left out and the page
says why, so the page never shows a plot of nothing. Images and audio are embedded (base64), so the file opens
offline; the raw tables sit collapsed at the end with links to their TSVs.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import io
import json
import logging
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..config import load_params  # noqa: E402
from ..io import read_table, write_text  # noqa: E402
from ..selectors import layer_distribution, load_mask, overlap  # noqa: E402
from .prepare import issue_summary  # noqa: E402
from .sweep import jaccard  # noqa: E402

log = logging.getLogger(__name__)

#: Packages whose versions the provenance section lists.
PACKAGES: tuple[str, ...] = ("emotion-neurons", "torch", "transformers", "numpy", "pandas", "scipy", "zarr",
                             "funasr", "faster-whisper", "jiwer", "whisper-normalizer", "snakemake", "matplotlib")
RANDOM_COLOR, SELECTOR_COLOR = "#999999", "#1f77b4"

esc = html.escape


# ------------------------------------------------------------------------------------------ small helpers


def _png(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def _table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    # a missing value (no random control for a selector row, no seed sd for one seed) is an empty cell, not "NaN"
    return df.to_html(index=False, float_format=lambda x: floatfmt.format(x), border=0, classes="t", escape=True,
                      na_rep="")


def fmt_ci(value: float, lo: float | None, hi: float | None, scale: float = 1.0, digits: int = 1) -> str:
    """`12.3 [10.1, 14.5]`; `n/a` for a missing value, the value alone for a missing interval."""
    def f(x: float | None) -> str:  # + 0.0 turns -0.0 into 0.0
        return "n/a" if x is None or not np.isfinite(x) else f"{round(x * scale, digits) + 0.0:.{digits}f}"

    if value is None or not np.isfinite(value):
        return "n/a"
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{f(value)} [interval n/a]"
    return f"{f(value)} [{f(lo)}, {f(hi)}]"


def figure(fid: str, title: str, how: str, body: str) -> str:
    """One figure: anchor, title, the "how to read it" sentence, the content."""
    return (f'<section class="fig" id="{esc(fid)}"><h3>{esc(title)}</h3>'
            f'<p class="how"><b>How to read it:</b> {esc(how)}</p>{body}</section>')


def absent(fid: str, title: str, why: str) -> str:
    """A section the run has no data for: its title and the reason, no figure."""
    return f'<section class="fig absent" id="{esc(fid)}"><h3>{esc(title)}</h3><p class="why">Not shown: {esc(why)}</p></section>'


def label(row: pd.Series | dict[str, Any]) -> str:
    """Readable setting name: `cas r=0.05 steer a=1`, a random control as `random(cas) ...`."""
    sel = str(row["selector"])
    ctl = str(row.get("control_of", "") or "")
    if ctl in ("nan", "None"):
        ctl = ""
    if sel == "random" and ctl:
        sel = f"random({ctl})"
    out = f"{sel} r={float(row['r']):g} {row['intervention']}"
    from ..interventions import INTERVENTIONS

    iv = str(row["intervention"])
    if iv in INTERVENTIONS and INTERVENTIONS[iv].uses_alpha:
        out += f" a={float(row['alpha']):g}"
    return out


def _is_random(df: pd.DataFrame) -> pd.Series:
    return df["selector"].astype(str).eq("random")


# ------------------------------------------------------------------------------------------ bootstrap


def bootstrap_ci(
    stat: Callable[[np.ndarray], float], n_units: int, n_boot: int, seed: int, ci: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of `stat(indices)` over `n_boot` resamples of `n_units` units with replacement."""
    if n_units == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n_units, n_units)) for _ in range(int(n_boot))], dtype=float)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    a = (1 - ci) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def ser_baseline(rows: pd.DataFrame, n_boot: int, seed: int, ci: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """UAR and WA of the unintervened model with bootstrap intervals over utterances: name -> (value, lo, hi)."""
    d = rows[rows["status"].eq("ok")] if "status" in rows.columns else rows
    if "mask_emotion" in d.columns:  # label-agnostic rows only: the unintervened answers
        d = d[d["mask_emotion"].isna() | d["mask_emotion"].astype(str).eq("")]
    y = d["correct"].astype(float).to_numpy()
    emo = d["emotion"].astype(str).to_numpy()

    def uar(idx: np.ndarray) -> float:
        e, yy = emo[idx], y[idx]
        return float(np.mean([yy[e == k].mean() for k in np.unique(e)])) if len(idx) else float("nan")

    def wa(idx: np.ndarray) -> float:
        return float(y[idx].mean()) if len(idx) else float("nan")

    full = np.arange(len(y))
    return {name: (fn(full), *bootstrap_ci(fn, len(y), n_boot, seed, ci)) for name, fn in (("UAR", uar), ("WA", wa))}


def evc_baseline(rows: pd.DataFrame, n_boot: int, seed: int, ci: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Target accuracy, corpus WER and joint success of the baseline, bootstrapped over source utterances
    (the targets of one source share its audio, so they are resampled together)."""
    d = rows[rows["status"].eq("ok")] if "status" in rows.columns else rows
    src = d["id"].astype(str).str.rsplit("->", n=1).str[0].to_numpy()
    units, inv = np.unique(src, return_inverse=True)
    cols = {"target accuracy": "emotion_ok", "success": "success"}
    out: dict[str, tuple[float, float, float]] = {}
    members = [np.flatnonzero(inv == u) for u in range(len(units))]

    def rows_of(idx: np.ndarray) -> np.ndarray:
        return np.concatenate([members[i] for i in idx]) if len(idx) else np.array([], int)

    for name, col in cols.items():
        if col not in d.columns:
            continue
        v = d[col].astype(float).to_numpy()

        def mean(idx: np.ndarray, v: np.ndarray = v) -> float:
            r = rows_of(idx)
            return float(np.nanmean(v[r])) if len(r) else float("nan")

        out[name] = (mean(np.arange(len(units))), *bootstrap_ci(mean, len(units), n_boot, seed, ci))
    if {"wer_edits", "ref_words"} <= set(d.columns):
        e, n = d["wer_edits"].astype(float).to_numpy(), d["ref_words"].astype(float).to_numpy()

        def cwer(idx: np.ndarray) -> float:
            r = rows_of(idx)
            return float(e[r].sum() / n[r].sum()) if len(r) and n[r].sum() > 0 else float("nan")

        out["corpus WER"] = (cwer(np.arange(len(units))), *bootstrap_ci(cwer, len(units), n_boot, seed, ci))
    return out


# ------------------------------------------------------------------------------------------ run contents


def _read_judged(tdir: Path, cond: str) -> pd.DataFrame | None:
    # grouped evaluation (emotion_neurons.group): eval/group-<g>/judged-<shard>/<condition>.tsv beside
    # eval/group-<g>/shard-<shard>/<condition>/ (its outputs and EVC audio)
    files = sorted((tdir / "eval").glob(f"group-*/judged-*/{cond}.tsv"))
    parts = []
    for f in files:
        if not f.read_text().strip():
            continue
        # ids and speakers are names ("0016"), not numbers
        t = pd.read_csv(f, sep="\t", keep_default_na=False, na_values=[""],
                        dtype={c: str for c in ("id", "speaker", "text", "asr_text", "pred")})
        for c in ("text", "asr_text", "pred"):
            if c in t.columns:
                t[c] = t[c].fillna("")
        if not t.empty:
            t["_shard_dir"] = str(f.parent.parent / f.parent.name.replace("judged-", "shard-") / cond)
            parts.append(t)
    return pd.concat(parts, ignore_index=True) if parts else None


def load_task(run: Path, task: str, wer_max: float | None = None, mask_names: list[str] | None = None,
              ident: str | None = None) -> dict[str, Any]:
    """Everything the report shows for one task: metric tables, filter summary, masks, baseline rows (EVC
    rows decided as the metrics stage decides them: target realised, content kept under `wer_max`).

    `ident`: the primary identification setting (`c<c>-filtered`, emotion_neurons.stages.sweep); the main sections
    show its rows only, `sweeps` holds the c sweep and the filtering ablation over all settings."""
    from .filter import decide

    tdir = run / task
    base = _read_judged(tdir, "baseline")
    if base is not None and "status" in base.columns:
        base = base[base["status"].eq("ok")].reset_index(drop=True)
    if base is not None and task == "evc" and not base.empty:
        base = decide(base, "evc", wer_max)
    tables = {p.stem: read_table(p) for p in sorted((tdir / "metrics").glob("*.tsv"))}
    sweeps = {k: tables.pop(k) for k in SWEEP_TABLES if k in tables}
    if ident:
        tables = {k: _one_setting(v, ident) for k, v in tables.items()}
    filt = tdir / "filter" / ident / "summary.tsv" if ident else tdir / "filter" / "summary.tsv"
    masks = {}
    # the masks of this config only (a folder can hold masks of an earlier grid)
    files = ([tdir / "masks" / f"{n}.safetensors" for n in sorted(mask_names)] if mask_names is not None
             else sorted((tdir / "masks").glob("*.safetensors")))
    for m in files:
        masks[m.stem] = load_mask(m)
    return {"task": task, "dir": tdir, "tables": tables, "filter": read_table(filt) if filt.exists() else None,
            "masks": masks, "baseline": base, "sweeps": sweeps}


#: Tables of emotion_neurons.stages.sweep that span every identification setting.
SWEEP_TABLES: tuple[str, ...] = ("c_sweep", "filter_ablation", "task_transfer", "dataset_transfer", "dataset_overlap")


def _one_setting(t: pd.DataFrame, ident: str) -> pd.DataFrame:
    """The rows of one identification setting, without the setting's columns (the main sections' view)."""
    if "ident" not in t.columns:
        return t
    cols = [c for c in ("ident", "c", "filtered", "masks_from") if c in t.columns]
    return t[t["ident"].astype(str).eq(ident)].drop(columns=cols).reset_index(drop=True)


# ------------------------------------------------------------------------------------------ headline


def best_setting(task: str, tables: dict[str, pd.DataFrame]) -> pd.Series | None:
    """The selector setting with the largest paired advantage over its matched random control (SER: ESS of the
    mean over emotions; EVC: target accuracy over all targets, among steering settings when there are any). Picking the best after the fact flatters it;
    the selector comparison shows all of them."""
    vr = tables.get("vs_random")
    if vr is None or vr.empty:
        return None
    if task == "ser":
        d = vr[vr["mask_emotion"].astype(str).eq("mean")].dropna(subset=["ESS"])
        return None if d.empty else d.loc[d["ESS"].idxmax()]
    d = vr[vr["target"].astype(str).eq("all") & vr["metric"].eq("target_acc")].dropna(subset=["delta"])
    if d["intervention"].eq("steer").any():  # EVC converts by steering (Paper A); deactivation is a control
        d = d[d["intervention"].eq("steer")]
    return None if d.empty else d.loc[d["delta"].idxmax()]


def headline(t: dict[str, Any], n_boot: int, seed: int, ci: float) -> str:
    task, tables = t["task"], t["tables"]
    items: list[str] = []
    base = t["baseline"]
    if task == "ser":
        s = tables.get("summary")
        if base is not None and {"correct", "emotion"} <= set(base.columns):
            for k, (v, lo, hi) in ser_baseline(base, n_boot, seed, ci).items():
                items.append(f"<li>Baseline SER {k}: <b class='num' data-key='baseline-{k}'>{fmt_ci(v, lo, hi, 100)}</b> %</li>")
        elif s is not None and not s.empty:
            b = s[s["condition"].eq("baseline")].iloc[0]
            for k in ("UAR", "WA"):
                items.append(f"<li>Baseline SER {k}: <b class='num'>{fmt_ci(float(b[k]), None, None, 100)}</b> % (no per-utterance rows for an interval)</li>")
        best = best_setting(task, tables)
        eff = tables.get("effects_by_selector")
        if best is not None:
            name = label(best)
            own = None
            if eff is not None:
                own = eff[eff["condition"].eq(best["condition"]) & eff["mask_emotion"].astype(str).eq("mean")]
            if own is not None and not own.empty:
                o = own.iloc[0]
                sig = ", ".join(f"{k} {fmt_ci(o[k], o.get(k + '_lo'), o.get(k + '_hi'))}" for k in ("SE", "ACE", "ESS"))
                items.append(f"<li>Best selector <b>{esc(name)}</b> (mean over mask emotions, points): "
                             f"<span class='num' data-key='best-signature'>{sig}</span></li>")
            sig = ", ".join(f"Δ{k} {fmt_ci(best[k], best.get(k + '_lo'), best.get(k + '_hi'))}" for k in ("SE", "ACE", "ESS"))
            items.append(f"<li>… minus its matched random control <code>{esc(str(best['random_condition']))}</code> "
                         f"(mean of {int(best['n_seeds'])} seeds): <span class='num' data-key='best-vs-random'>{sig}</span></li>")
        else:
            items.append("<li>No selector has a matched random control in this run, so no causal signature.</li>")
    else:
        if base is not None:
            for k, (v, lo, hi) in evc_baseline(base, n_boot, seed, ci).items():
                scale = 1.0 if k == "corpus WER" else 100.0
                unit = "" if k == "corpus WER" else " %"
                items.append(f"<li>Baseline EVC {k}: <b class='num' data-key='baseline-{k}'>"
                             f"{fmt_ci(v, lo, hi, scale, 3 if k == 'corpus WER' else 1)}</b>{unit}</li>")
        best = best_setting(task, tables)
        if best is not None:
            items.append(f"<li>Best selector <b>{esc(label(best))}</b>: target accuracy "
                         f"{100 * float(best['value']):.1f} % vs its matched random control "
                         f"{100 * float(best['random']):.1f} % (mean of {int(best['n_seeds'])} seeds); paired difference "
                         f"<span class='num' data-key='best-vs-random'>{fmt_ci(best['delta'], best['ci_lo'], best['ci_hi'], 100)}</span> points</li>")
        else:
            items.append("<li>No selector has a matched random control in this run, so no causal signature.</li>")
    how = ("each number is followed by its 95% interval in brackets; a selector's neurons matter beyond their "
           "number only when the interval of its difference to the matched random control excludes 0.")
    return figure(f"{task}-headline", f"{task.upper()} headline", how, "<ul>" + "".join(items) + "</ul>")


# ------------------------------------------------------------------------------------------ figures


def _bars(ax: Any, labels: list[str], y: np.ndarray, lo: np.ndarray, hi: np.ndarray, colors: list[str]) -> None:
    x = np.arange(len(labels))
    ax.bar(x, y, color=colors)
    err = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
    ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="none", ecolor="k", capsize=3, lw=1)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, labels, rotation=55, ha="right", fontsize=8)


def injections(t: dict[str, Any]) -> str:
    """SER label-agnostic injections (Paper B: two_pass, mix, union) against the baseline, from the metrics
    table `injections.tsv` (`metrics.ser_injections`): WA and UAR, the paired change with its interval, and
    the audit of the first pass."""
    fid, title = "ser-agnostic", "SER label-agnostic injections (two_pass, mix, union) vs the baseline"
    inj = t["tables"].get("injections")
    if inj is None or inj.empty:
        return absent(fid, title, "no label-agnostic injection was evaluated (evaluate.interventions)")

    def pct(x: Any) -> str:
        return "n/a" if x is None or not np.isfinite(float(x)) else f"{100 * float(x):.1f} %"

    rows = []
    for r in inj.to_dict("records"):
        rows.append({
            "setting": label(r), "n": int(r["n"]),
            "WA": f"{100 * float(r['WA']):.1f}", "ΔWA vs baseline": fmt_ci(r["dWA"], r["dWA_lo"], r["dWA_hi"], 100),
            "UAR": f"{100 * float(r['UAR']):.1f}",
            "ΔUAR vs baseline": fmt_ci(r["dUAR"], r["dUAR_lo"], r["dUAR_hi"], 100),
            "first pass = gold": pct(r["first_pred_acc"]), "from parsed answer": pct(r["first_from_answer"]),
        })
    how = ("the test label is unknown: an unintervened first pass predicts an emotion (two_pass steers its mask), "
           "gives option scores (mix steers sum_e softmax(s/tau)_e m_e) or is not needed (union steers the OR of all "
           "masks). Δ is the paired change over the same utterances, in points, with a bootstrap interval over "
           "utterances; the first pass's prediction and scores of every utterance are in its outputs (first_pred, "
           "first_scores, injection_weights).")
    return figure(fid, title, how, _table(pd.DataFrame(rows)))


def _main_rows(task: str, tables: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame | None, str, str, str, str]:
    """(rows, value col, lo col, hi col, y label) of the per-setting effect the comparison plots."""
    if task == "ser":
        e = tables.get("effects_by_selector")
        if e is None or e.empty:
            return None, "", "", "", ""
        return e[e["mask_emotion"].astype(str).eq("mean")], "ESS", "ESS_lo", "ESS_hi", "ESS = SE − ACE (points)"
    d = tables.get("deltas_by_selector")
    if d is None or d.empty:
        return None, "", "", "", ""
    d = d[d["target"].astype(str).eq("all") & d["metric"].eq("target_acc")].copy()
    for c in ("delta", "ci_lo", "ci_hi"):
        d[c] = d[c].astype(float) * 100
    return d, "delta", "ci_lo", "ci_hi", "Δ target accuracy vs baseline (points)"


def interval_table(task: str, vr: pd.DataFrame) -> str:
    """Every selector minus its matched random control: each statistic that has `<stat>_lo`/`<stat>_hi`
    columns (SER) or every metric (EVC), as `value [lo, hi]`, so new statistics show without code changes."""
    rows = []
    if task == "ser":
        d = vr[vr["mask_emotion"].astype(str).eq("mean")]
        stats = [c for c in d.columns if f"{c}_lo" in d.columns and f"{c}_hi" in d.columns]
        known = {"condition", "selector", "r", "intervention", "alpha", "mask_seed", "control_of", "random_condition",
                 "mask_emotion", "n_seeds"}
        # columns a later table may add to tell rows apart (e.g. which measure the effect is on)
        extra = [c for c in d.columns if c not in known and c not in stats and not c.endswith(("_lo", "_hi"))
                 and not pd.api.types.is_numeric_dtype(d[c])]
        for _, r in d.iterrows():
            rows.append({"setting": label(r), **{c: r[c] for c in extra}, "random control": r["random_condition"],
                         "seeds": r.get("n_seeds"), **{f"Δ{k}": fmt_ci(r[k], r[f"{k}_lo"], r[f"{k}_hi"]) for k in stats}})
    else:
        d = vr[vr["target"].astype(str).eq("all")]
        for (_cond, _), g in d.groupby(["condition", "random_condition"], sort=False):
            r0 = g.iloc[0]
            row = {"setting": label(r0), "random control": r0["random_condition"], "seeds": r0.get("n_seeds")}
            for _, r in g.iterrows():
                scale = 1.0 if "wer" in str(r["metric"]) or "cer" in str(r["metric"]) else 100.0
                row[f"Δ{r['metric']}"] = fmt_ci(r["delta"], r["ci_lo"], r["ci_hi"], scale, 3 if scale == 1 else 1)
            rows.append(row)
    return _table(pd.DataFrame(rows)) if rows else ""


def selector_comparison(task: str, tables: dict[str, pd.DataFrame]) -> str:
    fid, title = f"{task}-selectors", f"Selector comparison, {task.upper()} (Paper A, Figure 3)"
    d, v, lo, hi, ylab = _main_rows(task, tables)
    if d is None or d.empty:
        return absent(fid, title, "the metric tables have no per-selector effects")
    vr = tables.get("vs_random")
    ncol = 2 if vr is not None and not vr.empty else 1
    fig, axes = plt.subplots(1, ncol, figsize=(min(16, max(5 * ncol, 4 + 0.45 * len(d) * ncol)), 3.6), squeeze=False)
    labs = [label(r) for _, r in d.iterrows()]
    colors = [RANDOM_COLOR if lb.startswith("random") else SELECTOR_COLOR for lb in labs]
    _bars(axes[0, 0], labs, d[v].to_numpy(float), d[lo].to_numpy(float), d[hi].to_numpy(float), colors)
    axes[0, 0].set_ylabel(ylab)
    axes[0, 0].set_title("against the baseline (grey: matched random)", fontsize=9)
    if ncol == 2:
        if task == "ser":
            r = vr[vr["mask_emotion"].astype(str).eq("mean")]
            y, lo_, hi_ = r["ESS"], r["ESS_lo"], r["ESS_hi"]
        else:
            r = vr[vr["target"].astype(str).eq("all") & vr["metric"].eq("target_acc")]
            y, lo_, hi_ = r["delta"] * 100, r["ci_lo"] * 100, r["ci_hi"] * 100
        _bars(axes[0, 1], [label(x) for _, x in r.iterrows()], y.to_numpy(float), lo_.to_numpy(float),
              hi_.to_numpy(float), [SELECTOR_COLOR] * len(r))
        axes[0, 1].set_title("minus its matched random control (paired)", fontsize=9)
    body = _png(fig, title) + (interval_table(task, vr) if ncol == 2 else "")
    how = ("bars are the effect of each selector's mask (blue) and of its size-matched random control (grey), "
           "whiskers the 95% interval; on the right, a bar whose whisker stays clear of 0 is a selector that beats "
           "random neurons of the same number and layers; the table lists every paired difference with its interval.")
    return figure(fid, title, how, body)


def _line_name(row: dict[str, Any], swept: str) -> str:
    """A setting's label without the swept parameter: the name of its line in a sensitivity plot."""
    parts = label(row).split(" ")
    drop = {"r": "r=", "alpha": "a="}.get(swept, "\0")  # c is not part of the label
    return " ".join(p for p in parts if not p.startswith(drop))


def sensitivity(task: str, tables: dict[str, pd.DataFrame], param: str) -> str:
    """Effect against r (Figure 4) or against alpha (dose-response), one line per selector with its band."""
    names = {"r": ("r", "sensitivity to the neuron ratio r (Paper A, Figure 4)"),
             "alpha": ("alpha", "dose-response: sensitivity to the steering strength alpha"),
             "c": ("c", "sensitivity to the success instance size c (Paper A, Figure 5)")}
    col, what = names[param]
    fid, title = f"{task}-sens-{param}", f"{task.upper()}: {what}"
    d, v, lo, hi, ylab = _main_rows(task, tables)
    if d is None or d.empty:
        return absent(fid, title, "the metric tables have no per-selector effects")
    if param == "alpha":
        d = d[d["intervention"].eq("steer")]
    vals = sorted(d[col].astype(float).unique())
    if len(vals) < 2:
        return absent(fid, title, f"this run has {len(vals)} value(s) of {col} ({', '.join(f'{x:g}' for x in vals) or 'none'}); "
                      f"list several in the config ({ {'r': 'select.r', 'alpha': 'evaluate.alpha', 'c': 'filter.c'}[param]}) "
                      "to see the curve")
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    d = d.assign(_line=[_line_name(r, col) for r in d.to_dict("records")])
    for name, g in d.groupby("_line", sort=True):
        g = g.sort_values(col)
        x = g[col].astype(float).to_numpy()
        style = "--" if str(name).startswith("random") else "-"
        ax.plot(x, g[v].to_numpy(float), style, marker="o", label=name)
        ax.fill_between(x, g[lo].to_numpy(float), g[hi].to_numpy(float), alpha=0.15)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel(col)
    ax.set_ylabel(ylab)
    ax.legend(fontsize=7)
    how = (f"each line follows one selector as {col} grows, the band is its 95% interval; dashed lines are the "
           "matched random controls; a selector line that leaves its random line's band is where the choice of neurons matters.")
    return figure(fid, title, how, _png(fig, title))


def c_sweep(task: str, sweeps: dict[str, pd.DataFrame]) -> str:
    """Effect against c (Paper A, Figure 5): one line per selector, filtering at the primary setting."""
    fid, title = f"{task}-sens-c", f"{task.upper()}: sensitivity to the success instance size c (Paper A, Figure 5)"
    t = sweeps.get("c_sweep")
    if t is None or t.empty:
        return absent(fid, title, "the run has no c_sweep table (metrics of an older run)")
    return sensitivity(task, {_main_key(task): t}, "c")


def _main_key(task: str) -> str:
    return "effects_by_selector" if task == "ser" else "deltas_by_selector"


def _cell(r: dict[str, Any], v: str, lo: str, hi: str) -> str:
    return f"{float(r[v]):.3g} [{float(r[lo]):.3g}, {float(r[hi]):.3g}]"


def _effect_rows(task: str, t: pd.DataFrame, cols: dict[str, str]) -> tuple[pd.DataFrame, str]:
    """The main per-setting effect of a sweep-style table, one row per setting: its label, the columns `cols`
    (table column -> shown name) and the effect with its interval; and the effect's name."""
    d, v, lo, hi, ylab = _main_rows(task, {_main_key(task): t})
    rows = [{"setting": label(r), **{name: r[c] for c, name in cols.items()}, ylab: _cell(r, v, lo, hi)}
            for r in d.to_dict("records")]
    return pd.DataFrame(rows), ylab


def task_transfer(task: str, sweeps: dict[str, pd.DataFrame]) -> str:
    """The other task's masks on this task (SER masks steering EVC, EVC masks deactivating SER)."""
    other = "SER" if task == "evc" else "EVC"
    how_iv = "steer" if task == "evc" else "deactivate"
    fid, title = f"{task}-transfer-task", f"{task.upper()}: cross-task transfer ({other} masks {how_iv} {task.upper()})"
    t = sweeps.get("task_transfer")
    if t is None or t.empty:
        return absent(fid, title, "cross-task transfer is off (transfer.tasks: false) or one of the tasks is disabled")
    rows, _ = _effect_rows(task, t, {"masks_from": "masks from"})
    how = (f"masks selected on {other} identification, applied to {task.upper()} held-out data through the shared "
           "emotion names; compare each selector with its random control and with the same selector's own-task effect above.")
    return figure(fid, title, how, _table(rows))


def filter_ablation(task: str, sweeps: dict[str, pd.DataFrame]) -> str:
    """Filtered vs unfiltered identification at the primary c: each setting's effect side by side."""
    fid, title = f"{task}-sens-filter", f"{task.upper()}: filtering ablation (filtered vs unfiltered identification)"
    t = sweeps.get("filter_ablation")
    if t is None or t.empty:
        return absent(fid, title, "the run has no filter_ablation table (metrics of an older run)")
    rows, _ = _effect_rows(task, t, {"filtered": "filtered", "c": "c"})
    vals = sorted(rows["filtered"].astype(str).unique()) if not rows.empty else []
    if len(vals) < 2:
        return absent(fid, title, f"this run identifies with filter.enabled = {', '.join(vals)} only; list "
                      "[true, false] to compare filtered with unfiltered identification")
    rows = rows.drop_duplicates(["setting", "filtered"])
    how = ("each selector setting identified once on judged successes (filtered) and once on instances kept "
           "regardless of success (unfiltered), same c; a gap between the two rows of a setting is what filtering buys.")
    return figure(fid, title, how, _table(rows))


def dataset_transfer(task: str, sweeps: dict[str, pd.DataFrame]) -> str:
    """Masks identified on one dataset evaluated on another (transfer.datasets, Paper B): per selector setting
    the matrix source x target of its effect, every pair's SE/ACE/ESS (EVC: deltas) with intervals, and the
    Jaccard overlap of the two datasets' masks."""
    fid, title = f"{task}-transfer-dataset", f"{task.upper()}: cross-dataset transfer (masks of one dataset on another)"
    t = sweeps.get("dataset_transfer")
    if t is None or t.empty:
        return absent(fid, title, "transfer.datasets lists no [source, target] pair")
    d, v, lo, hi, ylab = _main_rows(task, {_main_key(task): t})
    if d is None or d.empty:
        return absent(fid, title, "the dataset_transfer table has no per-selector effects")
    # each selector setting followed by its matched random control
    d = d.assign(_setting=[label(r) for r in d.to_dict("records")],
                 _owner=[str(r["control_of"]) if r["selector"] == "random" else str(r["selector"]) for r in d.to_dict("records")],
                 _rand=d["selector"].eq("random"))
    d = d.sort_values(["_owner", "r", "intervention", "alpha", "_rand"], kind="stable")
    parts = []
    for setting, g in d.groupby("_setting", sort=False):
        m = g.assign(_c=[_cell(r, v, lo, hi) for r in g.to_dict("records")]).pivot_table(
            index="source_dataset", columns="target_dataset", values="_c", aggfunc="first")
        m.index = [f"masks from {x}" for x in m.index]
        m.columns = [f"on {x}" for x in m.columns]
        parts.append(f"<h4>{esc(setting)}: {esc(ylab)}</h4>" + m.fillna("not run").to_html(border=0, classes="t"))
    if task == "ser":
        stats = [k for k in ("SE", "ACE", "ESS", "RCE") if {k, f"{k}_lo", f"{k}_hi"} <= set(d.columns)]
        rows = [{"setting": r["_setting"], "masks from": r["source_dataset"], "on": r["target_dataset"],
                 **{k: fmt_ci(r[k], r[f"{k}_lo"], r[f"{k}_hi"]) for k in stats},
                 "Jaccard": "n/a" if pd.isna(r.get("jaccard")) else f"{float(r['jaccard']):.3f}"}
                for r in d.to_dict("records")]
        parts.append("<h4>Every pair (mean over mask emotions, points)</h4>" + _table(pd.DataFrame(rows)))
    ov = sweeps.get("dataset_overlap")
    if ov is not None and not ov.empty:
        mean = ov[ov["mask_emotion"].astype(str).eq("mean")]
        parts.append("<h4>Mask overlap (Jaccard) between datasets, mean over emotions</h4>" + _table(
            mean.rename(columns={"source_dataset": "dataset A", "target_dataset": "dataset B"})[
                ["dataset A", "dataset B", "mask", "jaccard"]], "{:.3f}"))
        parts.append("<details><summary>per emotion</summary>" + _table(
            ov[~ov["mask_emotion"].astype(str).eq("mean")], "{:.3f}") + "</details>")
    else:
        parts.append("<p class='why'>No mask overlap: no pair's target dataset is identified too (list it as a "
                     "source, or pair the task's own dataset).</p>")
    how = ("each matrix is one selector setting: a cell is the effect of masks selected on the row's dataset "
           "(its identification speakers) applied to the column's dataset's held-out speakers, with its 95% "
           "interval; the task's own dataset with itself is the in-dataset effect of the sections above. A selector "
           "transfers when its off-diagonal cells keep the sign of the diagonal and stay clear of its random "
           "control's cells; Jaccard is the share of neurons the two datasets' masks of the same selector have in "
           "common (1 = the same neurons, 0 = none).")
    return figure(fid, title, how, "".join(parts))


def change_matrices(tables: dict[str, pd.DataFrame]) -> str:
    fid, title = "ser-change", "SER change matrices (mask emotion × evaluated emotion), per selector"
    ch = tables.get("change")
    if ch is None or ch.empty:
        return absent(fid, title, "the run has no SER change table")
    ch = ch[ch["mask_emotion"].astype(str).ne("") & ch["mask_emotion"].notna()]
    keys = [c for c in ("selector", "control_of", "r", "intervention", "alpha") if c in ch.columns]
    emos = [c for c in ch.columns if c not in {*keys, "condition", "mask_seed", "mask_emotion"}]
    imgs = []
    for k, g in ch.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, k, strict=True))
        mat = g.groupby("mask_emotion", sort=False)[emos].mean()  # random controls: mean over seeds
        M = mat.to_numpy(float)
        lim = max(1.0, float(np.nanmax(np.abs(M))) if M.size else 1.0)
        fig, ax = plt.subplots(figsize=(0.7 * len(emos) + 2, 0.5 * len(mat) + 1.4))
        im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(emos)), emos, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(mat)), mat.index, fontsize=8)
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                if np.isfinite(M[i, j]):
                    ax.text(j, i, f"{M[i, j]:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xlabel("evaluated (gold) emotion")
        ax.set_ylabel("mask emotion")
        name = label(row)
        ax.set_title(name + (" (mean over seeds)" if row.get("selector") == "random" else ""), fontsize=9)
        fig.colorbar(im, ax=ax, label="Δ accuracy (points)")
        imgs.append(_png(fig, name))
    how = ("cell (i, j) is how many accuracy points the model's answers on emotion j changed when emotion i's neurons "
           "were intervened on; a selective mask is a blue (negative) diagonal on white, a whole blue row is a mask "
           "that harms everything; intervals of the diagonal (SE) and its off-diagonal mean (ACE) are in the selector figure.")
    return figure(fid, title, how, "<div class='grid'>" + "".join(imgs) + "</div>")


def _selector_masks(masks: dict[str, tuple[np.ndarray, dict]]) -> dict[str, tuple[np.ndarray, dict]]:
    return {k: v for k, v in masks.items() if not k.startswith("random-")}


def layer_figures(task: str, masks: dict[str, tuple[np.ndarray, dict]]) -> str:
    fid, title = f"{task}-layers", f"{task.upper()}: where the neurons are: layer distribution per selector and emotion"
    sm = _selector_masks(masks)
    if not sm:
        return absent(fid, title, "the run has no selector masks")
    imgs = []
    for name, (mask, meta) in sm.items():
        dist = layer_distribution(mask)
        fig, ax = plt.subplots(figsize=(max(4, 0.3 * dist.shape[1] + 2.5), 0.4 * dist.shape[0] + 1.3))
        im = ax.imshow(dist, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(meta["emotions"])), meta["emotions"], fontsize=8)
        ax.set_xticks(range(dist.shape[1]))
        ax.set_xlabel("layer")
        ax.set_title(f"{name}: neurons per layer", fontsize=9)
        fig.colorbar(im, ax=ax)
        imgs.append(_png(fig, name))
    how = "each row is one emotion's mask, each column a layer, the colour the number of selected neurons there; masks are counts, not estimates, so there is no interval."
    return figure(fid, title, how, "<div class='grid'>" + "".join(imgs) + "</div>")


def _heat(M: np.ndarray, names: list[str], title: str) -> str:
    fig, ax = plt.subplots(figsize=(0.6 * len(names) + 2.2, 0.5 * len(names) + 1.5))
    im = ax.imshow(M, cmap="magma", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if M[i, j] < 0.5 else "k")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return _png(fig, title)


def overlap_figures(all_masks: dict[str, dict[str, tuple[np.ndarray, dict]]]) -> str:
    """Jaccard overlap between emotions (per mask), between selectors (per emotion) and between tasks."""
    fid, title = "overlap", "Mask overlap (Jaccard) between emotions, selectors and tasks"
    imgs, notes = [], []
    for task, masks in all_masks.items():
        sm = _selector_masks(masks)
        for name, (mask, meta) in sm.items():
            imgs.append(_heat(overlap(mask), list(meta["emotions"]), f"{task} {name}: between emotions"))
        names = sorted(sm)
        if len(names) >= 2:
            emos = list(sm[names[0]][1]["emotions"])
            same = all(list(sm[n][1]["emotions"]) == emos and sm[n][0].shape == sm[names[0]][0].shape for n in names)
            if same:
                M = np.array([[np.mean([jaccard(sm[a][0][e], sm[b][0][e]) for e in range(len(emos))]) for b in names]
                              for a in names])
                imgs.append(_heat(M, names, f"{task}: between selectors (mean over emotions)"))
    tasks = list(all_masks)
    if len(tasks) >= 2:
        rows = []
        a, b = tasks[0], tasks[1]
        for name in sorted(set(_selector_masks(all_masks[a])) & set(_selector_masks(all_masks[b]))):
            (ma, ea), (mb, eb) = all_masks[a][name], all_masks[b][name]
            if ma.shape[1:] != mb.shape[1:]:
                continue
            for i, e in enumerate(ea["emotions"]):
                if e in eb["emotions"]:
                    rows.append({"mask": name, "emotion": e, f"Jaccard {a}-{b}": jaccard(ma[i], mb[list(eb["emotions"]).index(e)])})
        if rows:
            imgs.append(f"<h4>between tasks</h4>{_table(pd.DataFrame(rows), '{:.3f}')}")
    notes.append("Between datasets: in each task's cross-dataset transfer section (transfer.datasets).")
    if not imgs:
        return absent(fid, title, "the run has no selector masks")
    how = ("1 means two masks chose the same neurons, 0 none in common; a high overlap between emotions says the "
           "selector finds shared (emotion-general) neurons rather than emotion-specific ones.")
    return figure(fid, title, how, "<div class='grid'>" + "".join(imgs) + "</div>" +
                  "".join(f"<p class='why'>{esc(n)}</p>" for n in notes))


# ------------------------------------------------------------------------------------------ audio


def _data_uri(path: Path) -> str:
    return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()


def _audio(path: Path | None) -> str:
    if path is None or not path.is_file():
        return "<span class='why'>no audio</span>"
    return f'<audio controls preload="auto" src="{_data_uri(path)}"></audio>'


def _out_wav(row: pd.Series) -> Path | None:
    rel = row.get("output_wav")
    if not isinstance(rel, str) or not rel:
        return None
    return Path(row["_shard_dir"]) / rel


def stratified_sample(rows: pd.DataFrame, per_target: int, seed: int) -> pd.DataFrame:
    """Up to `per_target` rows per target emotion, spread round-robin over speakers, seeded."""
    rng = np.random.default_rng(seed)
    picks = []
    speakers = sorted(rows["speaker"].astype(str).unique())
    for k, (_tgt, g) in enumerate(rows.groupby("target", sort=True)):
        by_spk = {s: list(rng.permutation(h.index.to_numpy())) for s, h in g.groupby(g["speaker"].astype(str))}
        # each target starts at the next speaker, so a small sample still covers every speaker
        order = [s for s in speakers[k % len(speakers):] + speakers[:k % len(speakers)] if s in by_spk]
        chosen: list[Any] = []
        while len(chosen) < per_target and any(by_spk.values()):
            for s in order:
                if by_spk[s] and len(chosen) < per_target:
                    chosen.append(by_spk[s].pop(0))
        picks.extend(chosen)
    return rows.loc[picks]


def evc_audio(t: dict[str, Any], per_target: int, seed: int) -> str:
    fid, title = "evc-audio", "EVC audio: source, baseline and steered conversion (unseen speakers)"
    base = t["baseline"]
    best = best_setting("evc", t["tables"])
    if base is None or "output_wav" not in base.columns:
        return absent(fid, title, "the run has no judged baseline conversions")
    cond = None
    if best is not None:
        cond = str(best["condition"])
    else:
        s = t["tables"].get("summary")
        if s is not None:
            c = s[~_is_random(s) & s["condition"].ne("baseline")]
            cond = str(c["condition"].iloc[0]) if not c.empty else None
    steered = _read_judged(t["dir"], cond) if cond else None
    if steered is None:
        return absent(fid, title, "the run has no intervened conversions to compare")
    b = base[base["status"].eq("ok")]
    if "split" in b.columns:
        b = b[b["split"].astype(str).eq("eval")]
    st = steered[steered["status"].eq("ok")].set_index("id")
    b = b[b["id"].isin(st.index)]
    if b.empty:
        return absent(fid, title, "no source utterance has both a baseline and a steered conversion")
    sample = stratified_sample(b.reset_index(drop=True), per_target, seed)
    head = ("<tr><th>target</th><th>speaker</th><th>source</th><th>baseline</th><th>judge (baseline)</th>"
            f"<th>steered: {esc(cond)}</th><th>judge (steered)</th><th>reference words</th></tr>")
    trs = []
    for _, r in sample.iterrows():
        s = st.loc[r["id"]]

        def judge_cell(x: pd.Series) -> str:
            return (f"{esc(str(x.get('pred', '')) or '(no emotion: no audio)')} (p<sub>target</sub> = {float(x.get('target_prob', float('nan'))):.2f})"
                    f"<br/><span class='asr'>heard: “{esc(str(x.get('asr_text', '') or ''))}”</span>")

        trs.append(
            f"<tr><td>{esc(str(r['target']))}</td><td>{esc(str(r['speaker']))}</td>"
            f"<td>{_audio(Path(str(r['wav'])))}<br/>{esc(str(r['emotion']))}</td>"
            f"<td>{_audio(_out_wav(r))}</td><td>{judge_cell(r)}</td>"
            f"<td>{_audio(_out_wav(s))}</td><td>{judge_cell(s)}</td><td class='asr'>{esc(str(r.get('text', '')))}</td></tr>")
    how = ("listen across a row: the source, the unintervened conversion and the steered one of the same utterance "
           "to the same target; the judge's label and its probability of the target say whether the target was heard, "
           "the transcript whether the words survived.")
    return figure(fid, title, how, f"<table class='t audio'>{head}{''.join(trs)}</table>")


# ------------------------------------------------------------------------------------------ provenance


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    out["python"] = platform.python_version()
    return out


def provenance(params: dict[str, Any], tasks: dict[str, dict[str, Any]]) -> str:
    parts = [f"<p>written {esc(_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC'))}; model "
             f"<code>{esc(str(params.get('model')))}</code>; report code hash <code>{esc(str(params.get('code')))}</code>"]
    codes = params.get("codes") or {}
    if codes:
        parts.append("; stage code hashes " + ", ".join(f"{esc(k)} <code>{esc(str(v))}</code>" for k, v in sorted(codes.items())))
    parts.append("</p>")
    parts.append("<h4>Package versions</h4>" + _table(pd.DataFrame(sorted(package_versions().items()), columns=["package", "version"])))
    for task, t in tasks.items():
        if t["filter"] is not None:
            parts.append(f"<h4>{esc(task.upper())}: identification instances kept per emotion (stage 2)</h4>" + _table(t["filter"]))
    parts.append(input_issues(params))
    cfg = params.get("config")
    if cfg is not None:
        parts.append("<details><summary>Configuration</summary><pre>" + esc(json.dumps(cfg, indent=1, sort_keys=True, default=str)) + "</pre></details>")
    return "<section id='provenance'><h2>Provenance</h2>" + "".join(parts) + "</section>"


def input_issues(params: dict[str, Any]) -> str:
    """Stage 0's skipped and warned-about input, once: the counts per task (and per transfer dataset,
    `<task>.<dataset>`) and, collapsed, the list of skipped files."""
    parts = ["<h4>Input skipped or warned about (stage 0)</h4><p class='how'><b>How to read it:</b> files of the "
             "corpus that stage 0 skipped (bad audio, too long) or kept with a warning (clipping, unmatched transcript "
             "lines), per task; the file lists are bad_audio.tsv and warnings.tsv of the stage-1 cache.</p>"]
    summary = issue_summary(params.get("data_tables") or {})
    if not summary.empty:
        parts.append(_table(summary))
    for unit, d in (params.get("stage1") or {}).items():
        bad_path = Path(d) / "bad_audio.tsv"
        if not bad_path.is_file():
            parts.append(f"<p class='why'>{esc(unit.upper())}: no bad_audio.tsv found.</p>")
            continue
        b = read_table(bad_path)
        if b.empty:
            parts.append(f"<p>{esc(unit.upper())}: none skipped.</p>")
        else:
            parts.append(f"<details><summary>{esc(unit.upper())}: {len(b)} file(s) skipped.</summary>{_table(b)}</details>")
    return "".join(parts)


def raw_tables(tasks: dict[str, dict[str, Any]], out_dir: Path) -> str:
    parts = ["<section id='raw'><h2>Raw tables</h2>"]
    for task, t in tasks.items():
        for name, df in t["tables"].items():
            path = t["dir"] / "metrics" / f"{name}.tsv"
            rel = os.path.relpath(path.resolve(), out_dir.resolve())
            parts.append(f"<details><summary>{esc(task)}/{esc(name)} ({len(df)} rows) — "
                         f"<a href='{esc(rel)}'>{esc(name)}.tsv</a></summary>{_table(df)}</details>")
    return "".join(parts) + "</section>"


# ------------------------------------------------------------------------------------------ page


CSS = ("body{font-family:sans-serif;max-width:1250px;margin:auto;padding:0 1em;color:#222}"
       "table.t{border-collapse:collapse;font-size:12px} table.t td,table.t th{padding:2px 6px;border-bottom:1px solid #ddd}"
       ".how{background:#f4f7fb;padding:4px 8px;border-left:3px solid #1f77b4;font-size:14px}"
       ".why{color:#777;font-style:italic} .absent h3{color:#777} .grid{display:flex;flex-wrap:wrap;gap:8px}"
       ".asr{font-size:11px;color:#555} audio{width:210px} img{max-width:100%} nav a{margin-right:1em}")


def build(params: dict[str, Any], out: str | Path = "report.html") -> str:
    run = Path(params["run"])
    out_dir = Path(out).parent
    rep = params.get("report", {}) or {}
    title = esc(rep.get("title", "Emotion-sensitive neurons"))
    ev = params.get("evaluate", {}) or {}
    n_boot, seed, ci = int(ev.get("bootstrap", 1000)), int(ev.get("seed", 0)), float(ev.get("ci", 0.95))
    wer_max = (params.get("filter") or {}).get("wer_max")
    tasks = {task: load_task(run, task, wer_max, params.get("masks"), params.get("ident")) for task in params["tasks"]}
    body = [f"<h1>{title}</h1><p>model <code>{esc(str(params.get('model')))}</code>, run <code>{esc(str(run))}</code>. "
            "Effects are in accuracy points (×100) unless stated; brackets are 95% intervals.</p>",
            "<nav>" + "".join(f"<a href='#{t}-headline'>{t.upper()}</a>" for t in tasks) +
            "<a href='#overlap'>overlap</a><a href='#provenance'>provenance</a><a href='#raw'>raw tables</a></nav>"]
    body.append("<h2>Headline</h2>" + "".join(headline(t, n_boot, seed, ci) for t in tasks.values()))
    for task, t in tasks.items():
        tb = t["tables"]
        body.append(f"<h2>{task.upper()}</h2>")
        body.append(selector_comparison(task, tb))
        body.append(sensitivity(task, tb, "r"))
        body.append(sensitivity(task, tb, "alpha"))
        body.append(c_sweep(task, t["sweeps"]))
        body.append(filter_ablation(task, t["sweeps"]))
        body.append(task_transfer(task, t["sweeps"]))
        body.append(dataset_transfer(task, t["sweeps"]))
        if task == "ser":
            body.append(change_matrices(tb))
            body.append(injections(t))
        body.append(layer_figures(task, t["masks"]))
        if task == "evc":
            body.append(evc_audio(t, int(rep.get("audio_per_emotion", 2)), seed))
    body.append("<h2>Overlap</h2>" + overlap_figures({k: t["masks"] for k, t in tasks.items()}))
    body.append(provenance(params, tasks))
    body.append(raw_tables(tasks, out_dir))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the HTML report")
    ap.add_argument("--params", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    write_text(a.out, build(load_params(a.params), a.out))
    print(f"report: {Path(a.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
