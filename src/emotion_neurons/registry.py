"""One small registry type for every extension point (selectors, interventions, model adapters, judges).

A registry maps a name to an object (a function, a class, or a lazy "module:attr" target). The config schema's
enums and the Snakemake wildcard constraints are derived from `names()` / `pattern()`, so each list of names
exists once. Names are restricted to `[a-z][a-z0-9_]*` so that they fit file names and wildcards without
escaping and so that a name can never contain the `-` that separates fields in mask and condition names.

Plugins: the modules named in the environment variable `EMOTION_NEURONS_PLUGINS` (comma-separated, importable
from PYTHONPATH) are imported the first time any registry is read, so a selector, intervention or adapter
declaration outside the package registers itself with the same decorators. Their files count in every
stage's rerun hash (`plugin_files`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
PLUGINS_ENV = "EMOTION_NEURONS_PLUGINS"
_plugins_loaded: set[str] = set()


def plugin_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]


def load_plugins() -> None:
    """Import each plugin module once (they register themselves); a missing one is an error naming it."""
    for module in plugin_modules():
        if module in _plugins_loaded:
            continue
        _plugins_loaded.add(module)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            raise ModuleNotFoundError(f"{PLUGINS_ENV} names module {module!r}, which is not importable") from None


def plugin_files() -> list[Path]:
    """Source files of the plugin modules (found without importing them)."""
    out = []
    for module in plugin_modules():
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            raise ModuleNotFoundError(f"{PLUGINS_ENV} names module {module!r}, which is not importable")
        out.append(Path(spec.origin).resolve())
    return out


class Registry(Generic[T]):
    """Name -> object, filled by decorators (or lazy `"module:attr"` strings resolved on first use)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: T | str | None = None, *, replace: bool = False) -> Any:
        """Register `obj` under `name`; without `obj`, return a decorator (`@REG.register("lap")`)."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"{self.kind} name {name!r} is invalid: use lower-case letters, digits and _")

        def add(o: Any) -> Any:
            if name in self._items and not replace and self._items[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove `name` (tests that register temporary entries clean up with this)."""
        self._items.pop(name, None)

    def __getitem__(self, name: str) -> T:
        load_plugins()
        try:
            item = self._items[name]
        except KeyError:
            raise KeyError(f"{self.kind} {name!r} unknown; registered: {', '.join(self.names())}") from None
        if isinstance(item, str):
            module, _, attr = item.partition(":")
            item = getattr(importlib.import_module(module), attr)
            self._items[name] = item
        return item

    def get(self, name: str) -> T:
        return self[name]

    def raw(self, name: str) -> Any:
        """The registered object without resolving a lazy target (cheap: no import)."""
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted (stable across runs, so schema enums and DAGs are reproducible)."""
        load_plugins()
        return tuple(sorted(self._items))

    def pattern(self) -> str:
        """A regex alternation of the names, for Snakemake `wildcard_constraints`."""
        load_plugins()
        return "|".join(re.escape(n) for n in sorted(self._items, key=lambda n: (-len(n), n))) or "(?!)"

    def temporarily(self, name: str, obj: T | str) -> _Temp:
        """Context manager: register `obj` for the duration of a block (for tests and plugins)."""
        return _Temp(self, name, obj)


class _Temp:
    def __init__(self, reg: Registry[Any], name: str, obj: Any) -> None:
        self.reg, self.name, self.obj = reg, name, obj

    def __enter__(self) -> Any:
        self.reg.register(self.name, self.obj)
        return self.obj

    def __exit__(self, *exc: object) -> None:
        self.reg.unregister(self.name)


def decorator(reg: Registry[T], name: str) -> Callable[[T], T]:
    """`@decorator(SELECTORS, "lap")`: a readable alias for `reg.register(name)`."""
    return reg.register(name)
