"""Model adapter registry: adding a model is one file plus one entry here.

Importing this module must stay cheap (no torch): the Snakefile reads it at parse time to find each
adapter's source file (for rerun hashes) and its environment file (for `--sdm conda`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .base import ModelAdapter


class Entry(NamedTuple):
    target: str  # "module:Class"
    env: str  # environment file under envs/ (without .yaml) that can run this adapter


_REGISTRY: dict[str, Entry] = {
    "qwen2_5_omni": Entry("emotion_neurons.models.qwen_omni:QwenOmniAdapter", "models-tf5"),
    "audio_flamingo3": Entry("emotion_neurons.models.audio_flamingo3:AudioFlamingo3Adapter", "models-tf5"),
    "minicpm_o": Entry("emotion_neurons.models.minicpm_o:MiniCPMOAdapter", "models-minicpm"),
    "kimi_audio": Entry("emotion_neurons.models.kimi_audio:KimiAudioAdapter", "models-kimi"),
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def entry(name: str) -> Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"model.adapter {name!r} unknown; available: {available()}") from None


def get_adapter(name: str) -> ModelAdapter:
    """Instantiate the adapter registered under `name` (imports its module lazily)."""
    module, cls = entry(name).target.split(":")
    return getattr(importlib.import_module(module), cls)()
