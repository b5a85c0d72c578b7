"""The demo's declared target, evaluated with the pipeline's own stages (docs/miniature.md section 5).

Per training seed of the miniature: stage 1 (generate with capture) on the identification voices, SER judge,
filter (`filter.keep`), aggregate (`stats.aggregate`), selectors (`selectors.select`), deactivation on a
stratified set of unseen-voice instances (`generate.stratified_cap`, `generate.run` with `hooks.Intervention`),
gold-answer probability from the SER outputs' first-step option probabilities. The matched random controls are
the pipeline's (`selectors.random_control`, `select.random.match` and `.seeds`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def gold_prob(df: pd.DataFrame) -> np.ndarray:
    """Probability of the gold option at the first generated step (from the `option_probs` column)."""
    return np.array([json.loads(p)[e] for p, e in zip(df["option_probs"], df["emotion"], strict=True)], dtype=float)


def run_seed(model_dir: Path, cfg: dict[str, Any], work: Path, *, per_emotion: int, r: float,
             selectors: tuple[str, ...], random_seeds: int, batch_size: int = 16, reuse: bool = False) -> pd.DataFrame:
    """All evaluation rows of one miniature: baseline and every (selector or control, mask emotion) deactivation.

    Columns: id, speaker, emotion (gold), correct, gold_prob, mask (`baseline`, selector, or `random:<sel>:<k>`),
    mask_emotion; `attrs` holds the identification summary (successes, kept per emotion, mask sizes).
    """
    import torch

    from ..interventions import InterventionSpec
    from ..prompts import parse_answer
    from ..selectors import random_control, select
    from ..stages.filter import keep
    from ..stages.generate import load_adapter, run, settings_from, stratified_cap
    from ..stages.prepare import build_instances, read_dataset
    from ..stats import aggregate, load_aggregate

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    tcfg = cfg["tasks"]["ser"]
    labels = list(tcfg["labels"])
    model_cfg = {**cfg["model"], "id": str(model_dir)}
    adapter = load_adapter(model_cfg)
    settings = settings_from("ser", tcfg, model_cfg)
    rows = read_dataset(cfg["datasets"][tcfg["dataset"]])
    insts = build_instances("ser", tcfg, rows)
    ident = [i for i in insts if i.split == "ident"]
    held, _ = stratified_cap([i for i in insts if i.split == "eval"], per_emotion * len(labels),
                             int(cfg["evaluate"].get("sample_seed", 0)))

    def judged(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        opts = [o.split("|") for o in df["options"]]
        df["pred"] = [parse_answer(t if isinstance(t, str) else "", o) for t, o in zip(df["output_text"], opts, strict=True)]
        df["correct"] = df["pred"].eq(df["emotion"])
        df["gold_prob"] = gold_prob(df)
        return df

    # stages 1-3: capture on identification voices, filter on success, aggregate P over the configured spans
    store = work / "stats.zarr"
    if reuse and (work / "agg.zarr").exists() and (work / "ident.tsv").is_file():
        # stage 1 of an earlier call completed (its aggregate exists): read its table, keep its store
        ident_df = judged(pd.read_csv(work / "ident.tsv", sep="\t", keep_default_na=False, dtype={"output_text": str}))
    else:
        ident_df = judged(run(adapter, ident, settings, out_table=work / "ident.tsv", wav_dir=None,
                              batch_size=batch_size, stats_out=store))
    ident_df["success"] = ident_df["correct"]
    fcfg = cfg["filter"]
    kept, summary = keep(ident_df, "ser", labels, int(fcfg["c"]), int(fcfg.get("seed", 0)),
                         use_filter=bool(fcfg.get("enabled", True)), on_too_few=fcfg.get("on_too_few", "error"),
                         min_per_emotion=int(fcfg.get("min_per_emotion", 1)))
    groups = {e: kept.loc[kept["emotion"] == e, "id"].tolist() for e in labels}
    spans = tcfg["spans"]
    aggregate([store], groups, list(spans), work / "agg.zarr")
    arrays, _ = load_aggregate(work / "agg.zarr")
    P = arrays["P"]

    scfg = cfg["select"]
    masks: dict[str, np.ndarray] = {}
    for sel in selectors:
        # each selector's parameters from `select.<name>`, as the select stage passes them
        masks[sel] = select(P, sel, r, scfg.get("scope", "global"), int(scfg.get("seed", 0)), M=arrays.get("M"),
                            **dict(scfg.get(sel) or {}))
        for k in range(random_seeds):
            masks[f"random:{sel}:{k}"] = random_control(masks[sel], k, match=(scfg.get("random") or {}).get("match", "layers"),
                                                        stream=sel)

    out = [judged(run(adapter, held, settings, out_table=work / "base.tsv", wav_dir=None, batch_size=batch_size))
           .assign(mask="baseline", mask_emotion="")]
    spec = InterventionSpec("deactivate", 0.0, cfg["evaluate"].get("positions", "all"))
    for name, m in masks.items():
        mt = torch.from_numpy(m).bool()
        for e_idx, emo in enumerate(labels):
            df = run(adapter, held, settings, out_table=work / "cond.tsv", wav_dir=None, batch_size=batch_size,
                     intervention=spec, mask_fn=lambda b, _e=e_idx, _m=mt: _m[[_e] * len(b)])
            out.append(judged(df).assign(mask=name, mask_emotion=emo))
    res = pd.concat(out, ignore_index=True)[["id", "speaker", "emotion", "correct", "gold_prob", "mask", "mask_emotion"]]
    res.attrs["ident"] = summary.to_dict("records")
    res.attrs["mask_sizes"] = {n: m.sum(axis=(1, 2)).tolist() for n, m in masks.items() if ":" not in n}
    res.attrs["ident_uar"] = float(ident_df.groupby("emotion")["correct"].mean().mean())
    return res


def _cell(res: pd.DataFrame, mask: str, mask_emotion: str, emotion: str, col: str) -> pd.Series:
    d = res[(res["mask"] == mask) & (res["mask_emotion"] == mask_emotion) & (res["emotion"] == emotion)]
    return d.set_index("id")[col].sort_index()


def effects(res: pd.DataFrame, selector: str, col: str = "gold_prob") -> pd.DataFrame:
    """Per mask emotion e: SE, ACE, RCE, ESS of `selector` on `col` (accuracy or gold probability, x100), its
    matched random controls' mean SE, and the paired per-instance self-cell differences to them (`d`)."""
    emotions = sorted(res["emotion"].unique())
    base = {e: _cell(res, "baseline", "", e, col) for e in emotions}
    rand = sorted(m for m in res["mask"].unique() if m.startswith(f"random:{selector}:"))

    def change(mask: str, me: str, e: str) -> float:
        return 100.0 * float(_cell(res, mask, me, e, col).astype(float).mean() - base[e].astype(float).mean())

    rows = []
    for e in emotions:
        others = [x for x in emotions if x != e]
        se = change(selector, e, e)
        ace = float(np.mean([change(selector, x, e) for x in others]))
        rce = float(np.mean([change(selector, e, x) for x in others]))
        se_rand = float(np.mean([change(m, e, e) for m in rand])) if rand else np.nan
        own = _cell(res, selector, e, e, col).astype(float)
        ctrl = pd.concat([_cell(res, m, e, e, col).astype(float) for m in rand], axis=1).mean(axis=1)
        d = (100.0 * (own - ctrl)).to_numpy()
        rows.append({"selector": selector, "mask_emotion": e, "SE": se, "ACE": ace, "RCE": rce, "ESS": se - ace,
                     "SE_random": se_rand, "d_mean": float(d.mean()), "d": d.tolist()})
    return pd.DataFrame(rows)


def bootstrap_ci(groups: list[np.ndarray], n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> tuple[float, float, float]:
    """Mean of all values and a bootstrap interval resampling instances within each group (seed x emotion)."""
    rng = np.random.default_rng(seed)
    allv = np.concatenate(groups)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        stats[b] = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups]).mean()
    lo, hi = np.quantile(stats, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(allv.mean()), float(lo), float(hi)


def verdict(per_seed: list[pd.DataFrame], selectors: tuple[str, ...]) -> dict[str, Any]:
    """The declared target per selector: paired d pooled over emotions and seeds (CI < 0) and no row-wise shift."""
    out: dict[str, Any] = {}
    for sel in selectors:
        eff = pd.concat([effects(res, sel, "gold_prob").assign(seed=s) for s, res in enumerate(per_seed)])
        acc = pd.concat([effects(res, sel, "correct").assign(seed=s) for s, res in enumerate(per_seed)])
        mean, lo, hi = bootstrap_ci([np.asarray(d) for d in eff["d"]])
        shift = float((eff["SE"] - eff["RCE"]).mean())
        out[sel] = {
            "d_gold_prob": mean, "ci": [lo, hi], "SE_minus_RCE": shift,
            "holds": bool(hi < 0 and shift < 0),
            "gold_prob": eff.drop(columns="d").to_dict("records"),
            "accuracy": acc.drop(columns="d").to_dict("records"),
        }
    out["met"] = any(out[s]["holds"] for s in selectors)
    return out


def load_demo_config(repo: Path) -> dict[str, Any]:
    """config.yaml with config/demo.yaml over it (dicts merged key by key, as Snakemake merges config files)."""
    import yaml

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    cfg = merge(yaml.safe_load((repo / "config.yaml").read_text()), yaml.safe_load((repo / "config/demo.yaml").read_text()))
    cfg["datasets"]["esd"]["root"] = str(repo / cfg["datasets"]["esd"]["root"])
    return cfg


def evaluate_declared(repo: Path, work: Path, seeds: list[int] | None = None, reuse: bool = False) -> dict[str, Any]:
    """Evaluate `demo_target` of config/demo.yaml on the built miniatures; per-seed tables under `work`.

    `reuse`: a seed whose `rows.tsv` (and `ident.json`) already exist under `work` is read back, not rerun (so
    seeds can be run in separate processes and pooled afterwards)."""
    cfg = load_demo_config(repo)
    t = cfg["demo_target"]
    # the target is declared with the success filter on, whatever the demo run itself uses
    cfg["filter"] = {**cfg["filter"], "enabled": bool(t.get("filter", True))}
    sels = tuple(t["selectors"])
    per_seed = []
    baseline_uar = []
    idents = {}
    for seed in seeds if seeds is not None else t["training_seeds"]:
        d = Path(work) / f"seed{seed}"
        if reuse and (d / "rows.tsv").is_file() and (d / "ident.json").is_file():
            res = pd.read_csv(d / "rows.tsv", sep="\t", keep_default_na=False)
            res["correct"] = res["correct"].astype(str).eq("True")
            res["gold_prob"] = res["gold_prob"].astype(float)
            idents[seed] = json.loads((d / "ident.json").read_text())
        else:
            res = run_seed(repo / ".tiny" / f"qwen-seed{seed}", cfg, d, per_emotion=int(t["eval_per_emotion"]),
                           r=float(t["r"]), selectors=sels, random_seeds=int(t["random_seeds"]), reuse=reuse)
            res.to_csv(d / "rows.tsv", sep="\t", index=False)
            idents[seed] = {"ident": res.attrs["ident"], "mask_sizes": res.attrs["mask_sizes"],
                            "ident_uar": res.attrs["ident_uar"]}
            (d / "ident.json").write_text(json.dumps(idents[seed], indent=2, default=float))
        base = res[res["mask"] == "baseline"]
        baseline_uar.append(float(base.groupby("emotion")["correct"].mean().mean()))
        per_seed.append(res)
    v = verdict(per_seed, sels)
    v["baseline_uar"] = baseline_uar
    v["ident"] = idents
    return v


if __name__ == "__main__":
    import argparse
    import logging

    ap = argparse.ArgumentParser(description="Evaluate config/demo.yaml's demo_target on the built miniatures")
    ap.add_argument("--repo", default=".")
    ap.add_argument("--work", default=".tiny/target")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--reuse", action="store_true", help="read back seeds whose rows.tsv exist under --work")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    v = evaluate_declared(Path(a.repo).resolve(), Path(a.work), a.seeds, a.reuse)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    (Path(a.work) / "verdict.json").write_text(json.dumps(v, indent=2, default=float) + "\n")
    print(json.dumps({s: {k: v[s][k] for k in ("d_gold_prob", "ci", "SE_minus_RCE", "holds")} for s in v
                      if s in v.get("selectors", ()) or (isinstance(v[s], dict) and "holds" in v[s])}
                     | {"met": v["met"], "baseline_uar": v["baseline_uar"]}, indent=2))
