"""Generic hook machinery on a toy Qwen2 LM: capture equals direct recomputation, batching, interventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy import ToyAdapter

from emotion_neurons import SPANS
from emotion_neurons.hooks import Intervention, InterventionSpec, SpanTracker, StatsRecorder
from emotion_neurons.types import GenerationSettings, Instance

SETTINGS = GenerationSettings(max_new_tokens=6)


def _inst(i: int, prompt: str) -> Instance:
    return Instance(id=f"u{i}", task="ser", wav="", speaker="s", emotion="happy", split="ident", prompt=prompt)


INSTANCES = [_inst(0, "hello there"), _inst(1, "a much longer prompt text"), _inst(2, "hi")]
AUDIOS = [np.zeros(4800, np.float32), np.zeros(9600, np.float32), np.zeros(1600, np.float32)]


def capture(adapter, instances, audios, site="gate", settings=SETTINGS):
    sites = adapter.resolve_sites("thinker", site)
    tracker = SpanTracker(adapter.stop_token_ids)
    rec = StatsRecorder(sites, tracker, sum_squares=True)
    prepared = adapter.prepare(instances, audios)
    with tracker.attached(adapter.decoder_root("thinker")), rec.attached():
        tracker.start(prepared.span_codes)
        rec.reset(len(instances))
        outs = adapter.generate(prepared, settings)
    return rec.result(), outs, prepared


def direct(adapter, inst, audio, n_gen_tokens, gen_ids, site="gate"):
    """Recompute statistics from one full forward pass over prompt + counted generated tokens."""
    prompt = adapter.tokens(inst, audio)
    seq = prompt + gen_ids[:n_gen_tokens]
    first_audio = prompt.index(5)  # positions before the first audio token are the prefix span (code 3)
    codes = [0 if t == 5 else 3 if i < first_audio else 1 for i, t in enumerate(prompt)] + [2] * n_gen_tokens
    sites = adapter.resolve_sites("thinker", site)
    acts = {}
    handles = [
        s.module.register_forward_pre_hook(lambda m, a, _l=s.layer: acts.__setitem__(_l, a[0][0].detach()))
        if s.kind == "pre"
        else s.module.register_forward_hook(lambda m, a, o, _l=s.layer: acts.__setitem__(_l, o[0].detach()))
        for s in sites
    ]
    try:
        with torch.no_grad():
            adapter.model(input_ids=torch.tensor([seq]))
    finally:
        for h in handles:
            h.remove()
    codes = np.array(codes)
    L, N = len(sites), acts[0].shape[-1]
    pos = np.zeros((len(SPANS), L, N))
    tot = np.zeros((len(SPANS), L, N))
    for layer in range(L):
        g = acts[layer].numpy()
        for s in range(len(SPANS)):
            pos[s, layer] = (g[codes == s] > 0).sum(0)
            tot[s, layer] = g[codes == s].sum(0)
    tokens = np.array([(codes == s).sum() for s in range(len(SPANS))])
    return pos, tot, tokens


@pytest.fixture(scope="module")
def adapter():
    a = ToyAdapter()
    a.load()
    return a


def test_hooks_are_removed(adapter):
    capture(adapter, INSTANCES[:1], AUDIOS[:1])
    for _, m in adapter.model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("site", ["gate", "pre_act", "gated_product"])
def test_capture_equals_direct_recomputation(adapter, site):
    stats, outs, prepared = capture(adapter, INSTANCES, AUDIOS, site)
    seqs = adapter.last_sequences[:, prepared.inputs["input_ids"].shape[1] :].tolist()
    for b, (inst, audio) in enumerate(zip(INSTANCES, AUDIOS, strict=True)):
        # without a stop token, the last generated token is never fed back through the model
        n_counted = min(outs[b].n_generated, SETTINGS.max_new_tokens - 1)
        pos, tot, tokens = direct(adapter, inst, audio, n_counted, seqs[b], site)
        np.testing.assert_array_equal(stats["tokens"][b], tokens)
        np.testing.assert_array_equal(stats["pos_count"][b], pos)
        np.testing.assert_allclose(stats["act_sum"][b], tot, rtol=1e-4, atol=1e-4)


def test_stop_token_ends_counting(adapter):
    # make the third generated token of row 0 the stop token: positions after it must not be counted
    _, outs, prepared = capture(adapter, INSTANCES[:1], AUDIOS[:1])
    gen = adapter.last_sequences[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    stop = ToyAdapter(eos_id=gen[2])
    stop.model = adapter.model
    stats, outs2, _ = capture(stop, INSTANCES[:1], AUDIOS[:1])
    assert outs2[0].n_generated == gen.index(gen[2])
    assert stats["tokens"][0, SPANS.index("generated")] == outs2[0].n_generated


def test_batched_equals_one_by_one(adapter):
    batched, _, _ = capture(adapter, INSTANCES, AUDIOS)
    for b in range(len(INSTANCES)):
        single, _, _ = capture(adapter, INSTANCES[b : b + 1], AUDIOS[b : b + 1])
        np.testing.assert_array_equal(batched["tokens"][b], single["tokens"][0])
        np.testing.assert_array_equal(batched["pos_count"][b], single["pos_count"][0])
        np.testing.assert_allclose(batched["act_sum"][b], single["act_sum"][0], rtol=1e-4, atol=1e-4)


def _run_with(adapter, spec, masks, instances=INSTANCES, audios=AUDIOS):
    sites = adapter.resolve_sites("thinker", "gate")
    tracker = SpanTracker(adapter.stop_token_ids)
    iv = Intervention(sites, tracker, spec)
    rec = StatsRecorder(sites, tracker)
    prepared = adapter.prepare(instances, audios)
    with tracker.attached(adapter.decoder_root("thinker")), iv.attached(), rec.attached():
        tracker.start(prepared.span_codes)
        iv.set_masks(masks)
        rec.reset(len(instances))
        outs = adapter.generate(prepared, SETTINGS)
    return outs, rec.result()


def _masks(adapter, batch, frac=0.3, seed=0):
    L = len(adapter.resolve_sites("thinker", "gate"))
    N = adapter.n_neurons("thinker")
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, L, N), generator=g) < frac


def test_alpha_zero_is_identity(adapter):
    masks = _masks(adapter, len(INSTANCES))
    base_outs, base = _run_with(adapter, InterventionSpec("none"), masks)
    outs, stats = _run_with(adapter, InterventionSpec("steer", 0.0), masks)
    assert [o.text for o in outs] == [o.text for o in base_outs]
    np.testing.assert_array_equal(stats["act_sum"], base["act_sum"])


def test_deactivate_zeroes_masked_neurons(adapter):
    masks = _masks(adapter, len(INSTANCES))
    _, stats = _run_with(adapter, InterventionSpec("deactivate"), masks)
    m = masks.numpy()[:, None]  # [B, 1, L, N] over spans
    assert np.all(stats["pos_count"][np.broadcast_to(m, stats["pos_count"].shape)] == 0)
    assert np.all(stats["act_sum"][np.broadcast_to(m, stats["act_sum"].shape)] == 0)


def test_steer_scales_masked_neurons_on_prompt(adapter):
    masks = _masks(adapter, len(INSTANCES))
    _, base = _run_with(adapter, InterventionSpec("none"), masks)
    _, stats = _run_with(adapter, InterventionSpec("steer", 1.0), masks)
    # layer 0 sees unmodified input, so its prompt-span sums are exactly doubled on masked neurons
    audio = SPANS.index("audio")
    m0 = masks.numpy()[:, 0]
    np.testing.assert_allclose(stats["act_sum"][:, audio, 0][m0], 2 * base["act_sum"][:, audio, 0][m0], rtol=1e-5)
    np.testing.assert_allclose(stats["act_sum"][:, audio, 0][~m0], base["act_sum"][:, audio, 0][~m0], rtol=1e-5)


def test_generated_positions_only_leaves_prompt(adapter):
    masks = _masks(adapter, len(INSTANCES))
    _, base = _run_with(adapter, InterventionSpec("none"), masks)
    _, stats = _run_with(adapter, InterventionSpec("deactivate", positions="generated"), masks)
    for span in ("audio", "text"):
        s = SPANS.index(span)
        np.testing.assert_allclose(stats["act_sum"][:, s], base["act_sum"][:, s], rtol=1e-6)
    gen = SPANS.index("generated")
    m = masks.numpy()
    assert np.all(stats["act_sum"][:, gen][m] == 0)


def test_bad_inputs(adapter):
    with pytest.raises(KeyError, match="component"):
        adapter.resolve_sites("talker")
    with pytest.raises(KeyError, match="hook_site"):
        adapter.resolve_sites("thinker", "nope")
    with pytest.raises(ValueError, match="intervention"):
        InterventionSpec("amplify")
    sites = adapter.resolve_sites("thinker")
    iv = Intervention(sites, SpanTracker([2]), InterventionSpec("steer", 1.0))
    with pytest.raises(ValueError, match="masks must be"):
        iv.set_masks(torch.zeros(1, 1, 3, dtype=torch.bool))
