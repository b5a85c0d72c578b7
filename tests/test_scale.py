"""Paper-scale plumbing: per-process memos of code hashes and corpus fingerprints, content-based keys."""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from emotion_neurons import config as C


def _esd(root, n=3):
    emos = {"Neutral": "neutral", "Angry": "angry"}
    for spk in ("0011", "0016"):
        lines = []
        for b, folder in enumerate(emos):
            (root / spk / folder).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                uid = f"{spk}_{b * 350 + k + 1:06d}"
                sf.write(root / spk / folder / f"{uid}.wav", np.full(1600, 0.1 * (k + 1), np.float32), 16000)
                lines.append(f"{uid}\tsentence {k}\t{folder}")
        (root / spk / f"{spk}.txt").write_text("\n".join(lines) + "\n")
    return {"format": "esd", "root": str(root), "emotions": emos, "ident_speakers": ["0011"], "eval_speakers": ["0016"]}


def test_same_size_in_place_edit_changes_the_fingerprint(tmp_path):
    cfg = _esd(tmp_path / "esd")
    fp = C.dataset_fingerprint(cfg)
    wav = tmp_path / "esd" / "0011" / "Angry" / "0011_000351.wav"
    size = wav.stat().st_size
    sf.write(wav, np.full(1600, -0.3, np.float32), 16000)  # same frames, same size, other samples
    assert wav.stat().st_size == size
    os.utime(wav, ns=(wav.stat().st_atime_ns, wav.stat().st_mtime_ns + 10**9))
    C.clear_caches()
    assert C.dataset_fingerprint(cfg) != fp


def test_fingerprint_is_memoised_and_cached_on_disk(tmp_path, monkeypatch):
    cfg = _esd(tmp_path / "esd")
    reads = []
    real = C._file_digests

    def spy(paths):
        reads.append(len(paths))
        return real(paths)

    monkeypatch.setattr(C, "_file_digests", spy)
    fp = C.dataset_fingerprint(cfg)
    assert C.dataset_fingerprint(cfg) == fp and reads == [14]  # 12 wavs + 2 transcripts; second call in the same process: no walk at all
    cache = json.loads(C._hash_cache_file().read_text())
    assert len(cache) == 14 and all(len(v[2]) == 64 for v in cache.values())
    # a new process (memo cleared) reuses the on-disk digests: no file is opened for reading
    C.clear_caches()
    opened = []
    real_open = open

    def spy_open(f, *a, **k):
        if str(f).endswith(".wav"):
            opened.append(f)
        return real_open(f, *a, **k)

    monkeypatch.setattr("builtins.open", spy_open)
    assert C.dataset_fingerprint(cfg) == fp and opened == []


def test_emobox_fingerprint_covers_the_audio_files(tmp_path):
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, np.full(1600, 0.2, np.float32), 16000)
    lines = [json.dumps({"key": k, "wav": f"{k}.wav", "emo": "ang"}) for k in ("a", "b")]
    (tmp_path / "ident.jsonl").write_text("\n".join(lines[:1]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[1:]) + "\n")
    cfg = {"format": "emobox", "ident_manifest": str(tmp_path / "ident.jsonl"),
           "eval_manifest": str(tmp_path / "eval.jsonl"), "emotions": {"ang": "angry"}}
    fp = C.dataset_fingerprint(cfg)
    sf.write(tmp_path / "b.wav", np.full(1600, -0.2, np.float32), 16000)
    os.utime(tmp_path / "b.wav", ns=(1, (tmp_path / "b.wav").stat().st_mtime_ns + 10**9))
    C.clear_caches()
    assert C.dataset_fingerprint(cfg) != fp


def test_every_stage_together_parses_each_file_once(monkeypatch):
    """The stages' closures overlap (config, io, ...): a dry run hashing all of them parses each file once."""
    from emotion_neurons.models import available

    available()  # the adapter declarations are read once per process, before any stage hash (not counted)
    parsed = []
    real = C.ast.parse

    def spy(src, filename="<unknown>", *a, **k):
        parsed.append(filename)
        return real(src, filename, *a, **k)

    monkeypatch.setattr(C.ast, "parse", spy)
    C.clear_caches()
    for stage in C.stages():
        C.code_version(stage, "qwen2_5_omni" if stage in ("generate", "evaluate") else None)
    assert parsed and len(parsed) == len(set(parsed))
    C.clear_caches()


def test_code_version_parses_the_import_closure_once(monkeypatch):
    calls = []
    real = C._package_imports

    def spy(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(C, "_package_imports", spy)
    C.clear_caches()
    v = C.code_version("aggregate")
    n = len(calls)
    assert n > 0
    for _ in range(50):
        assert C.code_version("aggregate") == v
    assert len(calls) == n
