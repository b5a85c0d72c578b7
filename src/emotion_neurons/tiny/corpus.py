"""A small synthetic corpus in the real ESD layout, spoken by espeak-ng.

Why: the pipeline (data loading, EVC instances, judges, filtering) must run end to end offline and in
seconds, without the licensed ESD download. The files follow ESD exactly, so the same loader reads both:

    out/<spk>/<spk>.txt                       lines "<spk>_<6-digit idx>\\t<text>\\t<Emotion>"
    out/<spk>/<Emotion>/<spk>_<idx>.wav       16 kHz mono PCM16

ESD numbers each emotion in blocks of 350 (Neutral 000001.., Angry 000351.., Happy 000701..,
Sad 001051.., Surprise 001401..) and its sentences are parallel: sentence k has the same text in every
emotion. Emotions are acted by per-emotion prosody (pitch, speed, loudness, word gap); speakers differ by
espeak-ng voice variant and base pitch. Everything is deterministic (espeak-ng is).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

ESD_EMOTIONS: tuple[str, ...] = ("Neutral", "Angry", "Happy", "Sad", "Surprise")
"""ESD emotion folder names, in the order of ESD's numbering blocks."""

ESD_BLOCK = 350
"""Utterances per emotion and speaker in ESD; emotion i starts at index i * 350 + 1."""

SENTENCES: tuple[str, ...] = (
    "Please close the door when you leave.",
    "We walked home after the long game.",
    "The children played in the park.",
    "Please bring your passport to the airport.",
    "I will call you in the morning.",
    "The coffee was too hot to drink.",
    "The music was too loud for me.",
    "The library is closed on Sunday.",
    "We need more milk and bread.",
    "Our teacher read us a short story.",
    "Please turn off the lights tonight.",
    "We watched a movie last night.",
    "The hotel was close to the beach.",
    "My mother cooked dinner for everyone.",
    "Turn left at the next corner.",
    "She found her keys under the bed.",
    "My brother bought a new red car.",
    "The kitchen smells like fresh bread.",
    "The flowers in the garden are beautiful.",
    "The doctor will see you now.",
)
"""Fixed, plain English sentences (5-8 words, no numbers), ordered by how well whisper tiny.en transcribes
them across the corpus voices and emotions (mean WER 0.00-0.05 for the first ten), so WER means something."""


@dataclass(frozen=True)
class _Prosody:
    pitch: int  # offset to the speaker's base pitch (espeak-ng -p, 0..99)
    speed: int  # words per minute (-s)
    amplitude: int  # 0..200 (-a)
    gap: int  # extra pause between words, 10 ms units (-g)


# Acted emotion by prosody only: angry loud and fast, happy high and lively, sad slow, low and quiet,
# surprise highest pitch, neutral the reference. Amplitudes keep espeak-ng's int16 output unclipped.
_EMOTION_PROSODY: dict[str, _Prosody] = {
    "Neutral": _Prosody(pitch=0, speed=165, amplitude=75, gap=0),
    "Angry": _Prosody(pitch=8, speed=195, amplitude=112, gap=0),
    "Happy": _Prosody(pitch=22, speed=190, amplitude=95, gap=0),
    "Sad": _Prosody(pitch=-22, speed=115, amplitude=45, gap=3),
    "Surprise": _Prosody(pitch=35, speed=175, amplitude=100, gap=1),
}

# (voice, base pitch) per speaker slot; speakers map onto slots by their ESD number.
_SPEAKER_VOICES: tuple[tuple[str, int], ...] = (
    ("en-us+m3", 40),
    ("en-us+f2", 55),
    ("en+m1", 35),
    ("en-us+f4", 60),
    ("en+m5", 45),
    ("en-gb+f3", 50),
    ("en-us+m7", 38),
    ("en+f5", 58),
    ("en-us+m2", 42),
    ("en-gb+f1", 52),
)


def esd_index(emotion: str, k: int) -> int:
    """ESD utterance number of parallel sentence ``k`` (0-based) in ``emotion``."""
    if emotion not in ESD_EMOTIONS:
        raise ValueError(f"unknown ESD emotion {emotion!r}; expected one of {ESD_EMOTIONS}")
    if not 0 <= k < ESD_BLOCK:
        raise ValueError(f"sentence index {k} outside ESD's block of {ESD_BLOCK}")
    return ESD_EMOTIONS.index(emotion) * ESD_BLOCK + k + 1


def _voice_for(speaker: str) -> tuple[str, int]:
    try:
        slot = int(speaker)
    except ValueError:
        slot = sum(map(ord, speaker))
    return _SPEAKER_VOICES[slot % len(_SPEAKER_VOICES)]


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "espeak-ng is not installed; the synthetic corpus needs it (Debian/Ubuntu: apt-get install espeak-ng)"
        )
    return exe


def synthesize(
    text: str,
    voice: str = "en-us",
    pitch: int = 50,
    speed: int = 165,
    amplitude: int = 100,
    gap: int = 0,
    sample_rate: int = 16000,
) -> np.ndarray:
    """Speak ``text`` with espeak-ng and return float32 mono audio at ``sample_rate``."""
    from emotion_neurons.io import resample

    exe = _espeak()
    with tempfile.TemporaryDirectory(prefix="espeak_") as tmp:
        path = Path(tmp) / "out.wav"
        cmd = [
            exe,
            "-v",
            voice,
            "-p",
            str(int(np.clip(pitch, 0, 99))),
            "-s",
            str(speed),
            "-a",
            str(int(np.clip(amplitude, 0, 200))),
            "-g",
            str(gap),
            "-w",
            str(path),
            text,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.strip()}")
        wav, sr = sf.read(path, dtype="float32", always_2d=False)
    if wav.ndim > 1:
        wav = wav.mean(axis=1)
    return resample(wav, sr, sample_rate)


def build(
    out_dir: Path,
    speakers: Sequence[str] = ("0011", "0012", "0013", "0016", "0017"),
    n_sentences: int = 6,
    emotions: Sequence[str] = ESD_EMOTIONS,
    sample_rate: int = 16000,
) -> Path:
    """Write the synthetic ESD-layout corpus under ``out_dir`` and return ``out_dir``.

    Default: 5 speakers (3 identification 0011-0013, 2 evaluation 0016-0017) x 6 sentences x 5 emotions.
    """
    _espeak()
    out_dir = Path(out_dir)
    speakers = [str(s) for s in speakers]
    emotions = list(emotions)
    if not 1 <= n_sentences <= len(SENTENCES):
        raise ValueError(f"n_sentences must be in 1..{len(SENTENCES)}, got {n_sentences}")
    for e in emotions:
        esd_index(e, 0)  # validates the name

    jobs: list[tuple[Path, str, str, int, str, int]] = []
    for spk in speakers:
        voice, base_pitch = _voice_for(spk)
        lines = []
        for e in sorted(emotions, key=ESD_EMOTIONS.index):
            (out_dir / spk / e).mkdir(parents=True, exist_ok=True)
            for k in range(n_sentences):
                utt = f"{spk}_{esd_index(e, k):06d}"
                lines.append(f"{utt}\t{SENTENCES[k]}\t{e}\n")
                jobs.append((out_dir / spk / e / f"{utt}.wav", SENTENCES[k], e, k, voice, base_pitch))
        (out_dir / spk / f"{spk}.txt").write_text("".join(lines), encoding="utf-8")

    def _one(job: tuple[Path, str, str, int, str, int]) -> None:
        path, text, emotion, _, voice, base_pitch = job
        p = _EMOTION_PROSODY[emotion]
        wav = synthesize(text, voice, base_pitch + p.pitch, p.speed, p.amplitude, p.gap, sample_rate)
        sf.write(path, np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16")

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(_one, jobs))
    return out_dir


def read_transcripts(corpus_dir: Path, speaker: str) -> list[tuple[str, str, str]]:
    """Parse ``<spk>/<spk>.txt`` into (utterance id, text, emotion) rows (works on real ESD too)."""
    rows = []
    path = Path(corpus_dir) / speaker / f"{speaker}.txt"
    for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        parts = line.strip().split("\t")
        if len(parts) >= 3:
            rows.append((parts[0], parts[1], parts[2]))
    return rows
