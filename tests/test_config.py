"""Rerun hashes: each stage hashes exactly the package files it imports."""

from __future__ import annotations

from emotion_neurons.config import code_version, stage_files


def _names(stage, adapter=None):
    return {str(f).split("emotion_neurons/")[1] for f in stage_files(stage, adapter)}


def test_import_closure():
    assert _names("prepare") == {"__init__.py", "config.py", "data.py", "io.py", "prompts.py", "types.py"}
    gen = _names("generate", "qwen2_5_omni")
    assert {"hooks.py", "stats.py", "models/base.py", "models/qwen_omni.py", "data.py"} <= gen
    assert "models/audio_flamingo3.py" not in gen and "judges.py" not in gen
    assert "models/audio_flamingo3.py" in _names("generate", "audio_flamingo3")
    assert "filter.py" in _names("metrics")  # summarize decides success with filter.decide
    assert "selectors.py" in _names("report")


def test_code_version_is_stable_and_adapter_specific():
    assert code_version("generate", "qwen2_5_omni") == code_version("generate", "qwen2_5_omni")
    assert code_version("generate", "qwen2_5_omni") != code_version("generate", "audio_flamingo3")
