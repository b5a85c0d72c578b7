"""Grouped evaluation, shared by `stages.evaluate group` and `stages.judge group`: one process evaluates (or
judges) every condition of one group on one shard.

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

from .io import file_sha, files_under

log = logging.getLogger(__name__)


def tree_sha(root: str | os.PathLike) -> str:
    """Hash of every file under `root` (relative names and bytes), in a fixed order."""
    root = Path(root)
    h = hashlib.sha256()
    for f in files_under(root):
        h.update(str(f.relative_to(root)).encode() + b"\0" + file_sha(f).encode())
    return h.hexdigest()


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link (copy where linking fails, e.g. across file systems) the files of `src` into `dst`."""
    for f in files_under(src):
        target = dst if f == src else dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def result_params(cp: dict[str, Any]) -> dict[str, Any]:
    """The params a condition's cached result is keyed on: with a `result_code` (the code hash without the
    modules that never change a result, `config.RESULT_NEUTRAL_MODULES`), the full hash `code` is left out,
    so an edit to the grouping plumbing re-runs the group jobs (their params change) but recomputes nothing.
    """
    if "result_code" not in cp:
        return cp
    return {k: v for k, v in cp.items() if k != "code"}


def check_unique(conds: list[dict[str, Any]], where: str) -> None:
    ids = [c["condition"] for c in conds]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"{where}: condition(s) {dup} listed twice")


def parse_group_args(what: str, argv: list[str] | None) -> argparse.Namespace:
    """The arguments of `python -m emotion_neurons.stages.<what> group ...` (one group on one shard)."""
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
    return a
