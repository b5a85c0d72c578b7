"""Garbage collection of the per-condition result caches (`results/cache/{eval,judged,params}`).

Why: the grouped evaluate and judge jobs keep every condition's result under a content key
(`emotion_neurons.group`), and a content key never goes stale by itself, so the caches only grow: a sweep
that is narrowed, a changed mask or code version leaves entries nothing uses. The jobs hard-link each
result into their output folder (`<run>/<task>/eval/group-<g>/{shard,judged}-<s>/`), so an entry is in use
exactly when one of its files is also linked from a current output folder; `gc` removes the others.

Run it through Snakemake, which knows the current config's output folders and params files and holds the
working-directory lock (so no job writes the cache meanwhile):

    snakemake cache_gc --cores 1 --configfile config.yaml [overlay.yaml]

Low level: `python -m emotion_neurons.stages.cache_gc --spec '{"caches": [...], "live": [...], "params_dir": ...,
"keep_params": [...]}' [--dry-run]`. Entries whose results were copied rather than linked (a cache on
another file system) look unused and are removed: that costs a recomputation, never a wrong result.
Stage-1 stores are only listed, never removed (they cost GPU hours; delete one by hand when no config
uses it).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .io import files_under

log = logging.getLogger(__name__)


def _size(entry: Path) -> int:
    return sum(f.stat().st_size for f in files_under(entry))


def linked_inodes(roots: Iterable[str | os.PathLike]) -> set[tuple[int, int]]:
    """(device, inode) of every file under `roots` (missing roots are skipped: a job not run yet)."""
    out: set[tuple[int, int]] = set()
    for root in roots:
        for f in files_under(Path(root)):
            st = f.stat()
            out.add((st.st_dev, st.st_ino))
    return out


def unused_entries(cache: str | os.PathLike, live: set[tuple[int, int]]) -> list[Path]:
    """Entries (files or folders directly under `cache`) none of whose files is in `live`. Hidden names are
    a job's unfinished atomic outputs and are left alone."""
    cache = Path(cache)
    if not cache.is_dir():
        return []
    out = []
    for entry in sorted(cache.iterdir()):
        if entry.name.startswith("."):
            continue
        if not any((st.st_dev, st.st_ino) in live for st in (f.stat() for f in files_under(entry))):
            out.append(entry)
    return out


def gc(
    caches: list[str],
    live: list[str],
    params_dir: str | None = None,
    keep_params: list[str] | None = None,
    stage1_dir: str | None = None,
    keep_stage1: list[str] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Remove the result-cache entries not linked from `live` and the params files not in `keep_params`
    (file names); list (never remove) the stage-1 stores under `stage1_dir` not in `keep_stage1`."""
    inodes = linked_inodes(live)
    doomed = [e for c in caches for e in unused_entries(c, inodes)]
    if params_dir and Path(params_dir).is_dir():
        keep = {Path(p).name for p in keep_params or []}
        doomed += [p for p in sorted(Path(params_dir).iterdir()) if not p.name.startswith(".") and p.name not in keep]
    summary: dict[str, Any] = {"removed": len(doomed), "bytes": sum(_size(e) for e in doomed), "dry_run": dry_run,
                               "entries": [str(e) for e in doomed]}
    for e in doomed:
        log.info("%s %s", "would remove" if dry_run else "removing", e)
        if not dry_run:
            shutil.rmtree(e) if e.is_dir() else e.unlink()
    if stage1_dir and Path(stage1_dir).is_dir():
        keep1 = {Path(k).name for k in keep_stage1 or []}
        unused = [p for p in sorted(Path(stage1_dir).iterdir()) if p.is_dir() and not p.name.startswith(".")
                  and p.name not in keep1]
        summary["stage1_unused"] = [str(p) for p in unused]
        summary["stage1_unused_bytes"] = sum(_size(p) for p in unused)
        for p in unused:
            log.info("stage-1 store not used by this config (kept; delete by hand if no config uses it): %s", p)
    log.info("cache gc: %s entries, %.1f MB %s", summary["removed"], summary["bytes"] / 1e6,
             "would be removed" if dry_run else "removed")
    return summary
