"""The decoding fast path: static KV cache, compiled decode step, hooks that stay inside it.

Why: on a GPU the thinker's decode step is host-bound with the dynamic cache; the static cache (and a compiled /
CUDA-graph decode step) only helps if capture and steering run inside the compiled step without breaking it and
if the statistics stay those of the plain eager path. Checked here on CPU with the tiny Qwen2.5-Omni (real
classes) and the toy Qwen2 LM; the CUDA-graph replay itself is measured by bench/gpu_fullsize.py on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from toy import ToyAdapter  # noqa: E402

from emotion_neurons.hooks import Intervention, InterventionSpec, SpanTracker, StatsRecorder  # noqa: E402
from emotion_neurons.models import get_adapter  # noqa: E402
from emotion_neurons.stages.generate import load_adapter  # noqa: E402
from emotion_neurons.tiny.qwen_omni import build  # noqa: E402
from emotion_neurons.types import GenerationSettings, Instance  # noqa: E402

SR = 16000
PROMPT = "What is the emotion of the speaker? 1. sad 2. happy 3. neutral"
SETTINGS = GenerationSettings(max_new_tokens=6)


def _audio(seconds: float, freq: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


def _inst(i: int, prompt: str = PROMPT) -> Instance:
    return Instance(
        id=f"u{i}", task="ser", wav="", speaker="s", emotion="neutral", split="ident", prompt=prompt
    )


BATCH = ([_inst(0), _inst(1, "Say it again.")], [_audio(1.3, 220.0, 0), _audio(0.6, 330.0, 1)])


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = get_adapter("qwen2_5_omni")
    a.load(str(build(tmp_path_factory.mktemp("qwen_fast"))), device="cpu")
    yield a
    torch.set_num_threads(threads)


def _run(adapter, masks=None, spec=None, batch=BATCH, sum_squares=True):
    """Generate one batch with capture (and an intervention when given); texts, statistics, logits of step 1."""
    insts, audios = batch
    sites = adapter.resolve_sites("thinker", "gate")
    tracker = SpanTracker(adapter.component_stop_token_ids("thinker"))
    rec = StatsRecorder(sites, tracker, sum_squares=sum_squares)
    iv = Intervention(sites, tracker, spec) if spec is not None else None
    prepared = adapter.prepare(insts, audios)
    with tracker.attached(adapter.decoder_root("thinker")), rec.attached():
        tracker.start(adapter.prefill_span_codes("thinker", prepared))
        rec.reset(len(insts))
        if iv is not None:
            with iv.attached():
                iv.set_masks(masks)
                outs = adapter.generate(prepared, SETTINGS)
        else:
            outs = adapter.generate(prepared, SETTINGS)
    return [o.text for o in outs], [o.n_generated for o in outs], rec.result()


def _masks(adapter, batch=2, frac=0.2, seed=0):
    n_layers = len(adapter.resolve_sites("thinker", "gate"))
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, n_layers, adapter.n_neurons("thinker")), generator=g) < frac


def _assert_same_stats(a, b):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["pos_count"], b["pos_count"])
    np.testing.assert_allclose(a["act_sum"], b["act_sum"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a["act_sqsum"], b["act_sqsum"], rtol=1e-4, atol=1e-5)


def test_static_cache_same_text_and_statistics(qwen):
    try:
        qwen.set_decoding("dynamic", "off")
        text_d, n_d, stats_d = _run(qwen)
        qwen.set_decoding("static", "off")
        assert type(qwen._decoding_kwargs(2, 40)["thinker_past_key_values"]).__name__ == "StaticCache"
        text_s, n_s, stats_s = _run(qwen)
    finally:
        qwen.set_decoding("dynamic", "off")
    assert text_s == text_d and n_s == n_d
    assert stats_d["tokens"][:, 2].min() > 0  # generated positions were counted
    _assert_same_stats(stats_s, stats_d)


def test_compiled_decode_step_keeps_hooks_in_one_graph(qwen):
    """fullgraph compile of the decode step with capture + steer hooks: no recompilation across steps or
    batches (a hook that reads per-step Python state would recompile every step), same statistics as eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = transformers.CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
    cfg._compile_all_devices = True  # compile on CPU too (transformers' test switch)
    masks = _masks(qwen)
    spec = InterventionSpec("steer", alpha=1.0)
    try:
        qwen.set_decoding("static", "off")
        ref_text, _, ref = _run(qwen, masks, spec)
        qwen.set_decoding("static", cfg)
        text1, _, stats1 = _run(qwen, masks, spec)
        graphs_first = counters["stats"]["unique_graphs"]
        text2, _, stats2 = _run(qwen, masks, spec)  # a second batch of the same size reuses the graphs
        graphs_second = counters["stats"]["unique_graphs"]
        # other prompt lengths: the prefill is eager, the compiled decode step must not be re-specialised
        other = ([_inst(3, "Another prompt, with a longer text than the others."), _inst(4)], BATCH[1][::-1])
        _run(qwen, masks, spec, batch=other)
        graphs_third = counters["stats"]["unique_graphs"]
        breaks = dict(counters["graph_break"])
    finally:
        qwen.set_decoding("dynamic", "off")
        if hasattr(qwen.model.thinker, "_compiled_call"):
            del qwen.model.thinker._compiled_call
        torch._dynamo.reset()
    # one graph for the tracker's pre-hook on the thinker, one for the thinker's forward with the MLP hooks
    assert 1 <= graphs_first <= 2, f"decode step compiled into {graphs_first} graphs"
    assert graphs_second == graphs_first, "the second batch recompiled"
    assert graphs_third == graphs_first, "a batch with other prompt lengths recompiled the decode step"
    assert not breaks
    assert text1 == ref_text == text2
    _assert_same_stats(stats1, ref)
    _assert_same_stats(stats2, ref)


def test_config_keys_reach_the_adapter(qwen, monkeypatch, tmp_path):
    from emotion_neurons import models

    monkeypatch.setattr(models, "get_adapter", lambda name: _Stub())
    a = load_adapter(
        {"adapter": "qwen2_5_omni", "id": "x", "cache_implementation": "static", "compile": "cudagraphs"}
    )
    assert a.calls == [("static", "cudagraphs")]
    with pytest.raises(ValueError, match="model.compile 'inductor' needs model.cache_implementation: static"):
        qwen.set_decoding("dynamic", "inductor")
    try:  # speech output: static cache, but no compiled decode step (CUDA graphs overwrite kept hidden states)
        qwen.set_decoding("static", "cudagraphs")
        kw = qwen._decoding_kwargs(1, 10, speech=True)
        assert kw["thinker_disable_compile"] is True and "thinker_compile_config" not in kw
        assert qwen._decoding_kwargs(1, 10)["thinker_compile_config"].backend == "cudagraphs"
    finally:
        qwen.set_decoding("dynamic", "off")
    with pytest.raises(ValueError, match="model.cache_implementation 'paged'"):
        qwen.set_decoding("paged")
    monkeypatch.setattr(models, "get_adapter", lambda name: ToyAdapter())
    with pytest.raises(ValueError, match="has no fast decoding path"):
        load_adapter({"adapter": "toy", "id": "x", "cache_implementation": "static"})


class _Stub:
    def __init__(self):
        self.calls = []

    def load(self, *a, **k):
        pass

    def set_decoding(self, cache, compile_mode):
        self.calls.append((cache, compile_mode))


# -- hook efficiency on the toy LM ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    a = ToyAdapter()
    a.load()
    return a


TOY_BATCH = (
    [_inst(0, "hello there"), _inst(1, "a longer prompt")],
    [np.zeros(4800, np.float32), np.zeros(3200, np.float32)],
)


def test_identity_interventions_attach_no_hook(toy):
    sites = toy.resolve_sites("thinker", "gate")
    for spec in (InterventionSpec("steer", 0.0), InterventionSpec("none")):
        iv = Intervention(sites, SpanTracker([2]), spec)
        with iv.attached():
            iv.set_masks(torch.ones(1, len(sites), toy.n_neurons("thinker"), dtype=torch.bool))
            assert all(not s.module._forward_hooks and not s.module._forward_pre_hooks for s in sites)
    iv = Intervention(sites, SpanTracker([2]), InterventionSpec("steer", 0.5))
    with iv.attached():
        assert all(s.module._forward_hooks for s in sites)


def test_steer_factor_is_one_dense_multiply(toy):
    """The edit equals g * (1 + alpha m) with the mask of each row, at every position."""
    sites = toy.resolve_sites("thinker", "gate")
    tracker = SpanTracker([2])
    masks = _masks(toy, batch=2, frac=0.5)
    iv = Intervention(sites, tracker, InterventionSpec("steer", 0.75))
    tracker.start(torch.zeros(2, 3, dtype=torch.long))
    iv.set_masks(masks)
    g = torch.randn(2, 3, toy.n_neurons("thinker"))
    out = iv._edit(1, g)
    np.testing.assert_allclose(
        out.numpy(), (g * (1 + 0.75 * masks[:, 1].float()).unsqueeze(1)).numpy(), rtol=1e-6
    )


def test_recorder_reuses_its_buffers(toy):
    """Accumulators keep their address across batches of one size (CUDA graphs update them in place) and are
    zeroed in between: the second batch's statistics equal a fresh recorder's."""
    sites = toy.resolve_sites("thinker", "gate")
    tracker = SpanTracker(toy.stop_token_ids)
    rec = StatsRecorder(sites, tracker, sum_squares=True)
    results, ptrs = [], []
    with tracker.attached(toy.decoder_root("thinker")), rec.attached():
        for _ in range(2):
            prepared = toy.prepare(*TOY_BATCH)
            tracker.start(prepared.span_codes)
            rec.reset(2)
            with torch.inference_mode():  # as generate.run calls it
                toy.generate(prepared, SETTINGS)
            results.append(rec.result())
            ptrs.append(
                (
                    rec.pos[0].data_ptr(),
                    rec.sum[1].data_ptr(),
                    rec.tokens.data_ptr(),
                    tracker._alive.data_ptr(),
                )
            )
    assert ptrs[0] == ptrs[1]
    _assert_same_stats(results[1], results[0])
