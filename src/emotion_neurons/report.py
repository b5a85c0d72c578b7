"""One self-contained HTML report: filter summaries, metric tables, selector comparison, layer heatmaps."""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .config import load_params  # noqa: E402
from .data import issue_summary  # noqa: E402
from .io import read_table, write_text  # noqa: E402
from .selectors import layer_distribution, load_mask  # noqa: E402

log = logging.getLogger(__name__)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def _table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    return df.to_html(index=False, float_format=lambda x: floatfmt.format(x), border=0, classes="t")


def condition_label(df: pd.DataFrame) -> pd.Series:
    """Readable condition name from the setting columns (random masks averaged over seeds have no seed;
    a random control names the selector whose mask it matches)."""
    alpha = df["alpha"].map(lambda a: f"{float(a):g}")
    sel = df["selector"].astype(str)
    if "control_of" in df.columns:
        ctl = df["control_of"].fillna("").astype(str)
        sel = sel.where(~((sel == "random") & (ctl != "")), "random(" + ctl + ")")
    label = sel + " r=" + df["r"].map(lambda r: f"{float(r):g}") + " " + df["intervention"]
    return label.where(df["intervention"] != "steer", label + " a=" + alpha)


def selector_plot(task: str, tables: dict[str, pd.DataFrame]) -> str:
    """EVC: change of target accuracy vs baseline (95% CI). SER: specificity ESS = SE - ACE (mean over emotions).

    Random masks appear once, as the mean over their seeds.
    """
    if task == "evc":
        d = tables.get("deltas_by_selector", tables.get("deltas"))
        d = d[(d["target"] == "all") & (d["metric"] == "target_acc")]
        if d.empty:
            return "<p>no deltas</p>"
        d = d.assign(label=condition_label(d))
        y, lo, hi, label = d["delta"] * 100, d["ci_lo"] * 100, d["ci_hi"] * 100, "Δ target-emotion accuracy (points)"
    else:
        e = tables.get("effects_by_selector", tables.get("effects"))
        e = e[e["mask_emotion"] == "mean"]
        if e.empty:
            return "<p>no effects</p>"
        d = e.assign(label=condition_label(e))
        lo, hi = (d["ESS_lo"], d["ESS_hi"]) if "ESS_lo" in d.columns else (None, None)
        y, label = d["ESS"], "ESS = SE - ACE (points)"
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(d) + 2), 3.2))
    x = np.arange(len(d))
    colors = ["#888" if c.startswith("random") else "#1f77b4" for c in d["label"]]
    ax.bar(x, y, color=colors)
    if lo is not None:
        ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], fmt="none", ecolor="k", capsize=3, lw=1)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, d["label"], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(label)
    ax.set_title(f"{task.upper()}: selector comparison (grey = matched random controls, mean over seeds)")
    return _png(fig)


def layer_heatmap(path: Path) -> str:
    mask, meta = load_mask(path)
    dist = layer_distribution(mask)
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * dist.shape[1] + 2), 0.4 * dist.shape[0] + 1.2))
    im = ax.imshow(dist, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(meta["emotions"])), meta["emotions"])
    ax.set_xlabel("layer")
    ax.set_title(f"{path.stem}: neurons per layer")
    fig.colorbar(im, ax=ax)
    return _png(fig)


def build(params: dict[str, Any]) -> str:
    run = Path(params["run"])
    title = html.escape(params.get("report", {}).get("title", "Emotion-sensitive neurons"))
    parts = [
        f"<html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:auto} table.t{border-collapse:collapse;font-size:12px}"
        "table.t td,table.t th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right}"
        "</style></head><body>",
        f"<h1>{title}</h1><p>model <code>{html.escape(str(params.get('model')))}</code>, run <code>{run}</code></p>",
    ]
    parts.append("<h3>Input skipped or warned about (stage 0)</h3>" + _table(issue_summary(params.get("data_tables", {}))))
    for task in params["tasks"]:
        tdir = run / task
        parts.append(f"<h2>{task.upper()}</h2><h3>Identification instances kept (stage 2)</h3>")
        parts.append(_table(read_table(tdir / "filter" / "summary.tsv")))
        tables = {p.stem: read_table(p) for p in sorted((tdir / "metrics").glob("*.tsv"))}
        parts.append("<h3>Selector comparison</h3>" + selector_plot(task, tables))
        for name, df in tables.items():
            parts.append(f"<h3>{name}</h3>" + _table(df))
        parts.append("<h3>Layer distribution of each mask</h3>")
        for m in sorted((tdir / "masks").glob("*.safetensors")):
            parts.append(layer_heatmap(m))
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the HTML report")
    ap.add_argument("--params", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    write_text(a.out, build(load_params(a.params)))
    log.info("report: %s", Path(a.out).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
