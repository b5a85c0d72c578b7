"""The generation engine shared by stage 1 and stage 4: outputs, stores, bad audio, interruption."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from toy import ToyAdapter

from emotion_neurons import SPANS
from emotion_neurons.generate import run
from emotion_neurons.hooks import InterventionSpec
from emotion_neurons.io import AudioError, read_table
from emotion_neurons.stats import open_store
from emotion_neurons.types import GenerationSettings, Instance

SETTINGS = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def adapter():
    a = ToyAdapter()
    a.load()
    return a


def _instances(tmp_path, n=3):
    out = []
    for i in range(n):
        p = tmp_path / f"u{i}.wav"
        t = np.arange(1600 * (i + 2)) / 16000
        sf.write(p, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
        out.append(Instance(id=f"u{i}", task="ser", wav=str(p), speaker="s", emotion="sad", split="ident",
                            prompt=f"prompt {i}", options=["sad", "happy"]))
    return out


def test_outputs_and_store(adapter, tmp_path):
    inst = _instances(tmp_path)
    df = run(adapter, inst, SETTINGS, out_table=tmp_path / "o.tsv", wav_dir=None, batch_size=2,
             stats_out=tmp_path / "s.zarr", store_attrs={"model_id": "toy"})
    assert df["status"].eq("ok").all() and len(df) == 3
    table = read_table(tmp_path / "o.tsv")
    assert table["id"].tolist() == ["u0", "u1", "u2"] and table["options"].iloc[0] == "sad|happy"
    g = open_store(tmp_path / "s.zarr")
    assert g.attrs["instance_ids"] == ["u0", "u1", "u2"] and g.attrs["hook_site"] == "gate"
    tokens = g["tokens"][:]
    assert (tokens[:, SPANS.index("audio")] == [2, 3, 4]).all()  # one audio token per 1600 samples
    assert (tokens[:, SPANS.index("generated")] > 0).all()


def test_bad_audio_skipped_and_reported(adapter, tmp_path):
    inst = _instances(tmp_path)
    sf.write(inst[1].wav, np.zeros(4800, np.float32), 16000)
    df = run(adapter, inst, SETTINGS, out_table=tmp_path / "o.tsv", wav_dir=None, stats_out=tmp_path / "s.zarr")
    bad = df[df["id"] == "u1"]["status"].iloc[0]
    assert bad.startswith("bad_audio") and "silent" in bad and "u1.wav" in bad
    assert open_store(tmp_path / "s.zarr").attrs["instance_ids"] == ["u0", "u2"]
    with pytest.raises(AudioError, match="u1.wav"):
        run(adapter, inst, SETTINGS, out_table=tmp_path / "o2.tsv", wav_dir=None, on_bad_audio="error")
    assert not (tmp_path / "o2.tsv").exists()


def test_interrupted_run_leaves_nothing(adapter, tmp_path, monkeypatch):
    inst = _instances(tmp_path)
    calls = {"n": 0}
    real = adapter.generate

    def flaky(prepared, settings):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(prepared, settings)

    monkeypatch.setattr(adapter, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(adapter, inst, SETTINGS, out_table=tmp_path / "o.tsv", wav_dir=None, batch_size=1,
            stats_out=tmp_path / "s.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u0.wav", "u1.wav", "u2.wav"]
    for _, m in adapter.model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_empty_shard(adapter, tmp_path):
    df = run(adapter, [], SETTINGS, out_table=tmp_path / "o.tsv", wav_dir=None, stats_out=tmp_path / "s.zarr")
    assert df.empty and read_table(tmp_path / "o.tsv").empty
    assert open_store(tmp_path / "s.zarr")["tokens"].shape == (0, len(SPANS))


def test_intervention_with_per_row_masks(adapter, tmp_path):
    inst = _instances(tmp_path)
    L, N = 3, adapter.n_neurons()
    base = run(adapter, inst, SETTINGS, out_table=tmp_path / "a.tsv", wav_dir=None, batch_size=3)
    zero = run(adapter, inst, SETTINGS, out_table=tmp_path / "b.tsv", wav_dir=None, batch_size=3,
               intervention=InterventionSpec("steer", 0.0), mask_fn=lambda b: torch.ones(len(b), L, N, dtype=torch.bool))
    assert zero["output_text"].tolist() == base["output_text"].tolist()
