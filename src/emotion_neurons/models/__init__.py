"""Model adapter registry: adding a model is one file plus one line here."""

from __future__ import annotations

import importlib

from .base import ModelAdapter

_REGISTRY: dict[str, str] = {
    "qwen2_5_omni": "emotion_neurons.models.qwen_omni:QwenOmniAdapter",
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(name: str) -> ModelAdapter:
    """Instantiate the adapter registered under `name` (imports its module lazily)."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"model.adapter {name!r} unknown; available: {available()}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()
