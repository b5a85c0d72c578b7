"""The evaluation grid: selector x r x intervention x alpha, the matched random controls, plus the baseline."""

from __future__ import annotations

import hashlib
import re
from typing import Any

BASELINE: dict[str, Any] = {
    "condition": "baseline", "selector": "none", "r": 0.0, "intervention": "none", "alpha": 0.0, "mask_seed": 0,
    "control_of": "", "mask": "",
}


def mask_name(selector: str, r: float, seed: int | None = None, control_of: str = "") -> str:
    """`<selector>-r<r>`; a random control is `random-<selector>-r<r>-s<seed>` (the mask it is matched to)."""
    if selector == "random":
        if not control_of or seed is None:
            raise ValueError("a random mask name needs the selector it controls and a seed")
        return f"random-{control_of}-r{r:g}-s{seed}"
    return f"{selector}-r{r:g}"


def random_seeds(select_cfg: dict[str, Any]) -> list[int]:
    return list(range(int((select_cfg.get("random") or {}).get("seeds", 5))))


def masks(select_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every mask the config asks for: one per selector x r, and with `random` listed, for each of those
    masks one random control per seed of its realised size (`source_mask` names the mask it matches)."""
    sels = [s for s in select_cfg["selectors"] if s != "random"]
    if "random" in select_cfg["selectors"] and not sels:
        raise ValueError("select.selectors: 'random' is a control matched to another selector's masks; list one")
    tie_seed = int(select_cfg.get("seed", 0))
    out = []
    for sel in sels:
        for r in select_cfg["r"]:
            out.append({"mask": mask_name(sel, r), "selector": sel, "r": float(r), "mask_seed": tie_seed, "control_of": ""})
    if "random" in select_cfg["selectors"]:
        for sel in sels:
            for r in select_cfg["r"]:
                for s in random_seeds(select_cfg):
                    out.append({
                        "mask": mask_name("random", r, s, sel), "selector": "random", "r": float(r), "mask_seed": s,
                        "control_of": sel, "source_mask": mask_name(sel, r),
                    })
    return out


def grid(select_cfg: dict[str, Any], eval_cfg: dict[str, Any], task: str | None = None) -> list[dict[str, Any]]:
    """Conditions to evaluate: an intervention without strength (`deactivate`, `erase`) once per mask, the others
    (`steer`, ...) at each alpha (the registry's `uses_alpha`). The label-agnostic injections (`two_pass`, `mix`,
    `union`) are SER conditions: EVC's target emotion is the instruction, so they are left out for `task: evc`."""
    from .interventions import INTERVENTIONS

    out = [dict(BASELINE)]
    for m in masks(select_cfg):
        m = {k: v for k, v in m.items() if k != "source_mask"}
        for iv in eval_cfg["interventions"]:
            cls = INTERVENTIONS[iv]
            if task == "evc" and cls.routing != "label":
                continue
            alphas = [float(a) for a in eval_cfg["alpha"]] if cls.uses_alpha else [1.0]
            for a in alphas:
                head = f"random-{m['control_of']}" if m["selector"] == "random" else m["selector"]
                cid = f"{head}-r{m['r']:g}-{iv}" + (f"-a{a:g}" if cls.uses_alpha else "")
                if m["selector"] == "random":  # seed last, as metrics strips it when collapsing seeds
                    cid += f"-s{m['mask_seed']}"
                out.append({**m, "condition": cid, "intervention": iv, "alpha": a})
    ids = [c["condition"] for c in out]
    if len(ids) != len(set(ids)):
        raise ValueError("evaluation grid has duplicate conditions; check select.r and evaluate.alpha for repeats")
    return out


def by_id(select_cfg: dict[str, Any], eval_cfg: dict[str, Any], task: str | None = None) -> dict[str, dict[str, Any]]:
    return {c["condition"]: c for c in grid(select_cfg, eval_cfg, task)}


def group_of(cid: str, n_groups: int) -> int:
    """The evaluation group of a condition: a stable function of its id alone, so adding a condition to the
    grid never moves another one to a different group (and only its own group's jobs re-run)."""
    if n_groups < 1:
        raise ValueError(f"evaluate.groups must be >= 1, got {n_groups}")
    return int(hashlib.sha256(cid.encode()).hexdigest()[:12], 16) % n_groups


def groups(conds: list[dict[str, Any]], n_groups: int) -> dict[int, list[dict[str, Any]]]:
    """Group number -> its conditions in grid order; groups with no condition are left out (no empty jobs)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for c in conds:
        out.setdefault(group_of(c["condition"], n_groups), []).append(c)
    return dict(sorted(out.items()))


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def ident_name(c: int, filtered: bool) -> str:
    """`c<c>-filtered` or `c<c>-unfiltered`: one identification setting (stage 2 and 3 run once per setting)."""
    return f"c{int(c)}-{'filtered' if filtered else 'unfiltered'}"


def idents(filter_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every identification setting of `filter.c` x `filter.enabled` (each a value or a list), the first of
    each list first: that one is the run's primary setting, shown in the report's main sections."""
    cs, ens = _as_list(filter_cfg["c"]), _as_list(filter_cfg.get("enabled", True))
    for key, vals in (("c", cs), ("enabled", ens)):
        if len(vals) != len(set(vals)):
            raise ValueError(f"filter.{key} lists a value twice: {vals}")
    return [{"ident": ident_name(c, en), "c": int(c), "filtered": bool(en)} for c in cs for en in ens]


def ident_filter(filter_cfg: dict[str, Any], ident: dict[str, Any]) -> dict[str, Any]:
    """The scalar filter section of one identification setting (what the filter and aggregate stages read)."""
    return {**filter_cfg, "c": ident["c"], "enabled": ident["filtered"]}


def full_grid(
    select_cfg: dict[str, Any], eval_cfg: dict[str, Any], filter_cfg: dict[str, Any], task: str | None = None
) -> list[dict[str, Any]]:
    """`grid` once per identification setting: the baseline (no mask, so no setting) once, then every masked
    condition with its setting as the id prefix (`c50-filtered-lap-r0.005-steer-a1`), its mask as
    `<setting>/<mask>` (the masks folder of that setting) and `ident`, `c`, `filtered` as columns."""
    base = grid(select_cfg, eval_cfg, task)
    out = [{**base[0], "ident": "", "c": -1, "filtered": ""}]
    for idt in idents(filter_cfg):
        for cond in base[1:]:
            out.append({**cond, "condition": f"{idt['ident']}-{cond['condition']}", "mask": f"{idt['ident']}/{cond['mask']}",
                        **idt})
    return out


#: Cross-task transfer (METHOD.md 3.5): the intervention each target task gets with the other task's masks.
TRANSFER_INTERVENTIONS: dict[str, str] = {"evc": "steer", "ser": "deactivate"}


def transfer_grid(select_cfg: dict[str, Any], eval_cfg: dict[str, Any], filter_cfg: dict[str, Any],
                  source_task: str, target_task: str) -> list[dict[str, Any]]:
    """The masks of `source_task`'s primary identification setting evaluated on `target_task`: SER masks
    steer EVC (every alpha), EVC masks deactivate SER. Each condition's `ident` is `from-<source>-<setting>`
    (its own metrics, so its random controls never pair with the target task's own), and `mask` is the
    path under the run folder, `<source>/masks/<setting>/<mask>`."""
    iv = TRANSFER_INTERVENTIONS[target_task]
    src = idents(filter_cfg)[0]
    ident = f"from-{source_task}-{src['ident']}"
    out = []
    for cond in grid(select_cfg, {**eval_cfg, "interventions": [iv]}, target_task)[1:]:
        out.append({**cond, "condition": f"{ident}-{cond['condition']}",
                    "mask": f"{source_task}/masks/{src['ident']}/{cond['mask']}", **src, "ident": ident,
                    "source_task": source_task})
    return out


#: Dataset names a transfer pair may use: they become part of folder and condition names (`ser.esd_b`,
#: `data-esd_b-c50-filtered-...`), so no `-` (the field separator) and no `.` (the unit separator).
_DATASET_NAME = re.compile(r"[A-Za-z0-9_]+")


def dataset_pairs(transfer_cfg: dict[str, Any] | None, datasets: dict[str, Any]) -> list[tuple[str, str]]:
    """The (source, target) pairs of `transfer.datasets`: masks identified on the source's identification split,
    evaluated on the target's evaluation split. Names are checked against `datasets:`; a pair listed twice is
    an error (it would evaluate the same conditions twice)."""
    raw = (transfer_cfg or {}).get("datasets") or []
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(raw):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"transfer.datasets[{i}]: a pair is [source, target], got {pair!r}")
        for name in pair:
            if name not in datasets:
                raise ValueError(
                    f"transfer.datasets[{i}] names dataset {name!r}, which is not under datasets: "
                    f"(known: {sorted(datasets)})"
                )
            if not _DATASET_NAME.fullmatch(str(name)):
                raise ValueError(
                    f"transfer.datasets[{i}]: dataset name {name!r} may hold only letters, digits and '_' "
                    "(it becomes part of folder and condition names)"
                )
        p = (str(pair[0]), str(pair[1]))
        if p in out:
            raise ValueError(f"transfer.datasets lists the pair {list(p)} twice")
        out.append(p)
    return out


def dataset_ident(source: str, setting: str) -> str:
    """`data-<source>-<setting>`: the identification setting of masks taken from dataset `source`."""
    return f"data-{source}-{setting}"


def dataset_transfer_grid(select_cfg: dict[str, Any], eval_cfg: dict[str, Any], filter_cfg: dict[str, Any],
                          task: str, source: str, source_unit: str) -> list[dict[str, Any]]:
    """The masks of dataset `source` (primary identification setting, in the run folder of `source_unit`, the
    task run on that dataset) under every intervention of the task's grid, to be evaluated on another dataset.
    Each condition's `ident` is `data-<source>-<setting>` (its own metrics, so its random controls pair only
    with each other); `mask` and, for interventions that need M, `aggregate` are paths under the run folder."""
    from .interventions import INTERVENTIONS

    src = idents(filter_cfg)[0]
    ident = dataset_ident(source, src["ident"])
    out = []
    for cond in grid(select_cfg, eval_cfg, task)[1:]:
        c = {**cond, "condition": f"{ident}-{cond['condition']}",
             "mask": f"{source_unit}/masks/{src['ident']}/{cond['mask']}", **src, "ident": ident,
             "source_task": source_unit, "source_dataset": source}
        if INTERVENTIONS[cond["intervention"]].needs_means:
            c["aggregate"] = f"{source_unit}/aggregate/{src['ident']}"
        out.append(c)
    return out
