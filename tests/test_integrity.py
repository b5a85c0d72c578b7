"""Nothing bad gets through silently (issue 9): each case is refused, skipped or warned about, with a name."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from emotion_neurons import retry
from emotion_neurons.config import adapter_input_window, check_run_name
from emotion_neurons.io import AudioError, TooLongAudio, load_audio, read_jsonl, read_table
from emotion_neurons.stages import prepare as data_mod
from emotion_neurons.stages.prepare import DataError, build_instances, check_audio, read_dataset, read_esd

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EMOS = {"Neutral": "neutral", "Angry": "angry", "Happy": "happy"}
SER = {"labels": ["neutral", "angry", "happy"], "prompt": "Which?\n{options}", "option_seed": 0}
EVC = {"source_emotion": "neutral", "target_emotions": ["angry", "happy"], "prompt": "Speak {target_emotion}."}


def tone(sec=0.5, sr=16000, amp=0.3):
    t = np.arange(int(sr * sec)) / sr
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def make_esd(root: Path, speakers=("0011", "0016"), n=2) -> dict:
    for spk in speakers:
        lines = []
        for block, folder in enumerate(EMOS):
            (root / spk / folder).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                uid = f"{spk}_{block * 350 + k + 1:06d}"
                sf.write(root / spk / folder / f"{uid}.wav", tone(), 16000)
                lines.append(f"{uid}\tsentence number {k}\t{folder}")
        (root / spk / f"{spk}.txt").write_text("\n".join(lines) + "\n")
    return {"format": "esd", "root": str(root), "emotions": EMOS, "ident_speakers": [speakers[0]],
            "eval_speakers": list(speakers[1:])}


def prepare(tmp_path: Path, dataset: dict, data: dict | None = None, task="ser", max_audio_seconds=None):
    """Run stage 0's entry point; return (manifest rows, bad_audio table, warnings table)."""
    out = tmp_path / "out"
    params = {"task": task, "task_cfg": SER if task == "ser" else EVC, "dataset": dataset,
              "data": {"on_bad_audio": "skip", "min_seconds": 0.1, **(data or {})},
              "max_audio_seconds": max_audio_seconds}
    data_mod.main(["--params", json.dumps(params), "--out", str(out / "instances.jsonl"),
                   "--bad", str(out / "bad_audio.tsv"), "--warnings", str(out / "warnings.tsv")])
    return read_jsonl(out / "instances.jsonl"), read_table(out / "bad_audio.tsv"), read_table(out / "warnings.tsv")


# -- 1. one stem in two emotion folders -------------------------------------------------------------------------


def test_same_stem_in_two_emotion_folders_is_refused_naming_both(tmp_path):
    cfg = make_esd(tmp_path)
    neutral = tmp_path / "0011" / "Neutral" / "0011_000001.wav"
    stray = tmp_path / "0011" / "Angry" / "0011_000001.wav"
    shutil.copy(neutral, stray)
    with pytest.raises(DataError) as e:
        read_esd(cfg)
    assert str(neutral) in str(e.value) and str(stray) in str(e.value) and "0011_000001" in str(e.value)


# -- 2. duplicate utterance ids -----------------------------------------------------------------------------------


def test_duplicate_id_in_esd_transcript_is_refused_at_preparation(tmp_path):
    cfg = make_esd(tmp_path)
    txt = tmp_path / "0011" / "0011.txt"
    lines = txt.read_text().splitlines()
    txt.write_text("\n".join([*lines, lines[0]]) + "\n")  # line 7 repeats line 1
    with pytest.raises(DataError) as e:
        prepare(tmp_path, cfg)
    msg = str(e.value)
    assert "'0011_000001'" in msg and f"{txt}:1" in msg and f"{txt}:{len(lines) + 1}" in msg


def test_duplicate_key_across_emobox_manifests_names_both_lines(tmp_path):
    sf.write(tmp_path / "a.wav", tone(), 16000)
    ident, ev = tmp_path / "id.jsonl", tmp_path / "ev.jsonl"
    ident.write_text(json.dumps({"key": "Ses01_a", "wav": "a.wav", "emo": "ang"}) + "\n")
    ev.write_text("\n".join(json.dumps({"key": k, "wav": "a.wav", "emo": "neu"}) for k in ("Ses05_b", "Ses01_a")) + "\n")
    cfg = {"format": "emobox", "ident_manifest": str(ident), "eval_manifest": str(ev),
           "emotions": {"ang": "angry", "neu": "neutral"}}
    with pytest.raises(DataError) as e:
        read_dataset(cfg)
    assert "'Ses01_a'" in str(e.value) and f"{ident}:1" in str(e.value) and f"{ev}:2" in str(e.value)


# -- 3. wav without transcript line, line without wav -------------------------------------------------------------


def test_unmatched_wavs_and_lines_are_listed_or_refused(tmp_path):
    cfg = make_esd(tmp_path)
    orphan = tmp_path / "0011" / "Happy" / "0011_000999.wav"
    sf.write(orphan, tone(), 16000)
    txt = tmp_path / "0016" / "0016.txt"
    n_lines = len(txt.read_text().splitlines())
    txt.write_text(txt.read_text() + "0016_000777\tno audio for this line\tAngry\n")
    rows, bad, warn = prepare(tmp_path, cfg)
    assert len(rows) == 12 and bad.empty
    by_kind = dict(zip(warn["kind"], zip(warn["where"], warn["id"], strict=True), strict=True))
    assert by_kind["wav_without_transcript"] == (str(orphan), "0011_000999")
    assert by_kind["transcript_without_wav"] == (f"{txt}:{n_lines + 1}", "0016_000777")
    assert data_mod.issue_counts(tmp_path / "out" / "bad_audio.tsv", tmp_path / "out" / "warnings.tsv") == {
        "bad_audio": 0, "too_long": 0, "wav_without_transcript": 1, "transcript_without_wav": 1, "clipped": 0}
    with pytest.raises(DataError, match=f"{orphan}.*wav without transcript.*on_unmatched"):
        read_esd(cfg, on_unmatched="error")
    orphan.unlink()
    with pytest.raises(DataError, match=f"{txt}:{n_lines + 1}: transcript without wav"):
        read_esd(cfg, on_unmatched="error")


# -- 4. audio longer than the model's input window ----------------------------------------------------------------


def test_too_long_audio_is_skipped_with_reason_or_refused(tmp_path):
    cfg = make_esd(tmp_path)
    long_wav = tmp_path / "0011" / "Angry" / "0011_000351.wav"
    sf.write(long_wav, tone(sec=31.0), 16000)
    with pytest.raises(TooLongAudio, match="input window"):
        load_audio(long_wav, 16000, max_seconds=30)
    assert len(load_audio(long_wav, 16000, max_seconds=31)) == 31 * 16000  # exactly the window is fine
    rows, bad, _ = prepare(tmp_path, cfg, max_audio_seconds=30.0)
    assert str(long_wav) not in {r["wav"] for r in rows} and len(rows) == 11
    assert bad["wav"].tolist() == [str(long_wav)] and bad["kind"].tolist() == ["too_long"]
    assert "31.00 s > the model's 30 s input window" in bad["error"].iloc[0]
    with pytest.raises(DataError, match=f"{long_wav}: too long.*on_too_long"):
        prepare(tmp_path, cfg, data={"on_too_long": "error"}, max_audio_seconds=30.0)
    rows, bad, _ = prepare(tmp_path, cfg, max_audio_seconds=None)  # a model without a known window keeps it
    assert len(rows) == 12 and bad.empty


def test_input_window_comes_from_the_adapter_class():
    from emotion_neurons.models import available
    from emotion_neurons.models.qwen_omni import QwenOmniAdapter

    assert QwenOmniAdapter.max_audio_seconds == 30 and adapter_input_window("qwen2_5_omni") == 30.0
    for name in available():  # the Snakefile's torch-free reading equals the class attribute
        from emotion_neurons.models import entry

        module, cls = entry(name).target.split(":")
        attr = getattr(__import__(module, fromlist=[cls]), cls).max_audio_seconds
        assert adapter_input_window(name) == (None if attr is None else float(attr)), name


def test_generation_refuses_audio_the_model_would_cut(tmp_path):
    from toy import ToyAdapter

    from emotion_neurons.stages.generate import run
    from emotion_neurons.types import GenerationSettings, Instance

    class Windowed(ToyAdapter):
        max_audio_seconds = 0.4

    a = Windowed()
    a.load()
    inst = []
    for i, sec in enumerate((0.3, 0.5)):
        sf.write(tmp_path / f"u{i}.wav", tone(sec=sec), 16000)
        inst.append(Instance(id=f"u{i}", task="ser", wav=str(tmp_path / f"u{i}.wav"), speaker="s", emotion="sad",
                             split="ident", prompt="p", options=["sad", "happy"]))
    df = run(a, inst, GenerationSettings(max_new_tokens=2), out_table=tmp_path / "o.tsv", wav_dir=None)
    status = dict(zip(df["id"], df["status"], strict=True))
    assert status["u0"] == "ok" and status["u1"].startswith("bad_audio") and "input window" in status["u1"]


# -- 5. truncated and clipped wavs ---------------------------------------------------------------------------------


def test_truncated_wav_is_bad_audio(tmp_path):
    for subtype in ("PCM_16", "FLOAT"):
        p = tmp_path / f"cut-{subtype}.wav"
        sf.write(p, tone(sec=1.0), 16000, subtype=subtype)
        raw = p.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])  # the data chunk header still promises 16000 frames
        with pytest.raises(AudioError, match=r"truncated \(header promises 16000 frames, the file holds 7\d\d\d\)"):
            load_audio(p, 16000)
    whole = tmp_path / "whole.wav"
    sf.write(whole, tone(sec=1.0), 16000)
    assert len(load_audio(whole, 16000)) == 16000
    cfg = make_esd(tmp_path / "esd")
    victim = tmp_path / "esd" / "0016" / "Happy" / "0016_000701.wav"
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) - 1000])
    kept, bad = check_audio(build_instances("ser", SER, read_esd(cfg)), {"on_bad_audio": "skip"})
    assert [b["wav"] for b in bad] == [str(victim)] and "truncated" in bad[0]["error"] and len(kept) == 11


def test_clipped_wav_is_kept_with_a_warning_and_its_fraction(tmp_path, caplog):
    cfg = make_esd(tmp_path)
    loud = tmp_path / "0011" / "Neutral" / "0011_000002.wav"
    x = tone(sec=1.0, amp=0.3)
    x[:500], x[500:800] = 1.0, -1.0  # 800 of 16000 samples (5%) at full scale
    sf.write(loud, x, 16000)
    ser = build_instances("ser", SER, read_esd(cfg))
    notes: list[dict] = []
    kept, bad = check_audio(ser, {"on_bad_audio": "skip"}, notes=notes)
    assert len(kept) == len(ser) and not bad
    assert [(n["kind"], n["where"]) for n in notes] == [("clipped", str(loud))] and "5.00% of samples" in notes[0]["detail"]
    assert any("clipped" in r.message and str(loud) in r.getMessage() for r in caplog.records)
    notes.clear()
    check_audio(ser, {"on_bad_audio": "skip", "clip_warn_fraction": 0.1}, notes=notes)
    assert notes == []  # the threshold key decides


# -- 6. skipped audio is counted for the console and the report ------------------------------------------------


def test_skip_counts_reach_the_message_and_the_report(tmp_path):
    cfg = make_esd(tmp_path)
    sf.write(tmp_path / "0011" / "Angry" / "0011_000351.wav", tone(sec=3.0), 16000)  # too long for a 2 s window
    sf.write(tmp_path / "0011" / "Angry" / "0011_000352.wav", np.zeros(8000, np.float32), 16000)  # silent
    prepare(tmp_path, cfg, max_audio_seconds=2.0)
    tables = {"ser": [str(tmp_path / "out" / "bad_audio.tsv"), str(tmp_path / "out" / "warnings.tsv")]}
    msg = data_mod.issue_message(tables)
    assert "ser: 2 audio file(s) skipped (1 bad, 1 longer than the model's input window)" in msg
    from emotion_neurons.stages.report import build

    html = build({"run": str(tmp_path), "tasks": [], "data_tables": tables})
    table = pd.read_html(html.split("Input skipped")[1])[0] if _has_lxml() else None
    assert "Input skipped or warned about" in html
    if table is not None:
        assert table[["task", "bad_audio", "too_long"]].values.tolist() == [["ser", 1, 1]]
    else:
        assert "<td>ser</td>" in html and html.count("<td>1</td>") >= 2


def _has_lxml() -> bool:
    try:
        import lxml  # noqa: F401
    except ImportError:
        return False
    return True


# -- 8. run_name ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [".", "..", "a/b", "../up", "cache", ""])
def test_run_name_outside_results_is_refused(bad):
    with pytest.raises(ValueError, match="run_name"):
        check_run_name(bad)


def test_run_name_ok():
    assert check_run_name("qwen2_5_omni-esd.v2") == "qwen2_5_omni-esd.v2"


# -- 10. retry only what a retry can fix ------------------------------------------------------------------------


def test_failure_classification():
    import torch

    transient = [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                 RuntimeError("CUDA error: out of memory"), ConnectionError("reset by peer"), TimeoutError()]
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except RuntimeError as e:
            raise RuntimeError("generation failed") from e
    except RuntimeError as e:
        transient.append(e)  # an OOM wrapped by the library is still an OOM
    permanent = [FileNotFoundError("Qwen2.5-Omni model directory not found: /x"), DataError("bad data"),
                 AudioError("x.wav: silent"), OSError(errno.ENOSPC, "No space left on device"), KeyError("adapter"),
                 ValueError("mask has 3 layers"), RuntimeError("size mismatch")]
    assert [retry.is_transient(e) for e in transient] == [True] * len(transient)
    assert [retry.is_transient(e) for e in permanent] == [False] * len(permanent)


def test_run_stage_marks_permanent_failures_only(capsys):
    def missing():
        raise FileNotFoundError("model directory not found: /nope")

    def oom():
        raise MemoryError("host out of memory")

    assert retry.run_stage(missing) == retry.PERMANENT_EXIT
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1].startswith(f"{retry.PERMANENT_MARKER}: FileNotFoundError: model directory")
    with pytest.raises(MemoryError):
        retry.run_stage(oom)
    assert retry.PERMANENT_MARKER not in capsys.readouterr().err


def test_guard_refuses_only_a_retry_after_a_permanent_failure(tmp_path):
    log = tmp_path / "job.log"
    kept = retry.previous_log(log)
    assert retry.main(["--log", str(log), "--attempt", "2"]) == 0  # no previous attempt recorded
    log.write_text("Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory\n")
    assert retry.main(["--log", str(log), "--failed", "1"]) == 1 and kept.read_text() == log.read_text()
    log.unlink()  # Snakemake deletes the log before the next attempt
    assert retry.main(["--log", str(log), "--attempt", "2"]) == 0  # an OOM is retried
    failed = "loading\r 10%|#  |\rTraceback ...\n" + f"{retry.PERMANENT_MARKER}: FileNotFoundError: x\n"
    log.write_text(failed)
    assert retry.main(["--log", str(log), "--failed", "3"]) == 3
    log.unlink()
    assert retry.main(["--log", str(log), "--attempt", "1"]) == 0  # left by an earlier run: never blocks
    assert not kept.exists()
    log.write_text(failed)
    retry.main(["--log", str(log), "--failed", "3"])
    log.unlink()
    assert retry.main(["--log", str(log), "--attempt", "2"]) == retry.PERMANENT_EXIT
    text = log.read_bytes().decode()  # attempt 1's log is back, with the reason the retry did not run
    assert text.startswith(failed) and text.splitlines()[-1].startswith("attempt 2 not run: attempt 1 ended with")


# -- 12. output wav names -------------------------------------------------------------------------------------


def test_output_wav_names_are_unique_and_visible(tmp_path):
    from toy import ToyAdapter

    from emotion_neurons.stages.generate import run
    from emotion_neurons.types import GenerationOutput, GenerationSettings, Instance

    ids = ["a/b", "a_b", ".hidden", "..", "0011_000001->angry"]

    class Speaking(ToyAdapter):  # answers instance k with a tone of amplitude (k + 1) / 10
        def generate(self, prepared, settings):
            return [GenerationOutput(text=o.text, wav=tone(sec=0.1, amp=(ids.index(i.id) + 1) / 10), sample_rate=16000,
                                     n_generated=o.n_generated)
                    for i, o in zip(prepared.instances, super().generate(prepared, settings), strict=True)]

    a = Speaking()
    a.load()
    sf.write(tmp_path / "src.wav", tone(), 16000)
    inst = [Instance(id=i, task="evc", wav=str(tmp_path / "src.wav"), speaker="s", emotion="neutral",
                     split="ident", prompt=f"p{k}", target="angry") for k, i in enumerate(ids)]
    out = tmp_path / "shard"
    df = run(a, inst, GenerationSettings(max_new_tokens=2, want_audio=True), out_table=out / "outputs.tsv",
             wav_dir=out / "wavs", batch_size=1)
    table = read_table(out / "outputs.tsv")
    names = dict(zip(table["id"], table["output_wav"], strict=True))
    assert len(set(names.values())) == len(ids)  # one file per id
    files = sorted(p.name for p in (out / "wavs").iterdir())
    assert len(files) == len(ids) and not any(f.startswith(".") for f in files)
    for k, i in enumerate(ids):  # each table row points at its own audio
        wav, _ = sf.read(out / names[i], dtype="float32")
        assert np.allclose(wav, tone(sec=0.1, amp=(k + 1) / 10), atol=1e-3), i
    assert names["0011_000001->angry"].startswith("wavs/0011_000001-angry-")
    assert df["status"].eq("ok").all()


# -- Snakemake: end-of-run summary (6), retries (10), run_name (8) --------------------------------------------


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1200)


@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.yaml").symlink_to(REPO / "config.yaml")
    cfg = make_esd(tmp_path / "esd")
    sf.write(tmp_path / "esd" / "0011" / "Neutral" / "0011_000002.wav", tone(sec=31.0), 16000)  # > 30 s
    sf.write(tmp_path / "esd" / "0016" / "Neutral" / "0016_000001.wav", np.zeros(8000, np.float32), 16000)
    overlay = {
        "run_name": "integrity",
        "model": {"id": str(tmp_path / "no-such-model")},
        "datasets": {"esd": {**cfg, "emotions": {**cfg["emotions"], "Sad": "sad", "Surprise": "surprise"}}},
        "tasks": {"ser": {"enabled": False}, "evc": {"shards": 1}},
    }
    (wd / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    return wd


def _args(wd: Path) -> list[str]:
    return ["--cores", "1", "--configfile", str(REPO / "config" / "demo-machinery.yaml"), str(wd / "overlay.yaml")]


@pytest.mark.slow
def test_workflow_says_how_many_files_were_skipped(workdir):
    res = snakemake(workdir, *_args(workdir), "--until", "prepare")
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("emotion-neurons evc: 2 audio file(s) skipped (1 bad, 1 longer than the model's input window)"
            in res.stderr), res.stderr[-3000:]


@pytest.mark.slow
def test_workflow_does_not_retry_a_permanent_failure(workdir):
    res = snakemake(workdir, *_args(workdir), "--until", "generate")
    assert res.returncode != 0
    (log,) = (workdir / "results" / "cache" / "stage1").glob("evc-*/logs/generate-0-of-1.log")
    text = log.read_text()
    assert text.count("Traceback (most recent call last)") == 1 and text.count("identification instances") == 1
    assert f"{retry.PERMANENT_MARKER}: FileNotFoundError" in text
    assert text.rstrip().splitlines()[-1].startswith("attempt 2 not run: attempt 1 ended with an error")
    assert "attempt 2 not run" in res.stderr


@pytest.mark.slow
def test_workflow_refuses_dot_dot_run_name(workdir):
    res = snakemake(workdir, "-n", *_args(workdir), "--config", "run_name=..")
    assert res.returncode != 0 and "run_name" in res.stderr + res.stdout
    assert not (workdir / "results").exists()
