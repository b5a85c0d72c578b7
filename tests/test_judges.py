"""Judges (text normaliser, WER/CER, refusal, silence, resampling, emotion2vec, Whisper) and the tiny corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
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
        ("We're gonna win, aren't we?", "we are going to win are not we"),  # contractions
        ("I don't like the colour", "i do not like the color"),  # British -> American spelling
        ("twenty one  apples \n\t please", "21 apples please"),  # spelled numbers, whitespace
        ("Caf\u00e9 na\u00efve [laughs] (noise)", "cafe naive"),  # diacritics, bracketed events
        ("well-known U.S.A.", "well known u s a"),
        ("Um, hello", "hello"),  # fillers dropped
    ],
)
def test_normalize_text_is_whispers_english_normaliser(raw: str, expected: str) -> None:
    from whisper_normalizer.english import EnglishTextNormalizer

    assert normalize_text(raw) == expected
    assert normalize_text(raw) == " ".join(EnglishTextNormalizer()(raw).split())


def test_wer_whisper_normaliser_vs_jiwer() -> None:
    """METHOD.md 3.2: Whisper's English normaliser, not a home-made one (the old one gave 1.20 here)."""
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    assert wer("We're gonna win, aren't we?", "we are going to win are not we") == 0.0
    norm = EnglishTextNormalizer()
    pairs = [
        ("The cat sat on the mat.", "the dog sat on the mat today"),
        ("I'll pay twenty-five dollars.", "I will pay $25"),
        ("Kids are talking by the door.", "kids talk by the doors"),
        ("She said hello to Mr. Smith", "she said hello mister smith yesterday morning"),
    ]
    for ref, hyp in pairs:
        assert wer(ref, hyp) == pytest.approx(jiwer.wer(norm(ref), norm(hyp))), (ref, hyp)
        edits, n_ref = judges.word_errors(ref, hyp)
        assert n_ref == len(norm(ref).split())
        assert edits / n_ref == pytest.approx(wer(ref, hyp))


def test_wer_hand_computed_and_not_capped() -> None:
    ref = "The cat sat on the mat."
    assert wer(ref, "the cat, sat on the MAT!") == 0.0
    assert wer(ref, "the cat sat on mat") == pytest.approx(1 / 6)  # one deletion
    assert wer(ref, "the dog sat on the mat today") == pytest.approx(2 / 6)  # substitution + insertion
    # Empty hypothesis: every reference word deleted, WER exactly 1.0 (not a cap).
    assert wer(ref, "") == 1.0
    assert wer(ref, " ?! ") == 1.0  # empty after normalisation
    assert judges.word_errors(ref, "") == (6, 6)
    # A long hypothesis has more edits than reference words: real WER exceeds 1 and is not capped.
    assert wer("go home", "go home now and then sleep") == pytest.approx(4 / 2)
    assert judges.word_errors("go home", "go home now and then sleep") == (4, 2)
    with pytest.raises(ValueError, match="empty"):
        wer("", "anything")
    with pytest.raises(ValueError, match="empty"):
        wer("[noise] um", "anything")  # nothing left after Whisper's normaliser


def test_cer_hand_computed() -> None:
    assert cer("abc", "abd") == pytest.approx(1 / 3)
    assert cer("Hello world", "hello word") == pytest.approx(1 / 11)  # the space counts
    assert cer("Hello, world!", "hello world") == 0.0
    assert cer("abc", "") == 1.0  # all deletions
    assert cer("ab", "ab cd") == pytest.approx(3 / 2)  # insertions: not capped at 1
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


ESD_MAP = {"neutral": "neutral", "angry": "angry", "happy": "happy", "sad": "sad", "surprise": "surprised"}


def _e2v(**p: float) -> np.ndarray:
    """A 9-vector in EMOTION2VEC_LABELS order from label=prob keywords."""
    v = np.zeros(len(EMOTION2VEC_LABELS))
    for k, x in p.items():
        v[EMOTION2VEC_LABELS.index(k)] = x
    return v


def test_restricted_argmax_over_dataset_labels() -> None:
    labels = ["neutral", "angry", "happy", "sad", "surprise"]
    probs = np.stack(
        [
            _e2v(angry=0.2, other=0.7, **{"<unk>": 0.1}),  # "other" dominates, angry wins among dataset labels
            _e2v(happy=0.1, neutral=0.3, surprised=0.6),
            _e2v(neutral=0.9, angry=0.04, happy=0.02, sad=0.02, surprised=0.02),
        ]
    )
    winners, renorm = restricted_argmax(probs, labels, ESD_MAP)
    assert winners == ["angry", "surprise", "neutral"]
    assert renorm.shape == (3, 5)
    np.testing.assert_allclose(renorm.sum(axis=1), 1.0)
    np.testing.assert_allclose(renorm[1], [0.3, 0.0, 0.1, 0.0, 0.6])
    # Columns follow the label map by name, not position: another order gives the same answers.
    rev = labels[::-1]
    w2, r2 = restricted_argmax(probs, rev, dict(reversed(list(ESD_MAP.items()))))
    assert w2 == winners
    np.testing.assert_allclose(r2, renorm[:, ::-1])
    # ...and a different map changes the answer (the map, not a built-in alias table, is used).
    swapped = {**ESD_MAP, "happy": "surprised", "surprise": "happy"}
    assert restricted_argmax(probs[1:2], labels, swapped)[0] == ["happy"]
    zero_w, zero = restricted_argmax(np.eye(9)[[5]], ["angry", "sad"], ESD_MAP)  # all mass elsewhere
    np.testing.assert_allclose(zero, [[0.5, 0.5]])
    with pytest.raises(KeyError, match="frustration"):
        restricted_argmax(probs, ["frustration"], ESD_MAP)
    with pytest.raises(ValueError, match="unknown"):
        restricted_argmax(probs, ["angry"], {"angry": "furious"})
    with pytest.raises(ValueError, match="same emotion2vec label"):
        restricted_argmax(probs, ["angry", "happy"], {"angry": "angry", "happy": "angry"})
    with pytest.raises(ValueError):
        restricted_argmax(probs[:, :5], ["angry"], ESD_MAP)


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
            assert 0.8 < info.duration < 8.0  # recipe 3 acts sad slower (docs/miniature.md)
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
    labels, _ = restricted_argmax(probs, list(ESD_MAP), ESD_MAP)
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


# ------------------------------------------------------------------------ EVC judge stage (scripted)

REPO = Path(__file__).resolve().parents[1]


def _paper_config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))


class _Script:
    """Scripted judges: output wav length (samples at 16 kHz) -> (emotion2vec probabilities, transcript)."""

    def __init__(self) -> None:
        self.by_len: dict[int, tuple[np.ndarray, str]] = {}
        self.scored = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        script = self

        class ScriptedEmotion:
            def __init__(self, model: str, device: str = "cpu", **_kw: object) -> None:
                self.model_name = model

            def score(self, wavs: list[np.ndarray], srs: list[int]) -> np.ndarray:
                assert list(srs) == [16000] * len(wavs)
                script.scored += len(wavs)
                return np.stack([script.by_len[len(w)][0] for w in wavs])

        class ScriptedAsr:
            def __init__(self, model: str, **_kw: object) -> None:
                self.model_name = model

            def transcribe(self, wav: np.ndarray, sr: int) -> str:
                return script.by_len[len(wav)][1]

        monkeypatch.setattr(judges, "EmotionJudge", ScriptedEmotion)
        monkeypatch.setattr(judges, "AsrJudge", ScriptedAsr)


def _outputs(tmp_path: Path, script: _Script, rows: list[tuple]) -> Path:
    """outputs.tsv of one shard; rows = (id, source emotion, text, target, probs or None, transcript)."""
    from emotion_neurons.io import write_table

    shard = tmp_path / "shard-0-of-1"
    (shard / "wavs").mkdir(parents=True)
    recs = []
    for k, (uid, src, text, target, probs, transcript) in enumerate(rows):
        rec = {
            "id": f"{uid}->{target}", "task": "evc", "wav": f"/data/{uid}.wav", "speaker": uid[:4],
            "emotion": src, "split": "ident", "prompt": f"Speak with {target} emotion.", "text": text,
            "target": target, "options": "", "status": "ok", "output_text": "", "output_wav": "",
            "output_sr": 16000, "n_generated": 10, "seconds": 0.1,
        }
        if probs is not None:
            n = 8000 + 160 * k  # a distinct length per output identifies it to the scripted judges
            script.by_len[n] = (probs, transcript)
            rel = f"wavs/{k:03d}.wav"
            sf.write(shard / rel, _tone(220, 16000, seconds=n / 16000, amp=0.3)[:n], 16000)
            rec["output_wav"] = rel
        else:
            rec["output_wav"] = "wavs/missing.wav"  # the model returned no usable audio
        recs.append(rec)
    write_table(shard / "outputs.tsv", pd.DataFrame(recs))
    return shard / "outputs.tsv"


NEUTRAL_90 = dict(neutral=0.90, angry=0.04, happy=0.02, sad=0.02, surprised=0.02)
ANGRY = dict(angry=0.85, neutral=0.05, happy=0.03, sad=0.03, surprised=0.02, other=0.02)
TARGETS = ("angry", "happy", "sad", "surprise")


def judges_map(target: str) -> str:
    """emotion2vec label of a dataset emotion, through the paper config's label map."""
    return _paper_config()["judges"]["emotion"]["label_map"][target]


def _run_judge_stage(tmp_path: Path, outputs: Path, cfg: dict) -> pd.DataFrame:
    import json

    from emotion_neurons.io import read_table
    from emotion_neurons.stages import judge

    params = tmp_path / "params.json"
    params.write_text(json.dumps(judge.params(cfg, "evc")))
    out = tmp_path / "judged.tsv"
    assert judge.main(["--params", f"@{params}", "--outputs", str(outputs), "--out", str(out)]) == 0
    return read_table(out).set_index("id")


def test_evc_judge_stage_neutral_output_fails_every_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 7 defect 1: judged over all dataset emotions, an unconverted (neutral) output is never a success."""
    from emotion_neurons.stages.filter import decide

    script = _Script()
    script.install(monkeypatch)
    ref_a, ref_b = "Kids are talking by the door.", "We're gonna win, aren't we?"
    rows = [("0011_000001", "neutral", ref_a, t, _e2v(**NEUTRAL_90), ref_a) for t in TARGETS]
    rows += [("0011_000002", "neutral", ref_b, t, _e2v(**ANGRY), "we are going to win are not we") for t in TARGETS]
    rows += [
        ("0011_000003", "neutral", ref_a, "surprise", _e2v(surprised=0.5, happy=0.3, neutral=0.2), ref_a),
        ("0011_000004", "neutral", ref_a, "angry", None, ""),  # no usable audio
        ("0011_000005", "neutral", "go home", "angry", _e2v(**ANGRY), "go home now and then sleep"),
    ]
    cfg = _paper_config()
    judged = _run_judge_stage(tmp_path, _outputs(tmp_path, script, rows), cfg)
    assert script.scored == len(rows) - 1

    for t in TARGETS:
        r = judged.loc[f"0011_000001->{t}"]
        assert r["pred"] == "neutral", t
        # renormalised over the five dataset emotions (sum 1.0 here), not over the four targets (0.40)
        assert r["target_prob"] == pytest.approx(NEUTRAL_90[judges_map(t)]), t
        assert r["wer"] == 0.0
        a = judged.loc[f"0011_000002->{t}"]
        assert a["pred"] == "angry" and a["wer"] == 0.0  # Whisper's normaliser: contractions expanded
        assert a["target_prob"] == pytest.approx(ANGRY[judges_map(t)] / 0.98)  # "other" left out
    surprise = judged.loc["0011_000003->surprise"]
    assert surprise["pred"] == "surprise" and surprise["target_prob"] == pytest.approx(0.5)  # via label map

    empty = judged.loc["0011_000004->angry"]
    assert bool(empty["empty"]) and empty["pred"] != "angry"
    assert empty["wer"] == 1.0 and empty["wer_edits"] == empty["ref_words"] == 6  # all deletions
    long = judged.loc["0011_000005->angry"]
    assert long["wer"] == pytest.approx(2.0) and (long["wer_edits"], long["ref_words"]) == (4, 2)

    dec = decide(judged.reset_index(), "evc", cfg["filter"]["wer_max"]).set_index("id")
    successes = sorted(dec.index[dec["success"]])
    assert successes == ["0011_000002->angry", "0011_000003->surprise"]


def test_judge_labels_are_all_dataset_emotions() -> None:
    from emotion_neurons.stages import judge

    cfg = _paper_config()
    labels = judge.judge_labels(cfg, "evc")
    assert labels[0] == cfg["tasks"]["evc"]["source_emotion"] == "neutral"
    assert sorted(labels) == sorted(set(cfg["datasets"]["esd"]["emotions"].values()))
    assert judge.params(cfg, "evc")["labels"] == labels
    bad = _paper_config()
    del bad["judges"]["emotion"]["label_map"]["neutral"]
    with pytest.raises(KeyError, match="label_map.*neutral"):
        judge.params(bad, "evc")


def test_evc_judge_refuses_labels_without_the_source_emotion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emotion_neurons.stages import judge

    script = _Script()
    script.install(monkeypatch)
    outputs = _outputs(tmp_path, script, [("0011_000001", "neutral", "hello there", "angry", _e2v(**NEUTRAL_90), "")])
    with pytest.raises(ValueError, match=r"0011_000001->angry.*neutral"):
        judge.judge_table("evc", outputs, _paper_config()["judges"], list(TARGETS))


def test_evc_judge_unrestricted_uses_all_nine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _Script()
    script.install(monkeypatch)
    rows = [
        ("0011_000001", "neutral", "hello there", "angry", _e2v(other=0.6, angry=0.3, neutral=0.1), "hello there"),
        ("0011_000002", "neutral", "hello there", "surprise", _e2v(surprised=0.7, neutral=0.3), "hello there"),
    ]
    cfg = _paper_config()
    cfg["judges"]["emotion"]["restrict_to_dataset_labels"] = False
    judged = _run_judge_stage(tmp_path, _outputs(tmp_path, script, rows), cfg)
    assert judged.loc["0011_000001->angry", "pred"] == "other"
    assert judged.loc["0011_000001->angry", "target_prob"] == pytest.approx(0.3)  # not renormalised
    assert judged.loc["0011_000002->surprise", "pred"] == "surprise"


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def test_emotion_judge_refuses_poisoned_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9 case 9: model.pt is loaded weights-only even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1."""
    pytest.importorskip("funasr")
    import os

    import torch
    import yaml
    from funasr.models.emotion2vec.model import Emotion2vec

    from emotion_neurons.tiny import emotion2vec as tiny_e2v_mod

    good = tmp_path / "good"
    good.mkdir()
    cfg = tiny_e2v_mod.config()
    (good / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    (good / "tokens.txt").write_text("\n".join(tiny_e2v_mod.TOKENS) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    model = Emotion2vec(model_conf=cfg["model_conf"], vocab_size=9)
    torch.save(model.state_dict(), good / "model.pt")
    poisoned = tmp_path / "poisoned"
    shutil.copytree(good, poisoned)
    marker = tmp_path / "payload-ran"
    torch.save({"model": _Payload(marker)}, poisoned / "model.pt")

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch_load = torch.load
    judge = judges.EmotionJudge(str(good), ncpu=1)  # a plain state dict still loads
    assert judge.score([_tone(220, 16000)], [16000]).shape == (1, 9)
    with pytest.raises(judges.UnsafeCheckpointError, match="model.pt"):
        judges.EmotionJudge(str(poisoned), ncpu=1)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # the caller's environment is restored
    assert torch.load is torch_load  # and torch.load is itself again
