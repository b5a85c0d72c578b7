"""Config helpers shared by the Snakefile and the stage modules.

Rules pass each stage only the config subset it depends on, as sorted JSON in `params`, so Snakemake re-runs a
rule exactly when that subset (or the code it runs, see `code_version`) changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent

#: Modules each stage executes (beyond the package basics). A change to any of them re-runs that stage.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "prepare": ("data.py", "prompts.py", "io.py", "types.py"),
    "generate": ("generate.py", "hooks.py", "stats.py", "io.py", "types.py", "models/"),
    "judge": ("judge.py", "judges.py", "prompts.py", "io.py", "types.py"),
    "filter": ("filter.py", "io.py"),
    "aggregate": ("aggregate.py", "stats.py", "io.py"),
    "select": ("masks.py", "selectors.py", "stats.py", "io.py"),
    "evaluate": ("generate.py", "hooks.py", "io.py", "types.py", "models/", "selectors.py", "conditions.py"),
    "metrics": ("summarize.py", "metrics.py", "io.py", "conditions.py"),
    "report": ("report.py", "selectors.py", "io.py"),
}


def code_version(stage: str) -> str:
    """Hash of the source files a stage runs (Snakemake does not see imported modules on its own)."""
    h = hashlib.sha256()
    for rel in ("__init__.py", "config.py", *STAGE_MODULES[stage]):
        p = PACKAGE_DIR / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(PACKAGE_DIR)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def dumps(obj: Any) -> str:
    """Canonical JSON: key order never triggers a re-run."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def load_params(arg: str) -> dict[str, Any]:
    """Parse `--params`: inline JSON, or @path to a JSON file."""
    if arg.startswith("@"):
        return json.loads(Path(arg[1:]).read_text())
    return json.loads(arg)


def short_hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(dumps(obj).encode()).hexdigest()[:n]


def task_dataset(config: dict[str, Any], task: str) -> dict[str, Any]:
    name = config["tasks"][task]["dataset"]
    try:
        return config["datasets"][name]
    except KeyError:
        raise KeyError(f"tasks.{task}.dataset names {name!r}, which is not under datasets") from None


def stage1_identity(config: dict[str, Any], task: str) -> dict[str, Any]:
    """Everything that determines stage-1 statistics: the cache key of a generate store."""
    t = config["tasks"][task]
    return {
        "task": task,
        "model": {k: config["model"].get(k) for k in ("adapter", "id", "revision", "dtype", "speaker")},
        "dataset": task_dataset(config, task),
        "data": config["data"],
        "task_cfg": {k: v for k, v in t.items() if k not in ("enabled", "shards", "eval_shards")},
        "component": config["component"],
        "hook_site": config["hook_site"],
        "capture": config["capture"],
        "code": code_version("generate"),
        "prepare_code": code_version("prepare"),
    }


def stage1_key(config: dict[str, Any], task: str) -> str:
    """Directory name of the cached statistics: readable prefix + hash of `stage1_identity`."""
    model = config["model"]["adapter"]
    return f"{task}-{model}-{short_hash(stage1_identity(config, task))}"
