"""Judges (text normaliser, WER/CER, refusal, silence, resampling, emotion2vec, Whisper) and the tiny corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emotion_neurons import judges
from emotion_neurons.judges import (
    EMOTION2VEC_LABELS,
    cer,
    is_refusal,
    is_silent,
    label_permutation,
    normalize_text,
    resample,
    restricted_argmax,
    wer,
)
from emotion_neurons.tiny import corpus

HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng not installed")

# ---------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello, World!", "hello world"),
        ("Don\u2019t STOP\u2014believing...", "don't stop believing"),
        ("'Cause it's the dogs' toys", "cause it's the dogs toys"),
        ("\uff26\uff55\uff4c\uff4c\u3000\uff37\uff29\uff24\uff34\uff28", "full width"),  # NFKC
        ("  many \n\t spaces ", "many spaces"),
        ("Room 101, at 7 p.m.", "room 101 at 7 p m"),  # numbers are not spelled out
        ("well-known U.S.A.", "well known u s a"),
        ("Caf\u00e9 na\u00efve", "caf\u00e9 na\u00efve"),
        ("snake_case", "snake case"),
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_wer_hand_computed() -> None:
    ref = "The cat sat on the mat."
    assert wer(ref, "the cat, sat on the MAT!") == 0.0
    assert wer(ref, "the cat sat on mat") == pytest.approx(1 / 6)  # one deletion
    assert wer(ref, "the dog sat on the mat today") == pytest.approx(2 / 6)  # substitution + insertion
    assert wer("don't go", "dont go") == pytest.approx(1 / 2)  # apostrophes inside words are kept
    assert wer(ref, "") == 1.0
    assert wer(ref, " ?! ") == 1.0  # empty after normalisation
    with pytest.raises(ValueError, match="empty"):
        wer("", "anything")
    with pytest.raises(ValueError, match="empty"):
        wer("...", "anything")


def test_cer_hand_computed() -> None:
    assert cer("abc", "abd") == pytest.approx(1 / 3)
    assert cer("Hello world", "hello word") == pytest.approx(1 / 11)  # the space counts
    assert cer("Hello, world!", "hello world") == 0.0
    assert cer("abc", "") == 1.0
    with pytest.raises(ValueError):
        cer(" ", "abc")


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I\u2019m sorry, I cannot do that.",
        "As an AI language model, I do not produce audio.",
        "I am unable to assist with this request.",
        "Sorry, but I won't be able to repeat this.",
        "I apologize for the confusion.",
        "I can't change the emotion of this recording.",
        "I'm just an AI, I can only reply in text.",
    ],
)
def test_is_refusal_positive(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "The cat sat on the warm mat.",
        "I can't believe it's raining again.",
        "Sorry to hear that the train was late.",
        "We cannot wait for the holidays.",
        "",
    ],
)
def test_is_refusal_negative(text: str) -> None:
    assert not is_refusal(text)


# --------------------------------------------------------------------------------------------- audio


def _tone(freq: float, sr: int, seconds: float = 1.0, amp: float = 0.1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_is_silent() -> None:
    sr = 16000
    assert is_silent(np.zeros(sr, dtype=np.float32), sr)
    assert is_silent(np.zeros(0, dtype=np.float32), sr)
    assert is_silent(_tone(440, sr, amp=1e-4), sr)  # about -83 dBFS
    assert is_silent(_tone(440, sr, seconds=0.05, amp=0.5), sr)  # too short
    assert not is_silent(_tone(440, sr, amp=0.1), sr)  # about -23 dBFS
    assert not is_silent((_tone(440, sr, amp=0.1) * 32767).astype(np.int16), sr)  # int PCM is scaled
    assert is_silent((_tone(440, sr, amp=0.001) * 32767).astype(np.int16), sr)
    stereo = np.stack([_tone(440, sr), _tone(440, sr)], axis=1)
    assert not is_silent(stereo, sr)
    bad = _tone(440, sr)
    bad[10] = np.nan
    assert is_silent(bad, sr)
    assert not is_silent(_tone(440, sr, amp=1e-4), sr, min_rms_db=-90.0)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


@pytest.mark.parametrize("sr_from", [8000, 22050, 24000, 44100, 48000])
def test_resample_length_and_frequency(sr_from: int) -> None:
    x = _tone(1000, sr_from, seconds=1.0)
    y = resample(x, sr_from, 16000)
    assert y.dtype == np.float32
    assert len(y) == 16000
    assert _peak_hz(y, 16000) == pytest.approx(1000, abs=2)
    assert np.sqrt(np.mean(y[800:-800] ** 2)) == pytest.approx(0.1 / np.sqrt(2), rel=0.02)


def test_resample_antialias_identity_and_int() -> None:
    x = _tone(10000, 24000)  # above the 8 kHz Nyquist of 16 kHz: must be filtered, not aliased to 6 kHz
    y = resample(x, 24000, 16000)
    assert np.sqrt(np.mean(y[800:-800] ** 2)) < 0.005
    same = resample(x, 24000, 24000)
    assert same is not x and np.array_equal(same, x)
    pcm = (_tone(1000, 16000, amp=0.5) * 32767).astype(np.int16)
    assert np.abs(resample(pcm, 16000, 16000)).max() == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError):
        resample(x, 0, 16000)


def test_restricted_argmax_and_labels() -> None:
    probs = np.zeros((2, 9))
    probs[0, [0, 5, 8]] = [0.2, 0.7, 0.1]  # "other" dominates, but angry wins among allowed labels
    probs[1, [3, 4, 7]] = [0.1, 0.3, 0.6]
    labels, renorm = restricted_argmax(probs, ["Neutral", "Angry", "Happy", "Sad", "Surprise"])
    assert labels == ["Angry", "Surprise"]
    assert renorm.shape == (2, 5)
    np.testing.assert_allclose(renorm.sum(axis=1), 1.0)
    np.testing.assert_allclose(renorm[1], [0.3, 0.0, 0.1, 0.0, 0.6])
    with pytest.raises(ValueError):
        restricted_argmax(probs, ["frustration"])
    with pytest.raises(ValueError):
        restricted_argmax(probs[:, :5], ["angry"])
    zero_labels, zero = restricted_argmax(np.eye(9)[[5]], ["angry", "sad"])  # all mass elsewhere: uniform
    np.testing.assert_allclose(zero, [[0.5, 0.5]])


def test_label_permutation() -> None:
    from emotion_neurons.tiny.emotion2vec import TOKENS

    np.testing.assert_array_equal(label_permutation(TOKENS), np.arange(9))
    shuffled = [TOKENS[i] for i in (8, 3, 0, 7, 1, 6, 2, 5, 4)]
    perm = label_permutation(shuffled)
    assert [shuffled[i].split("/")[-1] for i in perm] == list(EMOTION2VEC_LABELS)
    assert list(label_permutation(EMOTION2VEC_LABELS)) == list(range(9))  # plain English labels work too
    with pytest.raises(ValueError):
        label_permutation(list(TOKENS[:-1]) + ["unuse_0"])
    with pytest.raises(ValueError):
        label_permutation(list(TOKENS) + ["extra"])


# -------------------------------------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_ESPEAK:
        pytest.skip("espeak-ng not installed")
    return corpus.build(tmp_path_factory.mktemp("esd"), speakers=["0011", "0016"], n_sentences=2)


@needs_espeak
def test_corpus_layout(small_corpus: Path) -> None:
    assert sorted(p.name for p in small_corpus.iterdir()) == ["0011", "0016"]
    for spk in ("0011", "0016"):
        rows = corpus.read_transcripts(small_corpus, spk)
        ids = [r[0] for r in rows]
        assert ids == [f"{spk}_{i:06d}" for i in (1, 2, 351, 352, 701, 702, 1051, 1052, 1401, 1402)]
        assert [r[2] for r in rows] == [e for e in corpus.ESD_EMOTIONS for _ in range(2)]
        texts = {r[2]: [] for r in rows}
        for _, text, emo in rows:
            texts[emo].append(text)
        assert all(t == list(corpus.SENTENCES[:2]) for t in texts.values())  # parallel sentences
        raw = (small_corpus / spk / f"{spk}.txt").read_text(encoding="utf-8").splitlines()
        assert raw[0] == f"{spk}_000001\t{corpus.SENTENCES[0]}\tNeutral"
        wavs = sorted((small_corpus / spk).glob("*/*.wav"))
        assert len(wavs) == 10
        for uid, _, emo in rows:
            path = small_corpus / spk / emo / f"{uid}.wav"
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert 0.8 < info.duration < 6.0
    # Prosody: sad is slower than angry for the same sentence and speaker.
    sad = sf.info(small_corpus / "0011" / "Sad" / "0011_001051.wav").duration
    angry = sf.info(small_corpus / "0011" / "Angry" / "0011_000351.wav").duration
    assert sad > 1.5 * angry
    # Speakers differ (voice variant / pitch), the same speaker-sentence-emotion is reproducible.
    a, _ = sf.read(small_corpus / "0011" / "Neutral" / "0011_000001.wav")
    b, _ = sf.read(small_corpus / "0016" / "Neutral" / "0016_000001.wav")
    assert len(a) != len(b) or not np.array_equal(a, b)


def test_corpus_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        corpus.esd_index("Bored", 0)
    assert corpus.esd_index("Surprise", 0) == 1401
    if HAS_ESPEAK:
        with pytest.raises(ValueError):
            corpus.build(tmp_path, n_sentences=len(corpus.SENTENCES) + 1)
    monkeypatch.setattr(corpus.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="espeak-ng is not installed"):
        corpus.build(tmp_path / "x", speakers=["0011"], n_sentences=1)


# ------------------------------------------------------------------------------------- emotion judge


@pytest.fixture(scope="module")
def tiny_e2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("funasr")
    from emotion_neurons.tiny import emotion2vec as tiny_e2v_mod

    return tiny_e2v_mod.build(tmp_path_factory.mktemp("tiny_e2v"))


@pytest.fixture(scope="module")
def corpus_wavs(small_corpus: Path) -> list[np.ndarray]:
    return [sf.read(p, dtype="float32")[0] for p in sorted(small_corpus.glob("*/*/*.wav"))]


@pytest.mark.slow
@needs_espeak
def test_emotion_judge_tiny(tiny_e2v: Path, corpus_wavs: list[np.ndarray]) -> None:
    from emotion_neurons.tiny.emotion2vec import TOKENS

    assert (tiny_e2v / "model.pt").stat().st_size < 10 * 2**20
    assert (tiny_e2v / "tokens.txt").read_text(encoding="utf-8").split() == list(TOKENS)
    import torch

    threads = torch.get_num_threads()
    judge = judges.EmotionJudge(str(tiny_e2v), ncpu=1)  # a toy model; one thread avoids contention
    probs = judge.score(corpus_wavs, [16000] * len(corpus_wavs))
    assert probs.shape == (len(corpus_wavs), 9)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(probs >= 0)
    assert judge._raw_labels == list(TOKENS)  # the model's own order, asserted and mapped by name
    assert torch.get_num_threads() == threads  # funasr's process-wide thread setting is undone

    # Deterministic and independent of what else is scored (one utterance at a time, no padding).
    again = judge.score(corpus_wavs[3:6][::-1], [16000] * 3)[::-1]
    np.testing.assert_allclose(again, probs[3:6], atol=1e-6)
    single = judge.score_one(corpus_wavs[4], 16000)
    np.testing.assert_allclose(single, probs[4], atol=1e-6)

    # The tiny checkpoint's argmax varies with the input (the demo needs more than one winning emotion).
    labels, _ = restricted_argmax(probs, list(corpus.ESD_EMOTIONS))
    assert len(set(labels)) >= 3, labels

    # Other sample rates are resampled to 16 kHz first.
    wav24 = resample(corpus_wavs[0], 16000, 24000)
    p24 = judge.score([wav24], [24000])
    assert p24.shape == (1, 9) and np.isclose(p24.sum(), 1.0)
    with pytest.raises(ValueError):
        judge.score(corpus_wavs[:2], [16000])
    with pytest.raises(ValueError, match="too short"):
        judge.score_one(np.zeros(100, dtype=np.float32), 16000)


@pytest.mark.slow
def test_tiny_emotion2vec_is_deterministic(tiny_e2v: Path, tmp_path: Path) -> None:
    import torch

    from emotion_neurons.tiny import emotion2vec as tiny_e2v_mod

    other = tiny_e2v_mod.build(tmp_path / "again")
    a = torch.load(tiny_e2v / "model.pt")
    b = torch.load(other / "model.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_e2v / "config.yaml").read_text() == (other / "config.yaml").read_text()
    with pytest.raises(FileNotFoundError, match="lacks"):
        judges.EmotionJudge(str(tmp_path))


@pytest.mark.slow
@needs_espeak
def test_emotion_judge_reorders_shuffled_tokens(
    tiny_e2v: Path, corpus_wavs: list[np.ndarray], tmp_path: Path
) -> None:
    from emotion_neurons.tiny.emotion2vec import TOKENS

    order = (8, 3, 0, 7, 1, 6, 2, 5, 4)
    shuffled = [TOKENS[i] for i in order]
    shuffled_dir = tmp_path / "shuffled"
    shutil.copytree(tiny_e2v, shuffled_dir)
    (shuffled_dir / "tokens.txt").write_text("\n".join(shuffled) + "\n", encoding="utf-8")

    wavs = corpus_wavs[:3]
    base = judges.EmotionJudge(str(tiny_e2v), ncpu=1).score(wavs, [16000] * 3)
    judge = judges.EmotionJudge(str(shuffled_dir), ncpu=1)
    probs = judge.score(wavs, [16000] * 3)
    assert judge._raw_labels == shuffled
    # Output row j of the head is now called shuffled[j]; the judge must put it in that name's column.
    for j, tok in enumerate(shuffled):
        np.testing.assert_allclose(
            probs[:, EMOTION2VEC_LABELS.index(tok.split("/")[-1])], base[:, j], atol=1e-6
        )

    broken_dir = tmp_path / "broken"
    shutil.copytree(tiny_e2v, broken_dir)
    (broken_dir / "tokens.txt").write_text(
        "\n".join([*TOKENS[:7], "惊讶/amazed", "<unk>"]) + "\n", encoding="utf-8"
    )
    with pytest.raises(ValueError, match="do not match"):
        judges.EmotionJudge(str(broken_dir)).score(wavs[:1], [16000])


# ----------------------------------------------------------------------------------------- ASR judge


@pytest.mark.slow
@needs_espeak
def test_asr_judge_tiny_en() -> None:
    pytest.importorskip("faster_whisper")
    try:
        path = judges.whisper_tiny_path()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    text = "The birds sang outside my window."
    # 24 kHz input exercises resampling to 16 kHz
    wav = corpus.synthesize(text, voice="en-us", pitch=50, speed=150, sample_rate=24000)
    asr = judges.AsrJudge(path, language="en", beam_size=1)
    hyp = asr.transcribe(wav, 24000)
    assert wer(text, hyp) < 0.5, hyp
    assert asr.transcribe(np.zeros(0, dtype=np.float32), 16000) == ""
    capped = judges.AsrJudge(path, beam_size=1, max_new_tokens=3).transcribe(wav, 24000)
    assert len(normalize_text(capped).split()) <= 4, capped
