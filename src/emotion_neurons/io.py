"""Atomic outputs and validated audio input.

Every output is written to a temporary sibling and renamed into place, so an interrupted job never leaves a
file that Snakemake would trust. Audio problems raise `AudioError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AudioError(ValueError):
    """An utterance that cannot be used (missing, unreadable, truncated, empty, silent, bad rate, too long)."""


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp file path next to `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should be shareable
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to `final`; swap it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a killed job (Snakemake runs one writer)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (corpus fingerprints, result-cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_under(root: str | os.PathLike) -> Iterator[Path]:
    """`root` itself if it is a file, else every file below it in sorted order (nothing if it is missing):
    the one tree walk behind tree hashes, result linking and cache garbage collection."""
    root = Path(root)
    if root.is_file():
        yield root
    elif root.is_dir():
        yield from sorted(p for p in root.rglob("*") if p.is_file())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def write_table(path: str | os.PathLike, df) -> None:
    """Write a pandas DataFrame as TSV atomically."""
    with atomic_path(path, ".tsv") as tmp:
        df.to_csv(tmp, sep="\t", index=False)


def read_table(path: str | os.PathLike):
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"table {path} does not exist")
    if not path.read_text().strip():
        return pd.DataFrame()
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])


def write_wav(path: str | os.PathLike, wav: np.ndarray, sr: int) -> None:
    import soundfile as sf

    with atomic_path(path, ".wav") as tmp:
        sf.write(tmp, np.asarray(wav, dtype=np.float32), sr, format="WAV", subtype="PCM_16")


#: a sample at or above this magnitude (about -0.01 dBFS) counts as clipped
CLIP_LEVEL = 0.999


class TooLongAudio(AudioError):
    """Audio longer than the model's input window (it would be cut); handled by `data.on_too_long`."""


@dataclass(frozen=True)
class AudioCheck:
    """What validation learnt about a file besides its samples."""

    seconds: float
    sample_rate: int
    clipped_fraction: float  # share of samples at full scale (|x| >= CLIP_LEVEL), any channel


def wav_truncation(path: str | os.PathLike) -> tuple[int, int] | None:
    """(bytes the RIFF `data` chunk header promises, bytes the file holds) when a WAV file is cut short.

    libsndfile silently reads what is there, so a copy interrupted mid-way looks like a shorter utterance.
    None for non-RIFF files, complete files and streaming placeholders (size 0 or 0xFFFFFFFF).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, n = struct.unpack("<4sI", f.read(8))
            if cid == b"data":
                if n in (0, 0xFFFFFFFF):
                    return None
                have = size - pos - 8
                return (n, have) if n > have else None
            pos += 8 + n + (n & 1)
    return None


def read_checked(
    path: str | os.PathLike,
    *,
    expected_sr: int | None = None,
    min_seconds: float = 0.1,
    silence_db: float = -60.0,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, int, AudioCheck]:
    """Mono float32 samples at the file's rate, its rate and an `AudioCheck`; AudioError names the file.

    Refused: missing, unreadable, truncated (header promises more than the file holds), another rate than
    `expected_sr`, shorter than `min_seconds`, NaN/inf, silent, and (TooLongAudio) longer than `max_seconds`.
    """
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file does not exist")
    try:
        info = sf.info(path)
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
        cut = wav_truncation(path)
    except Exception as e:  # soundfile raises several types for corrupt input
        raise AudioError(f"{path}: unreadable audio ({e})") from None
    if cut is not None:
        block = max(1, info.channels * _bytes_per_sample(info.subtype))
        raise AudioError(
            f"{path}: truncated (header promises {cut[0] // block} frames, the file holds {cut[1] // block})"
        )
    if 0 < wav.shape[0] < info.frames:
        raise AudioError(f"{path}: truncated (header promises {info.frames} frames, {wav.shape[0]} could be read)")
    if expected_sr is not None and sr != expected_sr:
        raise AudioError(f"{path}: sample rate {sr} Hz, expected {expected_sr} Hz")
    seconds = wav.shape[0] / max(sr, 1)
    if wav.shape[0] < max(1, int(min_seconds * sr)):
        raise AudioError(f"{path}: too short ({seconds:.3f} s < {min_seconds} s)")
    if not np.all(np.isfinite(wav)):
        raise AudioError(f"{path}: contains NaN or infinite samples")
    if max_seconds is not None and seconds > max_seconds:
        raise TooLongAudio(
            f"{path}: too long ({seconds:.2f} s > the model's {max_seconds:g} s input window; it would be cut)"
        )
    clipped = float(np.mean(np.abs(wav) >= CLIP_LEVEL)) if wav.size else 0.0
    wav = wav.mean(axis=1)
    rms = float(np.sqrt(np.mean(wav.astype(np.float64) ** 2)))
    if rms == 0.0 or 20 * np.log10(rms) < silence_db:
        raise AudioError(f"{path}: silent (RMS below {silence_db} dBFS)")
    return wav, sr, AudioCheck(seconds, sr, clipped)


def _bytes_per_sample(subtype: str) -> int:
    m = re.search(r"(\d+)$", subtype)
    if m:
        return max(1, int(m.group(1)) // 8)
    return {"FLOAT": 4, "DOUBLE": 8, "ULAW": 1, "ALAW": 1}.get(subtype, 2)


def load_audio(
    path: str | os.PathLike,
    target_sr: int,
    *,
    expected_sr: int | None = None,
    min_seconds: float = 0.1,
    silence_db: float = -60.0,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Read mono float32 audio resampled to `target_sr`; raise AudioError naming the file on any problem.

    `expected_sr` (when set) rejects files at another rate instead of resampling them silently;
    `max_seconds` (the model's input window) rejects files the model would cut (TooLongAudio).
    """
    wav, sr, _ = read_checked(
        path, expected_sr=expected_sr, min_seconds=min_seconds, silence_db=silence_db, max_seconds=max_seconds
    )
    if sr != target_sr:
        wav = resample(wav, sr, target_sr)
    return wav.astype(np.float32)


def resample(wav: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Band-limited polyphase resampling (scipy ``resample_poly``, Kaiser-windowed sinc) to float32.

    Why: emotion2vec and Whisper expect 16 kHz; models output 22.05/24 kHz. Polyphase filtering avoids
    the aliasing of naive interpolation. Output length is ``ceil(len * sr_to / sr_from)``.
    """
    from scipy.signal import resample_poly

    sr_from, sr_to = int(sr_from), int(sr_to)
    if sr_from <= 0 or sr_to <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_from} -> {sr_to}")
    x = np.asarray(wav)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    x = x.astype(np.float32, copy=False)
    if sr_from == sr_to or x.shape[0] == 0:
        return x.copy()
    g = math.gcd(sr_from, sr_to)
    y = resample_poly(x, sr_to // g, sr_from // g, axis=0)
    return np.ascontiguousarray(y, dtype=np.float32)
