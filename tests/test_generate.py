"""The generation engine shared by stage 1 and stage 4: outputs, stores, bad audio, interruption."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
from toy import ToyAdapter

from emotion_neurons import SPANS
from emotion_neurons.hooks import InterventionSpec
from emotion_neurons.io import AudioError, read_table, write_jsonl
from emotion_neurons.stages.generate import load_shard, run
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


# -- stratified caps (METHOD.md section 5: never the first ids in sort order) ---------------------------------
EMOTIONS = ("neutral", "angry", "happy", "sad", "surprise")
SPEAKERS = ("0016", "0017", "0018", "0019", "0020")


def _esd_manifest(path, task, per_emotion=350, skip=()):
    """ESD layout: ids <spk>_<n>, neutral clips first in id order (n 1-350), then angry, happy, ..."""
    rows = []
    for spk in SPEAKERS:
        for e_i, emo in enumerate(EMOTIONS):
            for n in range(per_emotion):
                uid = f"{spk}_{e_i * per_emotion + n + 1:06d}"
                if (spk, emo) in skip and n >= 3:
                    continue
                if task == "ser":
                    rows.append(Instance(id=uid, task="ser", wav=f"/{uid}.wav", speaker=spk, emotion=emo,
                                         split="eval", prompt="p").to_dict())
                elif emo == "neutral":
                    for t in EMOTIONS[1:]:
                        rows.append(Instance(id=f"{uid}->{t}", task="evc", wav=f"/{uid}.wav", speaker=spk,
                                             emotion=emo, split="eval", prompt="p", target=t).to_dict())
    write_jsonl(path, rows)
    return path


def _counts(kept, key):
    return Counter(key(i) for i in kept)


def test_ser_cap_is_stratified_by_emotion_and_speaker(tmp_path):
    man = _esd_manifest(tmp_path / "ser.jsonl", "ser")
    for shard in (0, 5):
        kept, table = load_shard(man, "eval", shard, 8, limit=50, seed=0)
        assert len(kept) == 50 and len({i.id for i in kept}) == 50
        assert set(_counts(kept, lambda i: i.emotion).values()) == {10}  # the old code: 50 neutral clips
        assert set(_counts(kept, lambda i: i.speaker).values()) == {10}
        assert set(_counts(kept, lambda i: (i.emotion, i.speaker)).values()) == {2}
        assert table["kept"].sum() == 50 and (table["kept"] <= table["available"]).all()
        assert dict(zip(zip(table.emotion, table.speaker, strict=True), table.kept, strict=True)) == _counts(
            kept, lambda i: (i.emotion, i.speaker)
        )
        again, _ = load_shard(man, "eval", shard, 8, limit=50, seed=0)
        assert [i.id for i in again] == [i.id for i in kept]
        other, _ = load_shard(man, "eval", shard, 8, limit=50, seed=1)
        assert {i.id for i in other} != {i.id for i in kept}
        assert set(_counts(other, lambda i: i.emotion).values()) == {10}


def test_evc_cap_balances_targets_and_speakers_and_pairs_sources(tmp_path):
    man = _esd_manifest(tmp_path / "evc.jsonl", "evc")
    kept, _ = load_shard(man, "eval", 3, 8, limit=50, seed=0)
    assert len(kept) == 50
    by_target = _counts(kept, lambda i: i.target)
    assert set(by_target) == set(EMOTIONS[1:]) and max(by_target.values()) - min(by_target.values()) <= 1
    by_speaker = _counts(kept, lambda i: i.speaker)
    assert set(by_speaker) == set(SPEAKERS) and max(by_speaker.values()) - min(by_speaker.values()) <= 1
    # within one shard, the targets of one speaker are drawn from the same ranked sources (smaller sets nest
    # in larger ones); shards split the targets of a source by instance id, so this holds per shard only
    kept, _ = load_shard(man, "eval", 0, 1, limit=50, seed=0)
    for spk in SPEAKERS:
        sets = sorted(({i.id.split("->")[0] for i in kept if i.speaker == spk and i.target == t} for t in EMOTIONS[1:]),
                      key=len)
        assert all(a <= b for a, b in zip(sets[:-1], sets[1:], strict=True))


def test_cap_gives_small_strata_everything_and_shares_the_rest(tmp_path):
    man = _esd_manifest(tmp_path / "ser.jsonl", "ser", per_emotion=40,
                        skip={(s, "angry") for s in SPEAKERS})  # 3 angry clips per speaker in the corpus
    inst, _ = load_shard(man, "eval", 0, 1)
    assert len(inst) == 5 * (4 * 40 + 3)  # no cap: everything, in id order
    assert [i.id for i in inst] == sorted(i.id for i in inst)
    kept, table = load_shard(man, "eval", 0, 1, limit=95, seed=3)
    by_emotion = _counts(kept, lambda i: i.emotion)
    assert by_emotion["angry"] == 15  # all of them
    assert {e: n for e, n in by_emotion.items() if e != "angry"} == dict.fromkeys(["neutral", "happy", "sad", "surprise"], 20)
    assert set(_counts(kept, lambda i: i.speaker).values()) == {19}


def test_stage1_main_caps_and_records_what_it_kept(adapter, tmp_path, monkeypatch, caplog):
    import json

    from emotion_neurons.stages import generate

    rows = []
    for k, inst in enumerate(_instances(tmp_path, n=3)):
        for e in ("sad", "happy"):
            rows.append({**inst.to_dict(), "id": f"{inst.id}-{e}", "emotion": e, "speaker": f"s{k}"})
    write_jsonl(tmp_path / "m.jsonl", rows)
    monkeypatch.setattr(generate, "load_adapter", lambda cfg: adapter)
    params = {"task": "ser", "task_cfg": {"max_new_tokens": 3, "max_instances_per_shard": 4, "sample_seed": 1},
              "model": {"id": "toy", "batch_size": 3}, "component": "thinker", "hook_site": "gate", "capture": {},
              "data": {}}
    argv = ["--params", json.dumps(params), "--manifest", str(tmp_path / "m.jsonl"), "--shard", "0", "--n-shards", "1",
            "--out", str(tmp_path / "shard")]
    with caplog.at_level("INFO"):
        assert generate.main(argv) == 0
    strata = read_table(tmp_path / "shard" / "strata.tsv")
    assert strata.groupby("emotion")["kept"].sum().to_dict() == {"happy": 2, "sad": 2}
    assert "kept 4 of 6 ident instances" in caplog.text
    attrs = open_store(tmp_path / "shard" / "stats.zarr").attrs
    assert len(attrs["instance_ids"]) == 4 and attrs["batch_size"] == 3 and attrs["max_instances_per_shard"] == 4
    with caplog.at_level("WARNING"):
        assert generate.main([*argv[:-1], str(tmp_path / "shard2"), "--batch-size", "2"]) == 0
    assert "differs from model.batch_size 3" in caplog.text
    assert open_store(tmp_path / "shard2" / "stats.zarr").attrs["batch_size"] == 2
