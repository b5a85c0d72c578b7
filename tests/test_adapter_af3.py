"""Audio Flamingo 3 adapter on a tiny random checkpoint of the real class and processor (offline, CPU)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from emotion_neurons import SPANS
from emotion_neurons.hooks import Intervention, InterventionSpec, SpanTracker, StatsRecorder
from emotion_neurons.models import get_adapter
from emotion_neurons.models.audio_flamingo3 import AudioFlamingo3Adapter
from emotion_neurons.tiny import audio_flamingo3 as tiny_af3
from emotion_neurons.types import GenerationSettings, Instance

SETTINGS = GenerationSettings(max_new_tokens=12)
SR = 16000
PROMPT = (
    "What emotion does the speaker express in this audio? Choose one option.\n\n1. happy\n2. sad\n\nAnswer."
)


def _inst(i: int, prompt: str = PROMPT) -> Instance:
    return Instance(
        id=f"u{i}", task="ser", wav="", speaker="s", emotion="happy", split="ident", prompt=prompt
    )


def _audio(seconds: float, freq: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


INSTANCES = [_inst(0), _inst(1, "Which emotion? 1. sad 2. angry"), _inst(2)]
AUDIOS = [_audio(1.0, 220.0, 0), _audio(2.5, 440.0, 1), _audio(0.6, 330.0, 2)]


@pytest.fixture(scope="session")
def af3_dir(tmp_path_factory):
    return tiny_af3.build(tmp_path_factory.mktemp("tiny") / "audio_flamingo3")


@pytest.fixture(scope="module")
def adapter(af3_dir) -> AudioFlamingo3Adapter:
    a = get_adapter("audio_flamingo3")
    assert isinstance(a, AudioFlamingo3Adapter)
    a.load(str(af3_dir), device="cpu", dtype="float32")
    return a


def capture(adapter, instances, audios, spec: InterventionSpec | None = None, masks=None):
    sites = adapter.resolve_sites("thinker", "gate")
    tracker = SpanTracker(adapter.stop_token_ids)
    rec = StatsRecorder(sites, tracker)
    iv = Intervention(sites, tracker, spec or InterventionSpec("none"))
    prepared = adapter.prepare(instances, audios)
    with tracker.attached(adapter.decoder_root("thinker")), iv.attached(), rec.attached():
        tracker.start(prepared.span_codes)
        if masks is not None:
            iv.set_masks(masks)
        rec.reset(len(instances))
        outs = adapter.generate(prepared, SETTINGS)
    return rec.result(), outs, prepared


def _expected_audio_tokens(adapter, prepared) -> list[int]:
    """Audio tokens per clip as the model's encoder computes them (single 30 s window per clip here)."""
    frames = prepared.inputs["input_features_mask"].sum(-1)
    _, post = adapter.model.model.audio_tower._get_feat_extract_output_lengths(frames)
    return post.tolist()


def test_checkpoint_is_tiny(af3_dir):
    size = sum(p.stat().st_size for p in af3_dir.iterdir())
    assert size < 20e6
    tok = tiny_af3.build_tokenizer()
    for w in tiny_af3.SINGLE_TOKEN_WORDS:
        assert len(tok.tokenize(w)) == 1 and len(tok.tokenize(" " + w)) == 1, w
    for d in "0123456789":
        assert tok.tokenize(d) == [d]


@pytest.mark.parametrize("site", ["gate", "pre_act", "gated_product"])
def test_resolve_sites_one_module_per_layer(adapter, site):
    sites = adapter.resolve_sites("thinker", site)
    n_layers = adapter.model.config.text_config.num_hidden_layers
    assert [s.layer for s in sites] == list(range(n_layers))
    assert len({id(s.module) for s in sites}) == n_layers
    sub = {"gate": "act_fn", "pre_act": "gate_proj", "gated_product": "down_proj"}[site]
    for s in sites:
        assert re.fullmatch(rf"model\.language_model\.layers\.{s.layer}\.mlp\.{sub}", s.name), s.name
    assert adapter.n_neurons() == adapter.model.config.text_config.intermediate_size


def test_component_regex_tolerates_4x_paths():
    pattern = re.compile(AudioFlamingo3Adapter.components["thinker"])
    assert pattern.match("model.language_model.layers.3.mlp").group(1) == "3"
    assert pattern.match("language_model.model.layers.7.mlp").group(1) == "7"
    assert pattern.match("model.audio_tower.layers.0.mlp") is None


def test_span_codes(adapter):
    prepared = adapter.prepare(INSTANCES, AUDIOS)
    codes = prepared.span_codes
    ids, att = prepared.inputs["input_ids"], prepared.inputs["attention_mask"]
    assert codes.shape == ids.shape
    assert torch.equal(codes == -1, att == 0)  # -1 only on padding
    for b, n_audio in enumerate(_expected_audio_tokens(adapter, prepared)):
        row = codes[b]
        assert int((row == 0).sum()) == n_audio == int((ids[b] == adapter.audio_token_id).sum())
        n_pad = int((row == -1).sum())
        assert torch.all(row[:n_pad] == -1)  # left padding
        audio_pos = torch.nonzero(row == 0).flatten()
        assert int(audio_pos[-1] - audio_pos[0]) + 1 == n_audio  # one contiguous run
    assert int((codes[:, -1] == 1).sum()) == len(INSTANCES)  # prompts end with text ("assistant\n")
    # positions before the first audio token are the `prefix` span (identical for every row), none after it
    prefix = SPANS.index("prefix")
    for b in range(len(INSTANCES)):
        first_audio = int(torch.nonzero(ids[b] == adapter.audio_token_id)[0])
        pos = torch.arange(codes.shape[1])
        valid = att[b].bool()
        assert (codes[b][(pos < first_audio) & valid] == prefix).all()
        assert ((pos < first_audio) & valid).any()
        assert not (codes[b][pos > first_audio] == prefix).any()


def test_prompt_follows_processor_chat_template(adapter):
    text = adapter.render_prompt("Hi.")
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<sound>Hi.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_decoder_root_sees_input_ids_every_step(adapter):
    shapes = []
    root = adapter.decoder_root("thinker")
    h = root.register_forward_pre_hook(
        lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)), with_kwargs=True
    )
    try:
        prepared = adapter.prepare(INSTANCES[:2], AUDIOS[:2])
        adapter.generate(prepared, SETTINGS)
    finally:
        h.remove()
    assert shapes[0] == tuple(prepared.inputs["input_ids"].shape)
    assert len(shapes) > 1 and all(s == (2, 1) for s in shapes[1:])


def test_generate_text(adapter):
    outs = adapter.generate(adapter.prepare(INSTANCES, AUDIOS), SETTINGS)
    assert len(outs) == len(INSTANCES)
    for o in outs:
        assert isinstance(o.text, str) and o.wav is None
        assert 0 <= o.n_generated <= SETTINGS.max_new_tokens
    assert any(o.text.strip() for o in outs)
    # greedy: the checkpoint's sampling generation config must not leak in
    again = adapter.generate(
        adapter.prepare(INSTANCES, AUDIOS), GenerationSettings(max_new_tokens=12, seed=7)
    )
    assert [o.text for o in again] == [o.text for o in outs]


def test_batched_text_equals_one_by_one(adapter):
    batched = adapter.generate(adapter.prepare(INSTANCES, AUDIOS), SETTINGS)
    for b in range(len(INSTANCES)):
        single = adapter.generate(adapter.prepare(INSTANCES[b : b + 1], AUDIOS[b : b + 1]), SETTINGS)
        assert single[0].text == batched[b].text
        assert single[0].n_generated == batched[b].n_generated


def test_capture_token_counts(adapter):
    stats, outs, prepared = capture(adapter, INSTANCES, AUDIOS)
    att = prepared.inputs["attention_mask"]
    n_audio = _expected_audio_tokens(adapter, prepared)
    for b, o in enumerate(outs):
        # a row that never stops has its last token never fed back through the model
        n_counted = min(o.n_generated, SETTINGS.max_new_tokens - 1)
        ids = prepared.inputs["input_ids"][b]
        first_audio = int(torch.nonzero(ids == adapter.audio_token_id)[0])
        n_prefix = int(att[b][:first_audio].sum())  # positions before the first audio token: `prefix`
        expected = [n_audio[b], int(att[b].sum()) - n_audio[b] - n_prefix, n_counted, n_prefix]
        np.testing.assert_array_equal(stats["tokens"][b], expected)
    L, N = len(adapter.resolve_sites("thinker")), adapter.n_neurons()
    assert stats["act_sum"].shape == (len(INSTANCES), len(SPANS), L, N)
    assert np.all(stats["pos_count"] <= stats["tokens"][:, :, None, None])


def test_batched_stats_equal_one_by_one(adapter):
    batched, _, _ = capture(adapter, INSTANCES, AUDIOS)
    for b in range(len(INSTANCES)):
        single, _, _ = capture(adapter, INSTANCES[b : b + 1], AUDIOS[b : b + 1])
        np.testing.assert_array_equal(batched["tokens"][b], single["tokens"][0])
        np.testing.assert_allclose(batched["act_sum"][b], single["act_sum"][0], rtol=1e-4, atol=1e-4)
        # a gate exactly at 0 could flip sign under different kernels: allow one count
        np.testing.assert_allclose(batched["pos_count"][b], single["pos_count"][0], atol=1)


def test_steer_alpha_zero_is_identity(adapter):
    L, N = len(adapter.resolve_sites("thinker")), adapter.n_neurons()
    masks = torch.rand((len(INSTANCES), L, N), generator=torch.Generator().manual_seed(0)) < 0.3
    base, base_outs, _ = capture(adapter, INSTANCES, AUDIOS)
    stats, outs, _ = capture(adapter, INSTANCES, AUDIOS, InterventionSpec("steer", 0.0), masks)
    assert [o.text for o in outs] == [o.text for o in base_outs]
    np.testing.assert_array_equal(stats["act_sum"], base["act_sum"])
    for _, m in adapter.model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_stop_token_mid_batch_ends_counting(adapter):
    """One row stops early while the others go on: its later (pad) positions must not be counted."""
    prepared = adapter.prepare(INSTANCES, AUDIOS)
    with torch.no_grad():
        seq = adapter.model.generate(
            **prepared.inputs, max_new_tokens=SETTINGS.max_new_tokens, do_sample=False, repetition_penalty=1.0,
            eos_token_id=adapter.stop_token_ids, pad_token_id=adapter.pad_token_id, temperature=None, top_p=None,
            top_k=None,
        )  # fmt: skip
    gen = seq[:, prepared.inputs["input_ids"].shape[1] :].tolist()
    extra = gen[0][2]
    stopper = copy.copy(adapter)
    stopper._stop_ids = adapter.stop_token_ids + [extra]
    stats, outs, _ = capture(stopper, INSTANCES, AUDIOS)
    assert outs[0].n_generated == gen[0].index(extra) <= 2
    for b, o in enumerate(outs):
        n_counted = o.n_generated if extra in gen[b] else min(o.n_generated, SETTINGS.max_new_tokens - 1)
        assert stats["tokens"][b, SPANS.index("generated")] == n_counted


def test_ser_option_probabilities(adapter):
    """SER outputs carry first-step option probabilities that match the model's own prefill logits."""
    inst = Instance(id="o0", task="ser", wav="", speaker="s", emotion="sad", split="eval",
                    prompt="Which emotion? 1. sad 2. angry", options=["sad", "angry"])
    prepared = adapter.prepare([inst], AUDIOS[:1])
    (out,) = adapter.generate(prepared, GenerationSettings(max_new_tokens=2))
    assert set(out.option_probs) == {"sad", "angry"}
    with torch.no_grad():
        logits = adapter.model(**prepared.inputs).logits[0, -1]
    expected = adapter.option_probabilities(adapter.tokenizer, logits, ["sad", "angry"])
    for k, v in expected.items():
        assert out.option_probs[k] == pytest.approx(v, rel=1e-4)
    assert abs(sum(out.option_probs.values()) - 1.0) < 1e-5
    (plain,) = adapter.generate(adapter.prepare(INSTANCES[:1], AUDIOS[:1]), GenerationSettings(max_new_tokens=2))
    assert plain.option_probs is None  # no options, nothing recorded
