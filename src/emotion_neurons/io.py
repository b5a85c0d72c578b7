"""Atomic outputs and validated audio input.

Every output is written to a temporary sibling and renamed into place, so an interrupted job never leaves a
file that Snakemake would trust. Audio problems raise `AudioError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AudioError(ValueError):
    """An utterance that cannot be used (missing, unreadable, empty, silent, bad rate)."""


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


def load_audio(
    path: str | os.PathLike,
    target_sr: int,
    *,
    expected_sr: int | None = None,
    min_seconds: float = 0.1,
    silence_db: float = -60.0,
) -> np.ndarray:
    """Read mono float32 audio resampled to `target_sr`; raise AudioError naming the file on any problem.

    `expected_sr` (when set) rejects files at another rate instead of resampling them silently.
    """
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file does not exist")
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for corrupt input
        raise AudioError(f"{path}: unreadable audio ({e})") from None
    if expected_sr is not None and sr != expected_sr:
        raise AudioError(f"{path}: sample rate {sr} Hz, expected {expected_sr} Hz")
    wav = wav.mean(axis=1)
    if wav.size < max(1, int(min_seconds * sr)):
        raise AudioError(f"{path}: too short ({wav.size / max(sr, 1):.3f} s < {min_seconds} s)")
    if not np.all(np.isfinite(wav)):
        raise AudioError(f"{path}: contains NaN or infinite samples")
    rms = float(np.sqrt(np.mean(wav.astype(np.float64) ** 2)))
    if rms == 0.0 or 20 * np.log10(rms) < silence_db:
        raise AudioError(f"{path}: silent (RMS below {silence_db} dBFS)")
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
