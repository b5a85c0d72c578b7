"""The embedded miniature (docs/miniature.md): a corpus in which emotion is audible across voices, a trained judge,
trained miniature Qwen2.5-Omni thinkers, and the demo's declared target evaluated with the pipeline's stages.

The fast tests check the helpers on hand-made inputs; the slow ones build (or reuse, by recipe hash) `.tiny/`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emotion_neurons.tiny import corpus, target

REPO = Path(__file__).resolve().parents[1]
CHANCE = 0.2  # five balanced classes (the held-out sets are balanced: 100 per emotion)
MARGIN = 0.15


# ------------------------------------------------------------------------------------------ fast helpers


def test_prosody_targets_track_pitch_energy_and_voicing_by_hand():
    """The encoder's (non-emotion) objective: a 200 Hz tone is voiced at log2(200/100) = 1, silence is not."""
    from emotion_neurons.tiny.miniature import prosody_targets

    sr = 16000
    t = np.arange(sr) / sr
    wav = np.concatenate([0.5 * np.sin(2 * np.pi * 200 * t), np.zeros(sr)]).astype(np.float32)
    y = prosody_targets(wav, 50)  # 50 frames of 40 ms = 2 s
    voiced, silent = y[2:22], y[28:48]
    assert np.all(voiced[:, 1] == 1.0) and np.allclose(voiced[:, 2], 1.0, atol=0.03)
    assert np.allclose(voiced[:, 0], np.log(0.5 / np.sqrt(2)), atol=0.05)  # log RMS of the tone
    assert np.all(silent[:, 1] == 0.0) and np.all(silent[:, 2] == 0.0) and np.all(silent[:, 0] < -9)
    y2 = prosody_targets((0.5 * np.sin(2 * np.pi * 120 * t)).astype(np.float32), 20)
    assert np.allclose(y2[2:18, 2], np.log2(1.2), atol=0.03)


def test_cached_features_give_the_adapters_encoder_inputs():
    """The compact per-utterance cache returns exactly the extractor's features inside the mask."""
    from transformers import WhisperFeatureExtractor

    from emotion_neurons.tiny.miniature import _CachedFeatures

    fe = WhisperFeatureExtractor(feature_size=128)
    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.1, n).astype(np.float32) for n in (16000, 24000)]
    kw = {"sampling_rate": 16000, "return_attention_mask": True, "padding": "max_length", "return_tensors": "pt"}
    cached = _CachedFeatures(fe)
    for _ in range(2):  # second call from the cache
        got = cached(waves, **kw)
        for row, w in enumerate(waves):
            ref = fe([w], **kw)
            assert np.array_equal(got["attention_mask"][row].numpy(), ref["attention_mask"][0].numpy())
            n = int(ref["attention_mask"].sum())
            assert np.array_equal(got["input_features"][row, :, :n].numpy(), ref["input_features"][0, :, :n].numpy())
    assert len(cached.cache) == 2


def test_lr_factor_cosine_and_constant_by_hand():
    """Cosine: 1 at step 0, 1/2 at half way, (1 + cos(pi/4)) / 2 at a quarter, 0 at the end and after it."""
    from emotion_neurons.tiny.miniature import lr_factor

    assert lr_factor(0, 8, "cosine") == pytest.approx(1.0)
    assert lr_factor(2, 8, "cosine") == pytest.approx((1 + np.sqrt(0.5)) / 2)
    assert lr_factor(4, 8, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, 8, "cosine") == pytest.approx((1 - np.sqrt(0.5)) / 2)
    assert lr_factor(8, 8, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(11, 8, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(k, 8, "constant") for k in (0, 5, 99)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 8, "linear")


def test_lr_scheduler_applies_lr_factor_per_optimiser_step():
    """The training loop's LambdaLR: the rate used by optimiser step k is lr * lr_factor(k)."""
    import torch

    from emotion_neurons.tiny.miniature import lr_factor

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, 4, "cosine"))
    used = []
    for _ in range(5):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([0.4, 0.4 * (1 + np.sqrt(0.5)) / 2, 0.2, 0.4 * (1 - np.sqrt(0.5)) / 2, 0.0], abs=1e-12)


@pytest.fixture(scope="module")
def mini_corpus(tmp_path_factory):
    """Two voices x 2 sentences x 5 emotions (20 clips): one voice to train on, one held out."""
    return corpus.build(tmp_path_factory.mktemp("mini") / "esd", speakers=["0011", "0018"], n_sentences=2)


def _reduced_recipe(seed: int = 3):
    from emotion_neurons.tiny.miniature import Recipe

    return Recipe(seed=seed, hidden=32, layers=2, intermediate=16, audio_layers=1, audio_d_model=32,
                  encoder_steps=4, max_epochs=2, stop_recall=1.01, batch=4, train_speakers=("0011",),
                  held_out_speakers=("0018",))


def test_cached_training_path_equals_the_full_forward(mini_corpus, tmp_path):
    """The training loop's cached path (frozen-encoder outputs, cached token ids, logits at the answer positions
    only) gives the adapter's ids and mask and the full thinker forward's logits on the same batch."""
    import torch

    from emotion_neurons.models.qwen_omni import QwenOmniAdapter
    from emotion_neurons.tiny import miniature, qwen_omni

    recipe = _reduced_recipe()
    qwen_omni.build(tmp_path / "ck", seed=5, **recipe.sizes())
    adapter = QwenOmniAdapter()
    adapter.load(str(tmp_path / "ck"), device="cpu", dtype="float32")
    items = miniature._instances(mini_corpus, ("0011", "0018"), recipe, ":train0")
    items = [items[k] for k in (0, 7, 13, 19, 4, 10)]  # different lengths, both voices, several emotions
    audios: dict = {}
    inputs, gold, _ = next(miniature._batches(adapter, items, len(items), audios))
    im_end = int(adapter.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    thinker = adapter.model.thinker
    enc = miniature._Encoded(adapter, audios)
    b = enc.batch(items)
    assert torch.equal(b["input_ids"], inputs["input_ids"])
    assert torch.equal(b["attention_mask"], inputs["attention_mask"])
    assert torch.equal(b["gold"], gold)
    with torch.no_grad():
        word, end = miniature._forward_answer(thinker, inputs, gold, im_end)
        cw, ce = enc.forward(b, answer=True)
        first = thinker(**inputs, use_cache=False).logits[:, -1]
        cf = enc.forward(b, answer=False)
    assert word.abs().max() > 0.05  # not a degenerate comparison
    for ref, got in ((word, cw), (end, ce), (first, cf)):
        assert torch.allclose(ref, got, atol=1e-5, rtol=1e-4), float((ref - got).abs().max())
    loss_ref = torch.nn.functional.cross_entropy(word, gold)
    assert float(torch.nn.functional.cross_entropy(cw, gold)) == pytest.approx(float(loss_ref), abs=1e-5)
    pred, g = enc.answers(items, batch=4)
    assert np.array_equal(g, gold.numpy()) and np.array_equal(pred, first.argmax(-1).numpy())


def test_training_is_deterministic_per_seed(mini_corpus, tmp_path):
    """Two builds of the same (reduced) recipe, one in this process and one in a fresh spawned worker (as
    `python -m emotion_neurons.tiny` trains), give bitwise-equal weights; another seed gives other weights."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from safetensors.torch import load_file

    from emotion_neurons.tiny import miniature

    info = miniature.train(tmp_path / "a", mini_corpus, _reduced_recipe())
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(miniature.train, tmp_path / "b", mini_corpus, _reduced_recipe()).result()
    miniature.train(tmp_path / "c", mini_corpus, _reduced_recipe(seed=4))
    assert len(info["history"]) == 2 and info["stopped_at_epoch"] is None

    def weights(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert a and a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
    trained = [k for k in a if k.startswith("thinker.model.layers.")]
    assert trained and any(not a[k].equal(c[k]) for k in trained)


def test_effects_and_paired_difference_by_hand():
    """Two emotions, two instances each: SE, ACE, RCE and the paired self-cell difference to the control."""
    import pandas as pd

    rows = []

    def add(mask, me, probs):
        for (iid, emo), p in zip([("x1", "a"), ("x2", "a"), ("y1", "b"), ("y2", "b")], probs, strict=True):
            rows.append({"id": iid, "emotion": emo, "gold_prob": p, "correct": p > 0.5, "mask": mask,
                         "mask_emotion": me, "speaker": "s"})

    add("baseline", "", [0.8, 0.6, 0.9, 0.7])
    add("cas", "a", [0.2, 0.4, 0.9, 0.5])   # own emotion a drops by 0.4, b drops by 0.1
    add("cas", "b", [0.8, 0.6, 0.3, 0.5])   # own emotion b drops by 0.4
    add("random:cas:0", "a", [0.7, 0.6, 0.9, 0.7])
    add("random:cas:0", "b", [0.8, 0.6, 0.9, 0.6])
    eff = target.effects(pd.DataFrame(rows), "cas").set_index("mask_emotion")
    assert eff.loc["a", "SE"] == pytest.approx(-40.0)
    assert eff.loc["a", "ACE"] == pytest.approx(0.0)     # mask b on a's instances
    assert eff.loc["a", "RCE"] == pytest.approx(-10.0)   # mask a on b's instances
    assert eff.loc["a", "SE_random"] == pytest.approx(-5.0)
    assert eff.loc["a", "d"] == pytest.approx([-50.0, -20.0])
    assert eff.loc["b", "d"] == pytest.approx([-60.0, -10.0])
    mean, lo, hi = target.bootstrap_ci([np.array(eff.loc["a", "d"]), np.array(eff.loc["b", "d"])], n_boot=200)
    assert mean == pytest.approx(-35.0) and lo <= mean <= hi < 0


def _f0(x, sr=16000):
        """Median autocorrelation pitch of the voiced frames of x."""
        vals = []
        for i in range(0, len(x) - 640, 320):
            fr = x[i : i + 640] - x[i : i + 640].mean()
            if np.sqrt((fr**2).mean()) < 0.01:
                continue
            ac = np.correlate(fr, fr, "full")[639:]
            lo, hi = sr // 400, sr // 60
            vals.append(sr / (lo + int(np.argmax(ac[lo:hi]))))
        return np.median(vals) if vals else np.nan


def _clips(out, spk, k):
    return {e: sf.read(out / spk / e / f"{spk}_{corpus.esd_index(e, k):06d}.wav")[0] for e in corpus.ESD_EMOTIONS}


def test_corpus_acts_emotion_relative_to_the_speaker(tmp_path):
    """Sad is slower than neutral and surprise ends higher than it starts, for a low and a high voice alike."""
    out = corpus.build(tmp_path / "esd", speakers=["0013", "0014"], n_sentences=2)  # base pitch 35 and 60
    for spk in ("0013", "0014"):
        for k in range(2):
            wav = _clips(out, spk, k)
            assert len(wav["Sad"]) > 1.3 * len(wav["Neutral"]) > 1.3 * len(wav["Angry"])
            s = wav["Surprise"]
            assert _f0(s[-len(s) // 3 :]) > 1.2 * _f0(s[: len(s) // 3])
            assert _f0(wav["Happy"]) > 1.1 * _f0(wav["Neutral"])  # happy is high relative to the same voice


def test_transfer_corpus_uses_other_voices_sentences_and_acting(tmp_path):
    """Style b (`.tiny/esd_b`): no sentence or voice of style a, and its surprise falls where style a's rises."""
    assert not set(corpus.SENTENCES) & set(corpus.SENTENCES_B)
    assert not {v for v, *_ in corpus._SPEAKER_VOICES} & {v for v, *_ in corpus._SPEAKER_VOICES_B}
    out = corpus.build(tmp_path / "esd_b", speakers=["0031", "0034"], n_sentences=2, style="b")
    for spk in ("0031", "0034"):
        (line, *_) = (out / spk / f"{spk}.txt").read_text().splitlines()
        assert line.split("\t")[1] == corpus.SENTENCES_B[0]
        for k in range(2):
            s = _clips(out, spk, k)["Surprise"]
            assert _f0(s[: len(s) // 3]) > 1.2 * _f0(s[-len(s) // 3 :])
    with pytest.raises(ValueError, match="acting style"):
        corpus.build(tmp_path / "x", speakers=["0031"], n_sentences=1, style="c")


# ------------------------------------------------------------------------------------------ slow: the build


@pytest.fixture(scope="module")
def demo_cfg():
    return target.load_demo_config(REPO)


#: Building the three miniatures and the judge took 25 min on the loaded 2 cores (about 13 min of CPU time per
#: core, docs/miniature.md section 5b), above the ~10 min CI can spend on it beside the rest of the suite: the
#: slow tests below run when the miniatures are built (`make demo`, `make tiny`) or when this variable asks
#: for the build (`make test-miniature`); otherwise they skip, saying so.
TRAIN_ENV = "EMOTION_NEURONS_TRAIN_MINIATURE"


@pytest.fixture(scope="module")
def built():
    import os

    from emotion_neurons.tiny import miniature
    from emotion_neurons.tiny.__main__ import TRAINING_SEEDS, build_all

    out = REPO / ".tiny"
    made = build_all(out, seeds=())  # corpus and judge: minutes, cached by recipe
    missing = [k for k in TRAINING_SEEDS
               if not miniature.is_cached(out / f"qwen-seed{k}", made["esd"], miniature.Recipe(seed=k))]
    if missing and os.environ.get(TRAIN_ENV) != "1":
        pytest.skip(f"miniatures of seeds {missing} are not built for this recipe (the build takes ~13-25 min on "
                    f"2 cores); run `make tiny` or `make test-miniature` ({TRAIN_ENV}=1)")
    return build_all(out)


@pytest.mark.slow
def test_demo_prompt_is_the_trained_prompt(demo_cfg):
    from emotion_neurons.tiny.miniature import LABELS, SER_PROMPT

    assert demo_cfg["tasks"]["ser"]["prompt"] == SER_PROMPT
    assert tuple(demo_cfg["tasks"]["ser"]["labels"]) == LABELS


@pytest.mark.slow
def test_judge_hears_emotion_on_unseen_voices(built, demo_cfg):
    """Loaded by the pipeline's EmotionJudge exactly like the real checkpoint (label order asserted there)."""
    from emotion_neurons.judges import EmotionJudge, restricted_argmax
    from emotion_neurons.tiny.emotion2vec import ESD_TO_LABEL

    info = json.loads((built["emotion2vec"] / "tiny_info.json").read_text())
    assert info["held_out_accuracy"] > CHANCE + MARGIN, info
    judge = EmotionJudge(str(built["emotion2vec"]), ncpu=1)
    root = Path(demo_cfg["datasets"]["esd"]["root"])
    files = [(p, e) for e in ESD_TO_LABEL for spk in ("0016", "0018", "0020") for p in sorted((root / spk / e).glob("*.wav"))[:4]]
    probs = judge.score([sf.read(p)[0] for p, _ in files], [16000] * len(files))
    names = list(ESD_TO_LABEL.values())  # emotion2vec labels: the map is the identity
    pred, _ = restricted_argmax(probs, names, {n: n for n in names})
    acc = float(np.mean([p == ESD_TO_LABEL[e] for p, (_, e) in zip(pred, files, strict=True)]))
    assert acc > CHANCE + MARGIN, acc


@pytest.mark.slow
def test_miniatures_answer_ser_on_unseen_voices(built):
    from emotion_neurons.tiny.__main__ import TRAINING_SEEDS

    for seed in TRAINING_SEEDS:
        info = json.loads((built[f"qwen-seed{seed}"] / "miniature.json").read_text())
        assert info["held_out_uar"] > CHANCE + MARGIN, (seed, info["held_out_uar"])
        assert info["train_uar"] < 1.0  # stopped before saturation


@pytest.mark.slow
def test_every_emotion_reaches_the_declared_c(built, demo_cfg):
    """Every emotion of every seed has at least `filter.c` SER successes on the identification voices (c is set
    by the rule of docs/miniature.md section 0). The stop rule itself (every recall >= stop_recall) was not met
    by recipe 3 or recipe 4 (sections 6 and 5b), so it is recorded, not asserted."""
    from emotion_neurons.tiny.__main__ import TRAINING_SEEDS

    c = int(demo_cfg["filter"]["c"])
    for seed in TRAINING_SEEDS:
        info = json.loads((built[f"qwen-seed{seed}"] / "miniature.json").read_text())
        n_per_emotion = len(info["recipe"]["train_speakers"]) * 30  # 30 sentences per emotion and voice
        successes = {e: round(r * n_per_emotion) for e, r in info["train_per_emotion"].items()}
        assert min(successes.values()) >= c, (seed, successes)


@pytest.fixture(scope="module")
def declared(built, tmp_path_factory):
    return target.evaluate_declared(REPO, tmp_path_factory.mktemp("target"))


@pytest.mark.slow
def test_declared_target_runs_with_the_filter_on(declared, demo_cfg):
    """What must hold for the target to be evaluable: the filter kept `c` successes per emotion for every
    seed, the masks have their budget, and the miniatures really do the task on the unseen-voice set."""
    c = int(demo_cfg["filter"]["c"])
    for seed, ident in declared["ident"].items():
        kept = {row["emotion"]: row["kept"] for row in ident["ident"]}
        assert set(kept.values()) == {c}, (seed, kept)
    assert min(declared["baseline_uar"]) > CHANCE + MARGIN, declared["baseline_uar"]


@pytest.mark.slow
def test_declared_demo_target(declared, demo_cfg):
    """The target declared in config/demo.yaml (`demo_target`), evaluated with the pipeline's stages."""
    sels = demo_cfg["demo_target"]["selectors"]
    summary = {s: {k: declared[s][k] for k in ("d_gold_prob", "ci", "SE_minus_RCE", "holds")} for s in sels}
    print(json.dumps(summary, indent=2))
    assert declared["met"], summary
