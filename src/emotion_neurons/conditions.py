"""The evaluation grid: selector x r x intervention x alpha (x random seed), plus the baseline."""

from __future__ import annotations

from typing import Any

BASELINE: dict[str, Any] = {
    "condition": "baseline", "selector": "none", "r": 0.0, "intervention": "none", "alpha": 0.0, "mask_seed": 0,
    "mask": "",
}


def mask_name(selector: str, r: float, seed: int | None = None) -> str:
    name = f"{selector}-r{r:g}"
    return f"{name}-s{seed}" if selector == "random" else name


def masks(select_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every mask the config asks for: one per selector x r (x seed for random)."""
    out = []
    for sel in select_cfg["selectors"]:
        for r in select_cfg["r"]:
            seeds = range(int(select_cfg.get("random_seeds", 5))) if sel == "random" else [int(select_cfg.get("seed", 0))]
            for s in seeds:
                out.append({"mask": mask_name(sel, r, s), "selector": sel, "r": float(r), "mask_seed": int(s)})
    return out


def grid(select_cfg: dict[str, Any], eval_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Conditions to evaluate; `deactivate` has no strength, `steer` takes each alpha."""
    out = [dict(BASELINE)]
    for m in masks(select_cfg):
        for iv in eval_cfg["interventions"]:
            alphas = [1.0] if iv == "deactivate" else [float(a) for a in eval_cfg["alpha"]]
            for a in alphas:
                cid = f"{m['selector']}-r{m['r']:g}-{iv}" + (f"-a{a:g}" if iv == "steer" else "")
                if m["selector"] == "random":  # seed last, as metrics.average_random expects
                    cid += f"-s{m['mask_seed']}"
                out.append({**m, "condition": cid, "intervention": iv, "alpha": a})
    ids = [c["condition"] for c in out]
    if len(ids) != len(set(ids)):
        raise ValueError("evaluation grid has duplicate conditions; check select.r and evaluate.alpha for repeats")
    return out


def by_id(select_cfg: dict[str, Any], eval_cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["condition"]: c for c in grid(select_cfg, eval_cfg)}
