"""A small synthetic corpus in the real ESD layout, spoken by espeak-ng.

Why: the pipeline (data loading, EVC instances, judges, filtering) must run end to end offline and in
seconds, without the licensed ESD download. The files follow ESD exactly, so the same loader reads both:

    out/<spk>/<spk>.txt                       lines "<spk>_<6-digit idx>\\t<text>\\t<Emotion>"
    out/<spk>/<Emotion>/<spk>_<idx>.wav       16 kHz mono PCM16

ESD numbers each emotion in blocks of 350 (Neutral 000001.., Angry 000351.., Happy 000701..,
Sad 001051.., Surprise 001401..) and its sentences are parallel: sentence k has the same text in every
emotion. Speakers differ by
espeak-ng voice variant, base pitch and base rate. Emotions are acted relative to the speaker with per-word
SSML prosody (contour, rate, energy dynamics, pitch range; `_contour`), jittered per utterance with a seed
taken from the utterance id (docs/miniature.md says why). Everything is deterministic (espeak-ng is).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Sequence
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
    "The window in the bedroom is open.",
    "We cleaned the house before the party.",
    "Please put the plates on the table.",
    "The dog ran across the green field.",
    "I read the newspaper on the train.",
    "The store closes at nine tonight.",
    "Her father grows tomatoes in the garden.",
    "The phone rang during the dinner.",
    "We waited for the bus in the rain.",
    "The students finished their homework early.",
)
"""Fixed, plain English sentences (5-8 words, no numbers), ordered by how well whisper tiny.en transcribes
them across the corpus voices and emotions (mean WER 0.00-0.05 for the first ten), so WER means something."""


SENTENCES_B: tuple[str, ...] = (
    "The train leaves from the second platform.",
    "He painted the fence on Saturday.",
    "Our neighbours have a small white dog.",
    "The shop sells fresh fish every day.",
    "She wrote a letter to her aunt.",
    "The bus was late again this week.",
    "They planted apple trees behind the house.",
    "The river was cold and very clear.",
    "I left my umbrella on the train.",
    "The meeting starts after lunch today.",
    "He fixed the old bike in the garage.",
    "We bought tickets for the concert.",
    "The cat sleeps on the warm window.",
    "She plays the piano every evening.",
    "The road to the village is narrow.",
    "My sister moved to a new city.",
    "The baker opens the shop at six.",
    "We painted the kitchen light green.",
    "The wind blew the leaves across the yard.",
    "He carried the boxes up the stairs.",
)
"""The second dataset's sentences (`style="b"`): none of them is in `SENTENCES`."""

RECIPE_VERSION = 3
"""Bumped whenever the acting below changes (part of the miniature's cache key). 3: larger, more distinct
cue separations (docs/miniature.md section 1), a pause before the surprised final words, style b."""

STYLES: tuple[str, ...] = ("a", "b")
"""Acting styles: `a` for the main corpus (`.tiny/esd`), `b` for the transfer corpus (`.tiny/esd_b`)."""

#: Base amplitude (espeak-ng -a) under the SSML volume changes: +80 % on a stressed word stays unclipped.
_BASE_AMPLITUDE = 60


def _contour(
    emotion: str, n_words: int, rng: np.random.Generator, style: str = "a"
) -> tuple[list[tuple[float, float]], float, float]:
    """Per-word (pitch %, volume %) relative to the speaker's own base, plus rate % and pitch range %.

    Why these cues: they survive a change of speaker. Pitch and rate are relative to each voice's base (which
    differs across speakers, so absolute pitch is confounded with the speaker); the shape of the contour and
    of the energy over the utterance carries the emotion. Every parameter is jittered per utterance.
    Style `b` acts the same five emotions with other prosody (docs/miniature.md, section 1b).
    """
    if style not in STYLES:
        raise ValueError(f"unknown acting style {style!r}; expected one of {STYLES}")
    u = np.linspace(0.0, 1.0, n_words) if n_words > 1 else np.zeros(1)
    alt = np.where(np.arange(n_words) % 2 == 0, 1.0, -1.0)
    late = np.clip((u - 0.5) / 0.5, 0.0, 1.0)
    j = lambda s: float(rng.normal(0.0, s))  # noqa: E731
    shift, vol0 = j(5.0), j(6.0)
    if emotion not in ESD_EMOTIONS:
        raise ValueError(f"unknown ESD emotion {emotion!r}; expected one of {ESD_EMOTIONS}")
    if style == "a":
        if emotion == "Neutral":  # flat contour, normal rate, even energy
            pitch, vol, rate, rng_ = 0.0 * u, 0.0 * u, 100.0, 80.0
        elif emotion == "Angry":  # fast, loud, narrow range, falling, alternating stressed words
            pitch = 20.0 - 35.0 * u
            vol = 50.0 + 25.0 * (alt > 0)
            rate, rng_ = 140.0, 50.0
        elif emotion == "Happy":  # high, slightly fast, wide range, bouncing contour, rising energy
            pitch = 35.0 + 25.0 * alt
            vol = 10.0 + 25.0 * u
            rate, rng_ = 118.0, 180.0
        elif emotion == "Sad":  # slow, quiet, low, falling, decaying energy (pauses added by the caller)
            pitch = -20.0 - 25.0 * u
            vol = -35.0 - 25.0 * u
            rate, rng_ = 62.0, 40.0
        else:  # Surprise: normal start, pause, steep rise over the last words, louder end
            pitch = 130.0 * late
            vol = 45.0 * late
            rate, rng_ = 92.0, 150.0
    else:  # style b: the same emotions with other cues
        if emotion == "Neutral":  # slightly slow, gently falling at the end, even energy
            pitch, vol, rate, rng_ = -10.0 * late, 0.0 * u, 95.0, 70.0
        elif emotion == "Angry":  # high, tense, staccato (pauses by the caller), every word loud, flat contour
            pitch = 25.0 + 5.0 * alt
            vol = 70.0 + 0.0 * u
            rate, rng_ = 120.0, 30.0
        elif emotion == "Happy":  # rising contour over the utterance, fast, bright
            pitch = 10.0 + 50.0 * u
            vol = 20.0 + 0.0 * u
            rate, rng_ = 130.0, 150.0
        elif emotion == "Sad":  # monotone, low range, slow, breathy quiet with no decay
            pitch = -30.0 + 0.0 * u
            vol = -45.0 + 0.0 * u
            rate, rng_ = 72.0, 20.0
        else:  # Surprise: high peak on the first words, then falling, loud start
            pitch = 110.0 * (1.0 - u) ** 2
            vol = 50.0 * (1.0 - u)
            rate, rng_ = 105.0, 170.0
    words = [
        (float(np.clip(p + shift + j(4.0), -60.0, 150.0)), float(np.clip(v + vol0, -70.0, 80.0)))
        for p, v in zip(pitch, vol, strict=True)
    ]
    return words, rate * (1.0 + j(0.06)), max(15.0, rng_ * (1.0 + j(0.1)))


def acted_ssml(text: str, emotion: str, rng: np.random.Generator, style: str = "a") -> str:
    """SSML that acts ``emotion`` on ``text`` with per-word prosody (see `_contour`)."""
    words = text.split()
    per_word, rate, prange = _contour(emotion, len(words), rng, style)
    n = len(words)

    def gap(i: int) -> str:  # the break after word i
        if style == "a" and emotion == "Sad" or style == "b" and emotion == "Angry":
            return f' <break time="{int(max(0.0, rng.normal(150.0 if emotion == "Sad" else 90.0, 25.0)))}ms"/> '
        if style == "a" and emotion == "Surprise" and i == n // 2 - 1:
            return f' <break time="{int(max(0.0, rng.normal(220.0, 40.0)))}ms"/> '
        return " "

    body = "".join(
        f'<prosody pitch="{p:+.0f}%" volume="{v:+.0f}%">{w}</prosody>' + (gap(i) if i < n - 1 else "")
        for i, (w, (p, v)) in enumerate(zip(words, per_word, strict=True))
    )
    return f'<speak><prosody rate="{rate:.0f}%" range="{prange:.0f}%">{body}</prosody></speak>'


# (voice, base pitch, base rate in words per minute) per speaker slot; speakers map onto slots by their ESD
# number. Base pitch and rate differ by voice, so only pitch and rate relative to the voice carry emotion.
_SPEAKER_VOICES: tuple[tuple[str, int, int], ...] = (
    ("en-us+m3", 40, 160),
    ("en-us+f2", 55, 172),
    ("en+m1", 35, 150),
    ("en-us+f4", 60, 165),
    ("en+m5", 45, 178),
    ("en-gb+f3", 50, 155),
    ("en-us+m7", 38, 170),
    ("en+f5", 58, 158),
    ("en-us+m2", 42, 175),
    ("en-gb+f1", 52, 162),
    ("en-gb+m6", 44, 168),
    ("en-us+f3", 57, 152),
)

# The transfer corpus' voices (style b): other accents and variants, none of `_SPEAKER_VOICES`.
_SPEAKER_VOICES_B: tuple[tuple[str, int, int], ...] = (
    ("en-gb-scotland+m4", 41, 163),
    ("en-029+f1", 56, 157),
    ("en-us-nyc+m8", 37, 172),
    ("en-gb-x-rp+f2", 61, 160),
    ("en-gb-x-gbclan+m2", 46, 150),
    ("en-gb-x-gbcwmd+f4", 53, 170),
    ("en-gb-x-rp+m7", 39, 158),
    ("en-029+f5", 59, 166),
    ("en-gb-scotland+m1", 43, 176),
    ("en-us-nyc+f3", 51, 154),
)


def esd_index(emotion: str, k: int) -> int:
    """ESD utterance number of parallel sentence ``k`` (0-based) in ``emotion``."""
    if emotion not in ESD_EMOTIONS:
        raise ValueError(f"unknown ESD emotion {emotion!r}; expected one of {ESD_EMOTIONS}")
    if not 0 <= k < ESD_BLOCK:
        raise ValueError(f"sentence index {k} outside ESD's block of {ESD_BLOCK}")
    return ESD_EMOTIONS.index(emotion) * ESD_BLOCK + k + 1


def _voice_for(speaker: str, style: str = "a") -> tuple[str, int, int]:
    try:
        slot = int(speaker)
    except ValueError:
        slot = sum(map(ord, speaker))
    voices = _SPEAKER_VOICES if style == "a" else _SPEAKER_VOICES_B
    return voices[slot % len(voices)]


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
    ssml: bool = False,
) -> np.ndarray:
    """Speak ``text`` (SSML markup with ``ssml``) with espeak-ng; float32 mono audio at ``sample_rate``."""
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
            *(["-m"] if ssml else []),
            "-w",
            str(path),
            text,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.strip()}")
        sox = shutil.which("sox")
        if sox is not None:  # sox's resampler is ~20x faster than polyphase 22050 -> 16000 in scipy
            resampled = Path(tmp) / "resampled.wav"
            # -D: no dither, so the output is deterministic
            proc = subprocess.run([sox, "-D", str(path), "-r", str(sample_rate), str(resampled)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"sox failed ({proc.returncode}): {proc.stderr.strip()}")
            path = resampled
        wav, sr = sf.read(path, dtype="float32", always_2d=False)
    if wav.ndim > 1:
        wav = wav.mean(axis=1)
    return wav if sr == sample_rate else resample(wav, sr, sample_rate)


def build(
    out_dir: Path,
    speakers: Sequence[str] = ("0011", "0012", "0013", "0016", "0017"),
    n_sentences: int = 6,
    emotions: Sequence[str] = ESD_EMOTIONS,
    sample_rate: int = 16000,
    style: str = "a",
) -> Path:
    """Write the synthetic ESD-layout corpus under ``out_dir`` and return ``out_dir``.

    Default: 5 speakers (3 identification 0011-0013, 2 evaluation 0016-0017) x 6 sentences x 5 emotions.
    `style` `b` uses the transfer corpus' sentences (`SENTENCES_B`), voices and acting.
    """
    _espeak()
    if style not in STYLES:
        raise ValueError(f"unknown acting style {style!r}; expected one of {STYLES}")
    sentences = SENTENCES if style == "a" else SENTENCES_B
    out_dir = Path(out_dir)
    speakers = [str(s) for s in speakers]
    emotions = list(emotions)
    if not 1 <= n_sentences <= len(sentences):
        raise ValueError(f"n_sentences must be in 1..{len(sentences)}, got {n_sentences}")
    for e in emotions:
        esd_index(e, 0)  # validates the name

    for spk in speakers:
        voice, base_pitch, base_rate = _voice_for(spk, style)
        lines = []
        for e in sorted(emotions, key=ESD_EMOTIONS.index):
            (out_dir / spk / e).mkdir(parents=True, exist_ok=True)
            for k in range(n_sentences):
                utt = f"{spk}_{esd_index(e, k):06d}"
                lines.append(f"{utt}\t{sentences[k]}\t{e}\n")
                # per-utterance variation, seeded by the utterance id (independent of build order)
                rng = np.random.default_rng(zlib.crc32(f"{RECIPE_VERSION}:{style}:{utt}".encode()))
                wav = synthesize(
                    acted_ssml(sentences[k], e, rng, style), voice, base_pitch, base_rate, _BASE_AMPLITUDE,
                    sample_rate=sample_rate, ssml=True,
                )
                sf.write(out_dir / spk / e / f"{utt}.wav", np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16")
        (out_dir / spk / f"{spk}.txt").write_text("".join(lines), encoding="utf-8")
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
