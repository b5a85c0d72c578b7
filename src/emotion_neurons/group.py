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
import sys
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
    p: dict[str, Any], manifest: str, masks_dir: str, shard: int, n_shards: int, batch_size: int | None,
    cache: str, out: str,
) -> dict[str, int]:
    """Evaluate `p["conditions"]` (each with the parameters `p["common"]`) into `out/<condition>/`."""
    from . import evaluate

    conds = p["conditions"]
    check_unique(conds, "evaluate group params")
    manifest_sha = file_sha(manifest)
    adapter = None
    n = {"conditions": len(conds), "cached": 0, "computed": 0, "model_loads": 0}
    with atomic_dir(out) as tmp:
        for cond in conds:
            cp = {**p["common"], "condition": cond}
            mask = f"{masks_dir}/{cond['mask']}.safetensors" if cond.get("mask") else ""
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
    from . import judge

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stage 4b/4c: evaluate or judge a group of conditions on one shard")
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("evaluate")
    e.add_argument("--params", required=True, help="JSON {common: ..., conditions: [...]} (or @file)")
    e.add_argument("--manifest", required=True)
    e.add_argument("--masks-dir", required=True, help="folder the conditions' mask paths are relative to")
    e.add_argument("--shard", type=int, required=True)
    e.add_argument("--n-shards", type=int, required=True)
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--cache", required=True, help="content-keyed store of per-condition results")
    e.add_argument("--out", required=True)
    j = sub.add_parser("judge")
    j.add_argument("--params", required=True)
    j.add_argument("--evaluated", required=True, help="output of the group's evaluate job")
    j.add_argument("--cache", required=True)
    j.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    if a.what == "evaluate":
        evaluate_group(p, a.manifest, a.masks_dir, a.shard, a.n_shards, a.batch_size, a.cache, a.out)
    else:
        judge_group(p, a.evaluated, a.cache, a.out)
    return 0


if __name__ == "__main__":
    from .retry import run_stage

    sys.exit(run_stage(main))
