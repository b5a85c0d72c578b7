"""Grouped evaluation: one process evaluates (or judges) every condition of one group on one shard.

Why: loading the model (and importing torch) once per condition cost more than the evaluation itself at paper
scale (issue 8), and one job per condition made the DAG slow to build. A group is a stable function of the
condition id (`conditions.group_of`), so adding a condition changes one group per shard. Each condition's
result is cached outside the job's outputs under a content key (its own parameters, which carry the code
version, and the bytes of its mask, manifest or evaluated outputs): when a group's job re-runs because a
condition joined it, only that condition is computed; the others are linked from the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .config import dumps, load_params, short_hash
from .io import atomic_dir

log = logging.getLogger(__name__)


def file_sha(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha(root: str | os.PathLike) -> str:
    """Hash of every file under `root` (relative names and bytes), in a fixed order."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + file_sha(f).encode())
    return h.hexdigest()


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link (copy where linking fails, e.g. across file systems) the files of `src` into `dst`."""
    if src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return
    for f in sorted(src.rglob("*")):
        if f.is_file():
            link_tree(f, dst / f.relative_to(src))


def check_unique(conds: list[dict[str, Any]], where: str) -> None:
    ids = [c["condition"] for c in conds]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"{where}: condition(s) {dup} listed twice")


def evaluate_group(
    p: dict[str, Any], manifest: str, run_dir: str, shard: int, n_shards: int, batch_size: int | None,
    cache: str, out: str,
) -> dict[str, int]:
    """Evaluate `p["conditions"]` (each with the parameters `p["common"]`) into `out/<condition>/`; mask paths
    (and, for interventions that need M, the aggregate `<source_task>/aggregate/<ident>.zarr`) are relative to
    `run_dir`."""
    from .interventions import INTERVENTIONS
    from .stages import evaluate

    conds = p["conditions"]
    check_unique(conds, "evaluate group params")
    manifest_sha = file_sha(manifest)
    adapter = None
    n = {"conditions": len(conds), "cached": 0, "computed": 0, "model_loads": 0}
    with atomic_dir(out) as tmp:
        for cond in conds:
            cp = {**p["common"], "condition": cond}
            mask = f"{run_dir}/{cond['mask']}.safetensors" if cond.get("mask") else ""
            agg = ""
            if INTERVENTIONS[cond["intervention"]].needs_means:
                agg = f"{run_dir}/{cond['source_task']}/aggregate/{cond['ident']}.zarr"
            if mask and not Path(mask).exists():
                raise FileNotFoundError(f"condition {cond['condition']!r}: its mask {mask} does not exist")
            key = short_hash(
                {"params": cp, "mask": file_sha(mask) if mask else "", "manifest": manifest_sha, "shard": shard,
                 "n_shards": n_shards, "batch_size": batch_size}, 32,
            )
            hit = Path(cache) / key
            if hit.is_dir():
                n["cached"] += 1
                log.info("condition %s: from the cache (%s)", cond["condition"], hit)
            else:
                if adapter is None:  # loaded only when a condition needs it: an all-cached rerun loads nothing
                    adapter = evaluate.load_adapter(cp["model"])
                    n["model_loads"] += 1
                argv = ["--params", dumps(cp), "--manifest", manifest, "--shard", str(shard),
                        "--n-shards", str(n_shards), "--out", str(hit)]
                if mask:
                    argv += ["--mask", mask]
                if agg:
                    argv += ["--aggregate", agg]
                if batch_size is not None:
                    argv += ["--batch-size", str(batch_size)]
                log.info("condition %s: evaluating", cond["condition"])
                evaluate.main(argv, adapter=adapter)
                n["computed"] += 1
            link_tree(hit, tmp / cond["condition"])
    log.info("group done: %s", n)
    return n


def judge_group(p: dict[str, Any], evaluated: str, cache: str, out: str) -> dict[str, int]:
    """Judge `evaluated/<condition>/outputs.tsv` of every condition into `out/<condition>.tsv`."""
    from .stages import judge

    conds = p["conditions"]
    check_unique(conds, "judge group params")
    evc = None
    n = {"conditions": len(conds), "cached": 0, "computed": 0, "judge_loads": 0}
    with atomic_dir(out) as tmp:
        for cond in conds:
            cp = {**p["common"], "condition": cond}
            src = Path(evaluated) / cond["condition"]
            if not (src / "outputs.tsv").exists():
                raise FileNotFoundError(f"condition {cond['condition']!r}: {src}/outputs.tsv does not exist")
            hit = Path(cache) / f"{short_hash({'params': cp, 'evaluated': tree_sha(src)}, 32)}.tsv"
            if hit.is_file():
                n["cached"] += 1
            else:
                if cp["task"] == "evc" and evc is None:
                    evc = judge.EvcJudge(cp["judges"], cp["labels"])
                    n["judge_loads"] += 1
                judge.main(["--params", dumps(cp), "--outputs", str(src / "outputs.tsv"), "--out", str(hit)], evc=evc)
                n["computed"] += 1
            link_tree(hit, tmp / f"{cond['condition']}.tsv")
    log.info("group done: %s", n)
    return n


def cli(what: str, argv: list[str] | None = None) -> int:
    """`python -m emotion_neurons.stages.evaluate group ...` / `... stages.judge group ...`: one group of
    conditions on one shard, one model (or judge) load for all of them."""
    ap = argparse.ArgumentParser(
        prog=f"python -m emotion_neurons.stages.{what} group",
        description=f"Stage 4: {what} a group of conditions on one shard (one model load for all of them)",
    )
    ap.add_argument("--params", required=True, help="JSON {common: ..., conditions: [...]} (or @file)")
    ap.add_argument("--cache", required=True, help="content-keyed store of per-condition results")
    ap.add_argument("--out", required=True)
    if what == "evaluate":
        ap.add_argument("--manifest", required=True)
        ap.add_argument("--run-dir", required=True, help="folder the conditions' mask paths are relative to")
        ap.add_argument("--shard", type=int, required=True)
        ap.add_argument("--n-shards", type=int, required=True)
        ap.add_argument("--batch-size", type=int, default=None)
    else:
        ap.add_argument("--evaluated", required=True, help="output of the group's evaluate job")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    if what == "evaluate":
        evaluate_group(p, a.manifest, a.run_dir, a.shard, a.n_shards, a.batch_size, a.cache, a.out)
    else:
        judge_group(p, a.evaluated, a.cache, a.out)
    return 0
