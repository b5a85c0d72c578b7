"""Corpus readers, instance building, bad input, answer parsing, filter logic, conditions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from emotion_neurons.io import AudioError, load_audio
from emotion_neurons.prompts import option_order, parse_answer, ser_prompt
from emotion_neurons.stages.filter import TooFewSuccesses, decide, keep
from emotion_neurons.stages.prepare import (
    DataError,
    build_instances,
    check_audio,
    read_emobox,
    read_esd,
    shard_of,
)

EMOS = {"Neutral": "neutral", "Angry": "angry", "Happy": "happy"}


def _tone(sr=16000, sec=0.5, amp=0.3):
    t = np.arange(int(sr * sec)) / sr
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def make_esd(root, speakers=("0011", "0016"), n=2):
    for spk in speakers:
        lines = []
        for block, (folder, _) in enumerate(EMOS.items()):
            (root / spk / folder).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                uid = f"{spk}_{block * 350 + k + 1:06d}"
                sf.write(root / spk / folder / f"{uid}.wav", _tone(), 16000)
                lines.append(f"{uid}\tsentence number {k}\t{folder}")
        (root / spk / f"{spk}.txt").write_text("\n".join(lines) + "\n")
    return {"format": "esd", "root": str(root), "emotions": EMOS, "ident_speakers": ["0011"], "eval_speakers": ["0016"]}


EVC = {"source_emotion": "neutral", "target_emotions": ["angry", "happy"], "prompt": "Speak {target_emotion}."}
SER = {"labels": ["neutral", "angry", "happy"], "prompt": "Which?\n{options}", "option_seed": 0}


def test_esd_and_instances(tmp_path):
    cfg = make_esd(tmp_path)
    rows = read_esd(cfg)
    assert len(rows) == 12 and {r["split"] for r in rows} == {"ident", "eval"}
    evc = build_instances("evc", EVC, rows)
    assert len(evc) == 2 * 2 * 2  # speakers x neutral utterances x targets
    assert evc[0].id.endswith("->angry") and evc[0].prompt == "Speak angry." and evc[0].text
    ser = build_instances("ser", SER, rows)
    assert len(ser) == 12 and all(sorted(i.options) == sorted(SER["labels"]) for i in ser)
    assert all(f"{k}. {o}" in i.prompt for i in ser for k, o in enumerate(i.options, 1))


def test_esd_bad_inputs(tmp_path):
    cfg = make_esd(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        read_esd({**cfg, "root": str(tmp_path / "nope")})
    txt = tmp_path / "0011" / "0011.txt"
    txt.write_text(txt.read_text() + "0011_000009\tx\tBored\n")
    with pytest.raises(DataError, match="Bored"):
        read_esd(cfg)
    txt.write_text("0011_000001\tonly two fields\n")
    with pytest.raises(DataError, match="0011.txt:1"):
        read_esd(cfg)
    txt.unlink()
    with pytest.raises(DataError, match="0011.txt is missing"):
        read_esd(cfg)


def test_emobox(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(), 16000)
    (tmp_path / "id.jsonl").write_text(json.dumps({"key": "Ses01_a", "wav": "a.wav", "emo": "ang"}) + "\n")
    (tmp_path / "ev.jsonl").write_text(json.dumps({"key": "Ses05_b", "wav": "a.wav", "emo": "neu"}) + "\n")
    cfg = {"format": "emobox", "ident_manifest": str(tmp_path / "id.jsonl"), "eval_manifest": str(tmp_path / "ev.jsonl"),
           "emotions": {"ang": "angry", "neu": "neutral"}}
    rows = read_emobox(cfg)
    assert [r["emotion"] for r in rows] == ["angry", "neutral"] and rows[0]["wav"] == str(tmp_path / "a.wav")
    (tmp_path / "ev.jsonl").write_text(json.dumps({"key": "b", "wav": "a.wav", "emo": "xxx"}) + "\n")
    with pytest.raises(DataError, match="ev.jsonl:1.*xxx"):
        read_emobox(cfg)


def test_bad_audio_is_named_and_skipped(tmp_path):
    cfg = make_esd(tmp_path)
    rows = read_esd(cfg)
    ser = build_instances("ser", SER, rows)
    silent, corrupt = ser[0].wav, ser[1].wav
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    open(corrupt, "wb").write(b"not a wav file")
    kept, bad = check_audio(ser, {"on_bad_audio": "skip"})
    assert len(kept) == len(ser) - 2 and {b["wav"] for b in bad} == {silent, corrupt}
    assert any("silent" in b["error"] for b in bad) and any("unreadable" in b["error"] for b in bad)
    with pytest.raises(AudioError, match="silent|unreadable"):
        check_audio(ser, {"on_bad_audio": "error"})


def test_load_audio_checks(tmp_path):
    p = tmp_path / "x.wav"
    sf.write(p, _tone(sr=22050), 22050)
    assert abs(len(load_audio(p, 16000)) - 8000) <= 1
    with pytest.raises(AudioError, match="22050 Hz, expected 16000"):
        load_audio(p, 16000, expected_sr=16000)
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "missing.wav", 16000)
    sf.write(p, _tone(sec=0.01), 16000)
    with pytest.raises(AudioError, match="too short"):
        load_audio(p, 16000)


def test_parse_answer_order():
    opts = ["sad", "happy", "angry"]
    assert parse_answer("2", opts) == "happy"
    assert parse_answer("The answer is 3.", opts) == "angry"
    assert parse_answer("option 7 or 1", opts) == "sad"  # out-of-range digits are skipped
    assert parse_answer("Two.", opts) == "happy"
    assert parse_answer("The speaker sounds angry", opts) == "angry"
    assert parse_answer("sadness, mostly", opts) == "sad"
    assert parse_answer("no idea", opts) == ""


def test_option_order_is_seeded():
    labels = ["a", "b", "c", "d", "e"]
    assert option_order(labels, "k1", 0) == option_order(labels, "k1", 0)
    orders = {tuple(option_order(labels, f"k{i}", 0)) for i in range(20)}
    assert len(orders) > 5
    with pytest.raises(ValueError, match="options"):
        ser_prompt("no placeholder", labels)


def test_shard_of_is_stable():
    ids = [f"u{i}" for i in range(200)]
    shards = [shard_of(i, 4) for i in ids]
    assert set(shards) == {0, 1, 2, 3}
    assert shards == [shard_of(i, 4) for i in ids]


def _evc_judged():
    return pd.DataFrame(
        {
            "id": [f"i{k}" for k in range(8)], "split": "ident", "status": "ok",
            "target": ["angry"] * 4 + ["happy"] * 4,
            "pred": ["angry", "angry", "angry", "sad", "happy", "happy", "sad", "sad"],
            "wer": [0.0, 0.05, 0.5, 0.0, 0.0, 0.2, 0.0, 0.0],
            "wer_edits": [0, 1, 5, 0, 0, 2, 0, 0],
            "ref_words": [10, 20, 10, 10, 10, 10, 10, 10],
            "refusal": [False, False, False, False, False, False, False, True],
            "empty": False,
        }
    )


def test_decide_evc():
    d = decide(_evc_judged(), "evc", 0.1)
    assert d["success"].tolist() == [True, True, False, False, True, False, False, False]
    d2 = decide(_evc_judged(), "evc", None)
    assert d2["success"].tolist() == [True, True, True, False, True, True, False, False]


def test_keep_caps_to_smallest_and_is_deterministic():
    d = decide(_evc_judged(), "evc", None)
    with pytest.warns(UserWarning, match="c = 50"):
        kept, summary = keep(d, "evc", ["angry", "happy"], c=50, seed=0, on_too_few="warn")
    assert summary["available"].tolist() == [3, 2] and summary["kept"].tolist() == [2, 2]
    assert kept.groupby("emotion").size().tolist() == [2, 2]
    again, _ = keep(d, "evc", ["angry", "happy"], c=2, seed=0)
    pd.testing.assert_frame_equal(kept, again)
    picks = {tuple(keep(d, "evc", ["angry", "happy"], c=1, seed=s)[0]["id"]) for s in range(10)}
    assert len(picks) > 1
    unfiltered, _ = keep(d, "evc", ["angry", "happy"], c=4, seed=0, use_filter=False)
    assert len(unfiltered) == 8


def test_keep_too_few():
    d = decide(_evc_judged(), "evc", 0.0)
    d.loc[d["target"] == "happy", "success"] = False
    with pytest.raises(TooFewSuccesses, match="happy"):
        keep(d, "evc", ["angry", "happy"], c=5, seed=0)
    with pytest.raises(TooFewSuccesses):  # warn still fails when an emotion has none
        keep(d, "evc", ["angry", "happy"], c=5, seed=0, on_too_few="warn")


def test_keep_error_mode_checks_c_not_min_per_emotion():
    """Issue 9 case 7: with on_too_few: error, fewer than c successes for any emotion fails, naming counts."""
    d = decide(_evc_judged(), "evc", None)  # successes: angry 3, happy 2
    kept, _ = keep(d, "evc", ["angry", "happy"], c=2, seed=0)  # enough for c: fine
    assert kept.groupby("emotion").size().tolist() == [2, 2]
    with pytest.raises(TooFewSuccesses, match=r"filter\.c = 3.*happy: 2 < 3") as err:
        keep(d, "evc", ["angry", "happy"], c=3, seed=0, on_too_few="error", min_per_emotion=1)
    assert "angry: 3" not in str(err.value).split("short")[-1]  # only the short emotions are listed as short
    assert "on_too_few: warn" in str(err.value)  # the way out is named once, in error mode


def test_keep_warn_mode_message_and_floor():
    d = decide(_evc_judged(), "evc", None)  # successes: angry 3, happy 2
    with pytest.warns(UserWarning, match=r"happy: 2 < 3") as rec:
        kept, summary = keep(d, "evc", ["angry", "happy"], c=3, seed=0, on_too_few="warn")
    msg = str(rec[0].message)
    assert "on_too_few: warn" not in msg and "set filter.on_too_few" not in msg  # already set
    assert summary["kept"].tolist() == [2, 2] and len(kept) == 4
    # mean per-utterance WER and corpus WER of the identification outputs, per emotion
    assert summary["wer"].tolist() == pytest.approx([0.1375, 0.05])
    assert summary["corpus_wer"].tolist() == pytest.approx([(0 + 1 + 5 + 0) / 50, (0 + 2 + 0 + 0) / 40])
    # Below the floor min_per_emotion even warn fails, and says which key to change.
    with pytest.raises(TooFewSuccesses, match=r"min_per_emotion = 3.*happy: 2") as err:
        keep(d, "evc", ["angry", "happy"], c=5, seed=0, on_too_few="warn", min_per_emotion=3)
    assert "on_too_few: warn" not in str(err.value)
    with pytest.raises(ValueError, match="min_per_emotion.*exceeds.*c"):
        keep(d, "evc", ["angry", "happy"], c=2, seed=0, on_too_few="warn", min_per_emotion=3)


def test_dataset_fingerprint_tracks_content_not_location(tmp_path):
    import shutil

    from emotion_neurons.config import clear_caches, dataset_fingerprint

    cfg = make_esd(tmp_path / "a")
    fp = dataset_fingerprint(cfg)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert dataset_fingerprint({**cfg, "root": str(tmp_path / "b")}) == fp  # moved corpus: cache still valid
    sf.write(tmp_path / "a" / "0011" / "Neutral" / "0011_000003.wav", _tone(), 16000)  # an added utterance
    clear_caches()
    assert dataset_fingerprint(cfg) != fp
    assert dataset_fingerprint({**cfg, "root": str(tmp_path / "nope")}) == "missing"


def _emobox_manifest(tmp_path, counts: dict[str, int], speakers: int = 3) -> dict:
    sf.write(tmp_path / "a.wav", _tone(), 16000)
    lines = [json.dumps({"key": f"Ses01_{e}_{i:03d}", "wav": "a.wav", "emo": e, "speaker": f"spk{i % speakers}"})
             for e, n in counts.items() for i in range(n)]
    (tmp_path / "ev.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "id.jsonl").write_text(json.dumps({"key": "Ses02_x", "wav": "a.wav", "emo": "ang"}) + "\n")
    return {"format": "emobox", "ident_manifest": str(tmp_path / "id.jsonl"), "eval_manifest": str(tmp_path / "ev.jsonl"),
            "emotions": {"ang": "angry", "neu": "neutral", "sad": "sad"}}


def test_balanced_test_set_per_emotion(tmp_path):
    """Paper B's test sets: n per emotion, seeded, spread over speakers, independent of manifest order."""
    cfg = _emobox_manifest(tmp_path, {"ang": 30, "neu": 12, "sad": 9})
    rows = read_emobox({**cfg, "eval_per_emotion": 7, "eval_sample_seed": 3})
    ev = [r for r in rows if r["split"] == "eval"]
    assert pd.Series([r["emotion"] for r in ev]).value_counts().to_dict() == {"angry": 7, "neutral": 7, "sad": 7}
    spk = pd.Series([r["speaker"] for r in ev if r["emotion"] == "angry"]).value_counts()
    assert spk.max() - spk.min() <= 1  # 7 over 3 speakers: 3/2/2
    assert [r for r in rows if r["split"] == "ident"] == [r for r in read_emobox(cfg) if r["split"] == "ident"]
    # same seed, shuffled manifest: the same utterances; another seed: another draw
    lines = (tmp_path / "ev.jsonl").read_text().splitlines()
    (tmp_path / "ev.jsonl").write_text("\n".join(lines[::-1]) + "\n")
    again = read_emobox({**cfg, "eval_per_emotion": 7, "eval_sample_seed": 3})
    assert sorted(r["key"] for r in again if r["split"] == "eval") == sorted(r["key"] for r in ev)
    other = read_emobox({**cfg, "eval_per_emotion": 7, "eval_sample_seed": 4})
    assert sorted(r["key"] for r in other if r["split"] == "eval") != sorted(r["key"] for r in ev)
    # sizes per emotion; an emotion not named is left out
    per = read_emobox({**cfg, "eval_per_emotion": {"angry": 20, "sad": 9}})
    assert pd.Series([r["emotion"] for r in per if r["split"] == "eval"]).value_counts().to_dict() == {
        "angry": 20, "sad": 9}


def test_balanced_test_set_too_few_is_named(tmp_path, caplog):
    cfg = _emobox_manifest(tmp_path, {"ang": 30, "neu": 12, "sad": 9})
    with pytest.raises(DataError, match=r"ev.jsonl: emotion 'sad' has 9 utterances but eval_per_emotion asks for 10"):
        read_emobox({**cfg, "eval_per_emotion": 10})
    rows = read_emobox({**cfg, "eval_per_emotion": 10, "on_too_few": "warn"})
    assert "emotion 'sad' has 9" in caplog.text
    assert pd.Series([r["emotion"] for r in rows if r["split"] == "eval"]).value_counts().to_dict() == {
        "angry": 10, "neutral": 10, "sad": 9}
    with pytest.raises(DataError, match=r"eval_per_emotion names \['happy'\]"):
        read_emobox({**cfg, "eval_per_emotion": {"happy": 3}})
