"""Rerun hashes: each stage hashes exactly the package files it imports."""

from __future__ import annotations

from emotion_neurons.config import code_version, stage_files


def _names(stage, adapter=None):
    return {str(f).split("emotion_neurons/")[1] for f in stage_files(stage, adapter)}


def test_import_closure():
    assert _names("prepare") == {"__init__.py", "config.py", "stages/prepare.py", "io.py", "prompts.py", "types.py"}
    gen = _names("generate", "qwen2_5_omni")
    assert {"hooks.py", "stats.py", "models/base.py", "models/qwen_omni.py", "stages/prepare.py"} <= gen
    assert "models/audio_flamingo3.py" not in gen and "judges.py" not in gen
    assert "models/audio_flamingo3.py" in _names("generate", "audio_flamingo3")
    assert "stages/filter.py" in _names("metrics")  # metrics decides success with filter.decide
    assert "selectors.py" in _names("report")
    # the grouped jobs: evaluate runs its groups with this model's adapter only; the judge's closure holds no
    # model code at all (editing an adapter never re-runs judge_eval)
    ev = _names("evaluate", "qwen2_5_omni")
    assert {"group.py", "models/qwen_omni.py"} <= ev and "models/audio_flamingo3.py" not in ev
    jd = _names("judge")
    assert "group.py" in jd and "stages/evaluate.py" not in jd and not any(n.startswith("models/") for n in jd)


def test_code_version_is_stable_and_adapter_specific():
    assert code_version("generate", "qwen2_5_omni") == code_version("generate", "qwen2_5_omni")
    assert code_version("generate", "qwen2_5_omni") != code_version("generate", "audio_flamingo3")


# -- config loose ends: stage-1 identity, strict schema, per-task spans ---------------------------------------
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from emotion_neurons import SPANS  # noqa: E402
from emotion_neurons.config import stage1_key  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def _merge(base: dict, over: dict) -> dict:
    """Snakemake's --configfile overlay: nested dicts merge, other values replace."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _config(*overlays: dict) -> dict:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    for o in overlays:
        cfg = _merge(cfg, o)
    return cfg


def _validate(cfg: dict) -> None:
    from emotion_neurons.schema import validate_config

    validate_config(cfg, SCHEMA)


def test_stage1_key_follows_batch_size_and_ignores_spans():
    base = _config()
    assert stage1_key(base, "evc") == stage1_key(copy.deepcopy(base), "evc")
    # batch composition changes bf16 GPU outputs, so the batch size is part of the stage-1 key
    assert stage1_key(_config({"model": {"batch_size": 1}}), "evc") != stage1_key(base, "evc")
    # spans only matter from aggregation on: changing them must not re-run the model
    assert stage1_key(_config({"tasks": {"evc": {"spans": ["generated"]}}}), "evc") == stage1_key(base, "evc")
    assert stage1_key(_config({"tasks": {"ser": {"sample_seed": 5}}}), "ser") != stage1_key(base, "ser")


def test_stage1_key_follows_the_decoding_keys_that_change_bf16_outputs():
    """Measured on an H200 (bench/RESULTS-fastpath.md): cuDNN attention, the static cache, the compiled step and
    batched token2wav each change bf16 outputs, so cached statistics must not be reused across them."""
    base = _config()
    for key, value in (
        ("deterministic", False),
        ("cache_implementation", "static"),
        ("compile", "cudagraphs"),
        ("token2wav_batch_size", 8),
        ("static_cache_bucket", 1024),
        ("talker_compile", "cudagraphs"),
    ):
        assert stage1_key(_config({"model": {key: value}}), "evc") != stage1_key(base, "evc"), key


def test_schema_rejects_misspelt_dataset_keys_per_format():
    from emotion_neurons.schema import ConfigError

    _validate(_config())
    for bad, key in (
        ({"datasets": {"esd": {"rot": "data/ESD"}}}, "rot"),
        ({"datasets": {"esd": {"max_utterances_per_emotions": 5}}}, "max_utterances_per_emotions"),
        ({"datasets": {"esd": {"ident_manifest": "x.jsonl"}}}, "ident_manifest"),  # an emobox key in esd
    ):
        with pytest.raises(ConfigError, match=key):
            _validate(_config(bad))
    emobox = {"format": "emobox", "emotions": {"ang": "angry", "neu": "neutral"}, "ident_manifest": "a.jsonl",
              "eval_manifest": "b.jsonl", "wav_root": None}
    _validate(_config({"datasets": {"iemocap": emobox}}))
    with pytest.raises(ConfigError, match="ident_speakers"):
        _validate(_config({"datasets": {"iemocap": {**emobox, "ident_speakers": ["1"]}}}))
    with pytest.raises(ConfigError, match="eval_manifest"):
        _validate(_config({"datasets": {"iemocap": {k: v for k, v in emobox.items() if k != "eval_manifest"}}}))


def test_schema_bootstrap_needs_enough_resamples():
    from emotion_neurons.schema import ConfigError

    for n in (0, 1, 99):  # 0 used to pass the schema and then crash in the metrics stage
        with pytest.raises(ConfigError, match="bootstrap"):
            _validate(_config({"evaluate": {"bootstrap": n}}))
    _validate(_config({"evaluate": {"bootstrap": 100}}))


def test_task_spans_defaults():
    cfg = _config()
    del cfg["tasks"]["evc"]["spans"], cfg["tasks"]["ser"]["spans"]
    _validate(cfg)  # fills schema defaults
    assert cfg["tasks"]["evc"]["spans"] == ["text", "generated"]
    assert cfg["tasks"]["ser"]["spans"] == ["audio", "text", "generated"]
    assert _config()["tasks"]["evc"]["spans"] == ["text", "generated"]


def test_evc_aggregation_ignores_the_audio_span(tmp_path):
    """The audio span of one source is the same for all its targets; with EVC's spans it adds nothing to P."""
    from emotion_neurons.io import write_table
    from emotion_neurons.stages.aggregate import main as aggregate_main
    from emotion_neurons.stats import InstanceStatsWriter, load_aggregate

    ids = ["s1->angry", "s1->happy"]
    L, N, S = 2, 3, len(SPANS)
    pos = np.zeros((2, S, L, N), np.int32)
    tokens = np.zeros((2, S), np.int64)
    a, t, g = (SPANS.index(s) for s in ("audio", "text", "generated"))
    tokens[:, a], tokens[:, t], tokens[:, g] = 50, 10, 10
    pos[:, a, :, 0] = 50  # neuron 0 fires on every audio token of the source, for both targets
    pos[1, g, :, 0] = 5  # and only the happy output's generated tokens make it fire outside the audio
    w = InstanceStatsWriter(tmp_path / "s.zarr", ids, L, N, {"model_id": "toy", "hook_site": "gate"})
    w.write(ids, {"pos_count": pos, "act_sum": pos.astype(np.float32), "tokens": tokens})
    w.close()
    write_table(tmp_path / "kept.tsv", pd.DataFrame({"id": ids, "emotion": ["angry", "happy"]}))
    params = {"task": "evc", "emotions": ["angry", "happy"], "spans": _config()["tasks"]["evc"]["spans"]}
    aggregate_main(["--params", json.dumps(params), "--kept", str(tmp_path / "kept.tsv"),
                    "--stores", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "agg.zarr")])
    arrays, attrs = load_aggregate(tmp_path / "agg.zarr")
    assert attrs["spans"] == ["text", "generated"] and arrays["T"].tolist() == [20, 20]
    assert np.allclose(arrays["P"][0, :, 0], 0.0) and np.allclose(arrays["P"][1, :, 0], 5 / 20)


def _dry_run(tmp_path: Path, overlay: dict) -> subprocess.CompletedProcess:
    wd = tmp_path / "wd"
    wd.mkdir(exist_ok=True)
    (wd / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(overlay))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    cmd = [str(bin_dir / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(wd), "-n", "-p",
           "--configfile", str(REPO / "config" / "demo-machinery.yaml"), str(tmp_path / "over.yaml")]
    return subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=600)


def test_workflow_aggregates_each_task_over_its_spans(tmp_path):
    res = _dry_run(tmp_path, {"tasks": {"ser": {"spans": ["audio", "generated"]}}})
    assert res.returncode == 0, res.stderr[-3000:]
    spans = {}
    for m in re.finditer(r"emotion_neurons\.stages\.aggregate --params '(\{.*?\})'", res.stdout):
        p = json.loads(m.group(1))
        spans[p["task"]] = p["spans"]
    assert spans == {"evc": ["text", "generated"], "ser": ["audio", "generated"]}
    old = _dry_run(tmp_path, {"aggregate": {"spans": ["audio", "text", "generated"]}})
    assert old.returncode != 0
    assert "tasks.evc.spans" in old.stderr + old.stdout and "tasks.ser.spans" in old.stderr + old.stdout


def test_emobox_balanced_test_set_keys():
    emobox = {"format": "emobox", "emotions": {"ang": "angry", "neu": "neutral"}, "ident_manifest": "a.jsonl",
              "eval_manifest": "b.jsonl"}
    for ok in (200, {"angry": 200, "neutral": 500}, None):
        _validate(_config({"datasets": {"iemocap": {**emobox, "eval_per_emotion": ok, "on_too_few": "warn"}}}))
    for bad in (0, {"angry": 0}, "200"):
        with pytest.raises(Exception, match="eval_per_emotion|200"):
            _validate(_config({"datasets": {"iemocap": {**emobox, "eval_per_emotion": bad}}}))
    with pytest.raises(Exception, match="on_too_few"):
        _validate(_config({"datasets": {"iemocap": {**emobox, "on_too_few": "ignore"}}}))
    _validate(_config({"evaluate": {"interventions": ["mix"], "alpha": [1.0], "mix_temperature": 0.5}}))
    with pytest.raises(Exception, match="mix_temperature|0"):
        _validate(_config({"evaluate": {"interventions": ["mix"], "alpha": [1.0], "mix_temperature": 0}}))
