"""Model adapter registry: adding a model is one adapter file in this folder, nothing else.

Every class in `models/*.py` with a literal `name = "..."` is an adapter. Its declaration (name, tasks,
components, environment file, hook sites, input window) is read from the class body with `ast`, so importing
this module stays cheap (no torch): the Snakefile reads it at parse time for the schema enums, the start-up
checks, the rerun hashes and the GPU rules' `conda:` environment. The class itself is imported only by
`get_adapter`. Adapters outside the package (plugins, tests) register with
`ADAPTERS.register(name, declare("module:Class"))`.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    from .base import ModelAdapter

MODELS_DIR = Path(__file__).resolve().parent
#: declared class attributes, read as literals (absent ones take the base class's literal)
DECLARED = ("name", "tasks", "env", "hook_sites", "components", "max_audio_seconds")


@dataclass(frozen=True)
class AdapterDecl:
    """What the workflow needs to know about an adapter without importing it."""

    name: str
    target: str  # "module:Class"
    file: Path  # the adapter's source file (its rerun hash)
    env: str  # environment file under envs/ (without .yaml) that can run this adapter
    tasks: tuple[str, ...]
    components: tuple[str, ...]
    hook_sites: tuple[str, ...]
    max_audio_seconds: float | None


def _literals(path: Path, cls: str | None = None) -> dict[str, dict[str, Any]]:
    """Class name -> its literal class attributes of DECLARED (one class if `cls`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: dict[str, dict[str, Any]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or (cls is not None and node.name != cls):
            continue
        attrs: dict[str, Any] = {}
        for stmt in node.body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
            for t in targets:
                if isinstance(t, ast.Name) and t.id in DECLARED and getattr(stmt, "value", None) is not None:
                    try:
                        attrs[t.id] = ast.literal_eval(stmt.value)
                    except ValueError:
                        raise ValueError(
                            f"{path}:{stmt.lineno}: {node.name}.{t.id} must be a plain literal (the Snakefile reads "
                            "it without importing the adapter)"
                        ) from None
        out[node.name] = attrs
    return out


@functools.cache
def _base_defaults() -> dict[str, Any]:
    return _literals(MODELS_DIR / "base.py", "ModelAdapter")["ModelAdapter"]


def _decl(target: str, file: Path, attrs: dict[str, Any]) -> AdapterDecl:
    from ..sites import HOOK_SITES

    a = {**_base_defaults(), **attrs}
    where = f"{target} ({file})"
    if not a.get("name"):
        raise ValueError(f"adapter {where} declares no `name`")
    if not a.get("env"):
        raise ValueError(f"adapter {where} declares no `env` (its environment file under envs/, without .yaml)")
    if not a.get("components"):
        raise ValueError(f"adapter {where} declares no `components`")
    sites = tuple(HOOK_SITES) if a.get("hook_sites") is None else tuple(a["hook_sites"])
    unknown = sorted(set(sites) - set(HOOK_SITES))
    if unknown:
        raise ValueError(f"adapter {where} declares unknown hook sites {unknown}; known: {sorted(HOOK_SITES)}")
    window = a.get("max_audio_seconds")
    return AdapterDecl(
        name=str(a["name"]), target=target, file=file, env=str(a["env"]), tasks=tuple(a["tasks"]),
        components=tuple(a["components"]), hook_sites=sites, max_audio_seconds=None if window is None else float(window),
    )


def declare(target: str) -> AdapterDecl:
    """The declaration of adapter class `"module:Class"`, read from its source without importing it."""
    module, _, cls = target.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(f"adapter module {module!r} not found (target {target!r})")
    file = Path(spec.origin).resolve()
    found = _literals(file, cls)
    if cls not in found:
        raise KeyError(f"class {cls} not found in {file}")
    return _decl(target, file, found[cls])


def _discover(reg: Registry[AdapterDecl]) -> None:
    for file in sorted(MODELS_DIR.glob("*.py")):
        if file.stem in ("__init__", "base"):
            continue
        for cls, attrs in _literals(file).items():
            if attrs.get("name"):
                d = _decl(f"{__name__}.{file.stem}:{cls}", file, attrs)
                reg.register(d.name, d)


ADAPTERS: Registry[AdapterDecl] = Registry("model adapter")
_discover(ADAPTERS)


def available() -> list[str]:
    return list(ADAPTERS.names())


def entry(name: str) -> AdapterDecl:
    """The declaration of adapter `name` (config `model.adapter`)."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise KeyError(f"model.adapter {name!r} unknown; available: {available()}") from None


def get_adapter(name: str) -> ModelAdapter:
    """Instantiate the adapter registered under `name` (imports its module lazily)."""
    module, cls = entry(name).target.split(":")
    return getattr(importlib.import_module(module), cls)()
