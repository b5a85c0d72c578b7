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


def test_static_cache_length_follows_the_bucket(qwen):
    """`model.static_cache_bucket`: the cache holds the needed positions rounded up to the bucket, is reused
    while long enough (same buffers: no re-capture) and grows by buckets; a new bucket drops the old caches."""
    try:
        qwen.set_decoding("static", "off", static_cache_bucket=64)
        first = qwen._static_cache(2, 70)
        assert qwen._caches[2][0] == 128
        assert qwen._static_cache(2, 100) is first and qwen._caches[2][0] == 128
        qwen._static_cache(2, 130)
        assert qwen._caches[2][0] == 192
        assert qwen._static_cache(1, 5) is not first and qwen._caches[1][0] == 64
        qwen.set_decoding("static", "off", static_cache_bucket=256)
        assert not qwen._caches
        qwen._static_cache(2, 70)
        assert qwen._caches[2][0] == 256
        with pytest.raises(ValueError, match="static_cache_bucket must be >= 16"):
            qwen.set_decoding("static", "off", static_cache_bucket=8)
    finally:
        qwen.set_decoding("dynamic", "off")


def test_compiled_decode_step_keeps_hooks_in_one_graph(qwen, monkeypatch):
    """fullgraph compile of the decode step with capture + steer hooks: no recompilation across steps or
    batches (a hook that reads per-step Python state would recompile every step), same statistics as eager;
    attention on the key/value heads (no `repeat_kv` of the static cache in the compiled step)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = transformers.CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
    cfg._compile_all_devices = True  # compile on CPU too (transformers' test switch)
    masks = _masks(qwen)
    spec = InterventionSpec("steer", alpha=1.0)
    from transformers.integrations import sdpa_attention

    class Seen:  # repeat_kv traced into the compiled decode step (a copy of the KV cache per query head)
        repeated = False  # set, never counted: a changing count would be a guard, i.e. a recompile per step

    repeat_kv = sdpa_attention.repeat_kv

    def counted_repeat_kv(x, n):
        if torch.compiler.is_compiling():
            Seen.repeated = True
        return repeat_kv(x, n)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", counted_repeat_kv)
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
    # one graph: the tracker wraps the thinker's forward (a pre-hook on it would be a graph, and a CUDA-graph
    # replay, of its own every step)
    assert graphs_first == 1, f"decode step compiled into {graphs_first} graphs"
    assert graphs_second == graphs_first, "the second batch recompiled"
    assert graphs_third == graphs_first, "a batch with other prompt lengths recompiled the decode step"
    assert not breaks
    assert not Seen.repeated, "the compiled decode step copied the KV cache per query head (repeat_kv)"
    assert text1 == ref_text == text2
    _assert_same_stats(stats1, ref)
    _assert_same_stats(stats2, ref)


def test_config_keys_reach_the_adapter(qwen, monkeypatch, tmp_path):
    from emotion_neurons import models

    monkeypatch.setattr(models, "get_adapter", lambda name: _Stub())
    a = load_adapter(
        {"adapter": "qwen2_5_omni", "id": "x", "cache_implementation": "static", "compile": "cudagraphs",
         "static_cache_bucket": 128}
    )  # fmt: skip
    assert a.calls == [("static", "cudagraphs", 128)]
    with pytest.raises(ValueError, match="model.compile 'inductor' needs model.cache_implementation: static"):
        qwen.set_decoding("dynamic", "inductor")
    try:  # speech output: static cache, but no compiled decode step (CUDA graphs overwrite kept hidden states)
        qwen.set_decoding("static", "cudagraphs")
        kw = qwen._decoding_kwargs(1, 10, speech=True)
        assert kw["thinker_disable_compile"] is True and "thinker_compile_config" not in kw
        assert qwen._decoding_kwargs(1, 10)["thinker_compile_config"].backend == "emotion_neurons_cudagraphs"
    finally:
        qwen.set_decoding("dynamic", "off")
    with pytest.raises(ValueError, match="model.cache_implementation 'paged'"):
        qwen.set_decoding("paged")
    stub = _Stub()
    monkeypatch.setattr(models, "get_adapter", lambda name: stub)
    load_adapter({"adapter": "qwen2_5_omni", "id": "x", "token2wav_batch_size": 8})
    assert stub.speech == [(8, "off")] and stub.calls == []
    load_adapter({"adapter": "qwen2_5_omni", "id": "x", "talker_compile": "cudagraphs"})
    assert stub.speech == [(8, "off"), (1, "cudagraphs")]
    with pytest.raises(ValueError, match="token2wav_batch_size must be >= 1"):
        qwen.set_speech(0)
    monkeypatch.setattr(models, "get_adapter", lambda name: ToyAdapter())
    with pytest.raises(ValueError, match="has no fast decoding path"):
        load_adapter({"adapter": "toy", "id": "x", "cache_implementation": "static"})
    with pytest.raises(ValueError, match="token2wav_batch_size=4 / model.talker_compile='off': adapter 'toy' has no speech"):
        load_adapter({"adapter": "toy", "id": "x", "token2wav_batch_size": 4})
    with pytest.raises(ValueError, match="talker_compile='cudagraphs': adapter 'toy' has no speech fast path"):
        load_adapter({"adapter": "toy", "id": "x", "talker_compile": "cudagraphs"})


class _Stub:
    def __init__(self):
        self.calls = []
        self.speech = []

    def load(self, *a, **k):
        pass

    def set_decoding(self, cache, compile_mode, static_cache_bucket=None):
        self.calls.append((cache, compile_mode, static_cache_bucket))

    def set_speech(self, token2wav_batch_size, talker_compile="off"):
        self.speech.append((token2wav_batch_size, talker_compile))


# -- speech: token2wav batched -----------------------------------------------------------------------------------
def _token2wav_call(adapter, length, seed):
    model = adapter.model
    spk = model.speaker_map[adapter.resolve_speaker()]
    g = torch.Generator().manual_seed(seed)
    n = int(model.config.token2wav_config.dit_config.num_embeds)
    code = torch.randint(0, n, (1, length), generator=g)
    return (code,), {"conditioning": spk["cond"].float(), "reference_mel": spk["ref_mel"].float()}


def test_token2wav_batched_equals_per_row(qwen):
    """Rows of one code length run together, other lengths apart; each row equals the upstream per-row call
    made right after seeding with that row's seed (float32: batched kernels round differently, hence a
    tolerance)."""
    from emotion_neurons.models.qwen_omni import token2wav_batched

    t2w = qwen.model.token2wav
    calls = [_token2wav_call(qwen, n, i) for i, n in enumerate((12, 9, 12, 12))]
    seeds = [101, 102, 103, 104]
    ref = []
    for (args, kw), seed in zip(calls, seeds, strict=True):
        torch.manual_seed(seed)
        with torch.no_grad():
            ref.append(t2w(*args, **kw).reshape(-1).float())
    dit_calls = []
    handle = t2w.code2wav_dit_model.register_forward_pre_hook(lambda m, a, k: dit_calls.append(k["hidden_states"].shape[0]), with_kwargs=True)
    try:
        got = token2wav_batched(t2w, calls, seeds, max_batch=2)
    finally:
        handle.remove()
    assert [w.shape for w in got] == [w.shape for w in ref]
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-4, atol=1e-5)
    # lengths 12 (three rows, max 2 per call) and 9: DiT batches of 2, 1 and 1 rows (the ODE calls it 36 times each)
    assert sorted(dit_calls) == sorted([2] * 36 + [1] * 72), sorted(set(dit_calls))
    with pytest.raises(RuntimeError, match="called 4 times for a batch of 3 rows"):
        token2wav_batched(t2w, calls, seeds[:3], max_batch=2)


def test_speech_with_batched_token2wav_matches_per_row(qwen):
    """Through `generate`: the same texts, codes and (to float32 rounding) waveforms as the upstream per-row
    token2wav, and each row's speech still independent of its batch."""
    insts = [_inst(0), _inst(1, "Say it again."), _inst(2, "Once more, please.")]
    audios = [_audio(1.0, 220.0, 0), _audio(0.7, 330.0, 1), _audio(0.8, 180.0, 2)]
    settings = GenerationSettings(max_new_tokens=5, want_audio=True, seed=7)
    prepared = qwen.prepare(insts, audios)
    try:
        qwen.set_speech(1)
        per_row = qwen.generate(prepared, settings)
        qwen.set_speech(4)
        batched = qwen.generate(prepared, settings)
        alone = qwen.generate(qwen.prepare(insts[1:2], audios[1:2]), settings)[0]
    finally:
        qwen.set_speech(1)
    assert [o.text for o in batched] == [o.text for o in per_row]
    for b, r in zip(batched, per_row, strict=True):
        assert b.wav.shape == r.wav.shape and b.wav.size > 0
        np.testing.assert_allclose(b.wav, r.wav, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batched[1].wav, alone.wav, rtol=1e-4, atol=1e-5)


def test_talker_decode_step_compiled_same_codes(qwen, monkeypatch):
    """`model.talker_compile`: the talker's decode steps run through the compiled fixed-shape step
    (`TalkerDecodeStep`, one compilation for all steps of a batch and the next), and the codec ids, texts and
    waves equal the upstream eager talker's (dynamic cache). CPU: dynamo with the eager backend, which runs the
    traced graph; the CUDA-graph replay of the same step is measured in bench/gpu_fastpath.py."""
    model = qwen.model
    codes: list[torch.Tensor] = []
    handle = model.token2wav.register_forward_pre_hook(lambda m, a: codes.append(a[0].clone()))
    insts = [_inst(0), _inst(1, "Say it again."), _inst(2, "Once more, please.")]
    audios = [_audio(1.0, 220.0, 0), _audio(0.7, 330.0, 1), _audio(0.8, 180.0, 2)]
    prepared = qwen.prepare(insts, audios)
    one = qwen.prepare(insts[1:2], audios[1:2])  # one row: no attention mask, upstream counts positions itself
    steps = []
    count = model.talker.register_forward_pre_hook(  # outside the compiled step (a traced hook would be guarded on)
        lambda m, a, k: steps.append(k["input_ids"].shape[1] if k.get("inputs_embeds") is None else 0), with_kwargs=True
    )
    results = {}
    try:
        for name, mode in (
            ("eager", "off"),
            ("compiled", transformers.CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)),
        ):
            codes.clear()
            steps.clear()
            qwen.set_speech(1, mode)
            outs = [qwen.generate(prepared, GenerationSettings(max_new_tokens=5, want_audio=True, seed=s, extra=x))
                    for s, x in ((7, {}), (8, {"talker_do_sample": False}))]  # fmt: skip
            outs.append(qwen.generate(one, GenerationSettings(max_new_tokens=5, want_audio=True, seed=9)))
            ran = qwen._talker_step.steps if qwen._talker_step is not None else 0
            results[name] = (outs, [c.clone() for c in codes], list(steps), ran)
            assert "forward" not in vars(model.talker)  # restored after generate
    finally:
        handle.remove()
        count.remove()
        qwen.set_speech(1, "off")
    (eager, eager_codes, eager_steps, ran0), (fast, fast_codes, fast_steps, ran) = results["eager"], results["compiled"]
    decode_steps = sum(1 for n in fast_steps if n == 1)
    assert decode_steps > 4 and fast_steps == eager_steps
    assert ran0 == 0 and ran == decode_steps  # every decode step of both calls ran the compiled step
    assert qwen._talker_step is None  # set_speech(off) dropped it
    for a, b in zip(eager_codes, fast_codes, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(eager, fast, strict=True):
        assert [o.text for o in a] == [o.text for o in b]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.wav, y.wav)


def test_talker_decode_step_is_the_compiled_one(qwen):
    """Every talker decode step goes through the compiled step (not upstream's forward), compiled once."""
    from emotion_neurons.models import qwen_omni

    cfg = transformers.CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
    compiles = []
    upstream = []
    prepared = qwen.prepare(BATCH[0], BATCH[1])
    try:
        qwen.set_speech(1, cfg)
        for seed in (7, 8):
            qwen.generate(prepared, GenerationSettings(max_new_tokens=4, want_audio=True, seed=seed))
            step = qwen._talker_step
            assert isinstance(step, qwen_omni.TalkerDecodeStep)
            if seed == 7:
                first = step.steps
                orig = step.upstream
                step.upstream = lambda *a, orig=orig, **k: upstream.append(k.get("inputs_embeds") is not None) or orig(*a, **k)
                torch._dynamo.reset()
                backend = cfg.backend

                def counting(gm, inputs):
                    compiles.append(1)
                    return gm.forward

                step.compiled = torch.compile(step._step, backend=counting, dynamic=False, fullgraph=True)
        assert first > 4 and step.steps > first
        assert upstream == [True]  # only the prefill (inputs_embeds) ran upstream's forward
        assert len(compiles) == 1, backend
    finally:
        qwen.set_speech(1, "off")
    with pytest.raises(ValueError, match="model.talker_compile 'fast' unknown"):
        qwen.set_speech(1, "fast")


# -- the cudagraphs backend: static KV cache and hook buffers static, their writes inside the graph ----------------
def test_cudagraphs_backend_keeps_static_writes_in_the_graph(qwen, monkeypatch):
    """The KV-cache writes and the hooks' accumulator / span-state updates stay in the captured graph as
    in-place writes of static inputs (torch's `cudagraphs` backend functionalises them into whole-tensor
    copies back after every step). On CPU the graph is not captured (device), but it runs, and the texts
    and statistics equal the static-cache eager path's."""
    from torch._dynamo.backends import cudagraphs as cg

    from emotion_neurons import cudagraphs

    skips, mutated = [], []
    monkeypatch.setattr(cg, "log_cudagraph_skip_and_bump_counter", lambda msg: skips.append(msg))
    find = cg.find_input_mutations
    monkeypatch.setattr(cg, "find_input_mutations", lambda g: mutated.append(find(g)) or mutated[-1])
    masks, spec = _masks(qwen), InterventionSpec("steer", alpha=1.0)
    qwen.set_decoding("static", "off")
    try:
        ref = _run(qwen, masks, spec)
        torch._dynamo.reset()
        cfg = transformers.CompileConfig(fullgraph=True, dynamic=False, backend=cudagraphs.static_cudagraphs, mode=None)
        cfg._compile_all_devices = True
        qwen.set_decoding("static", cfg)
        text, _, stats = _run(qwen, masks, spec)
    finally:
        qwen.set_decoding("dynamic", "off")
        if hasattr(qwen.model.thinker, "_compiled_call"):
            del qwen.model.thinker._compiled_call
        torch._dynamo.reset()
    n_layers = len(qwen.resolve_sites("thinker", "gate"))
    # K and V per layer; the stacked pos, sum and sum-of-squares accumulators, tokens; the tracker's alive / codes
    assert mutated and len(mutated[0]) >= 2 * n_layers + 6, mutated
    assert skips and all("cpu device" in m for m in skips), skips  # the only reason left on CPU
    assert text == ref[0]
    _assert_same_stats(stats, ref[2])


def test_recorder_counts_match_a_reference(toy):
    """pos_count (int32 accumulators, sign test in the site's dtype) equals 1[g > 0] counted per row and span
    from the site activations themselves; act_sum equals their sum."""
    sites = toy.resolve_sites("thinker", "gate")
    tracker = SpanTracker(toy.stop_token_ids)
    rec = StatsRecorder(sites, tracker)
    seen: dict[int, list] = {s.layer: [] for s in sites}
    spans: list = []
    handles = [
        s.module.register_forward_hook(lambda m, a, o, _l=s.layer: seen[_l].append(o.detach().clone()))
        if s.kind != "pre" else s.module.register_forward_pre_hook(lambda m, a, _l=s.layer: seen[_l].append(a[0].detach().clone()))
        for s in sites
    ]  # fmt: skip
    try:
        with tracker.attached(toy.decoder_root("thinker")), rec.attached():
            prepared = toy.prepare(*TOY_BATCH)
            tracker.start(prepared.span_codes)
            rec.reset(2)
            root = toy.decoder_root("thinker")
            h = root.register_forward_hook(lambda m, a, o: spans.append(tracker.codes.clone()))
            with torch.inference_mode():
                toy.generate(prepared, SETTINGS)
            h.remove()
            got = rec.result()
    finally:
        for h in handles:
            h.remove()
    from emotion_neurons import SPANS

    assert got["pos_count"].dtype == np.int32
    for li, s in enumerate(sites):
        pos = np.zeros((2, len(SPANS), toy.n_neurons("thinker")), np.int64)
        act = np.zeros(pos.shape, np.float64)
        for g, codes in zip(seen[s.layer], spans, strict=True):
            g, codes = g.float().numpy(), codes.numpy()
            for b in range(2):
                for t in range(codes.shape[1]):
                    if codes[b, t] >= 0:
                        pos[b, codes[b, t]] += g[b, t] > 0
                        act[b, codes[b, t]] += g[b, t]
        np.testing.assert_array_equal(got["pos_count"][:, :, li], pos)
        np.testing.assert_allclose(got["act_sum"][:, :, li], act, rtol=1e-5, atol=1e-5)


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


def test_tracker_wraps_and_restores_the_root_forward(toy):
    """The tracker runs inside the root's forward (not as a pre-hook: one compiled graph per step), keeps
    generate's view of the signature, and leaves the root as it found it, also when nested."""
    import inspect

    from emotion_neurons.hooks import attached_trackers

    root = toy.decoder_root("thinker")
    signature = inspect.signature(root.forward)
    outer, inner = SpanTracker([2]), SpanTracker([2])
    with outer.attached(root):
        assert not root._forward_pre_hooks and inspect.signature(root.forward) == signature
        with inner.attached(root):
            assert attached_trackers(root) == [outer, inner]
            prepared = toy.prepare(*TOY_BATCH)
            outer.start(prepared.span_codes)
            inner.start(prepared.span_codes)
            with torch.inference_mode():
                toy.generate(prepared, SETTINGS)
        assert attached_trackers(root) == [outer] and outer.calls == inner.calls > 1
    assert "forward" not in vars(root) and attached_trackers(root) == []


def test_packed_gqa_attention_equals_transformers_sdpa(qwen, monkeypatch):
    """The compiled step's attention equals transformers' SDPA for one query position (bitwise, as it runs
    the same ops eagerly) and what transformers computes under compile (`repeat_kv`, to rounding); prefill
    calls are transformers' own. `model.compile` switches the thinker's text attention to it and back."""
    from transformers.integrations import sdpa_attention

    from emotion_neurons.cudagraphs import ATTENTION_NAME, packed_gqa_sdpa

    mods = dict(qwen.model.named_modules())
    attn = mods[qwen.resolve_sites("thinker", "gate")[0].name.rsplit(".mlp", 1)[0] + ".self_attn"]
    assert attn.num_key_value_groups > 1
    g = torch.Generator().manual_seed(0)
    b, h, kv, s, d = 2, attn.config.num_attention_heads, attn.config.num_key_value_heads, 9, attn.head_dim
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n, t in ((h, 1), (kv, s), (kv, s)))
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
    mask[0, ..., :3] = False  # left padding of row 0
    ref, _ = sdpa_attention.sdpa_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    got, _ = packed_gqa_sdpa(attn, q, k, v, mask, scaling=attn.scaling)
    assert torch.equal(got, ref)
    monkeypatch.setattr(sdpa_attention, "is_torchdynamo_compiling", lambda: True)  # transformers' compiled branch
    compiled, _ = sdpa_attention.sdpa_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    torch.testing.assert_close(got, compiled)
    q5 = torch.randn(b, h, 5, d, generator=g)  # a prefill call: transformers' function, unchanged
    mask5 = torch.ones(b, 1, 5, s, dtype=torch.bool)
    ref5, _ = sdpa_attention.sdpa_attention_forward(attn, q5, k, v, mask5, scaling=attn.scaling)
    assert torch.equal(packed_gqa_sdpa(attn, q5, k, v, mask5, scaling=attn.scaling)[0], ref5)
    cfg = qwen.model.thinker.config.get_text_config(decoder=True)
    try:
        qwen.set_decoding("static", "cudagraphs")
        assert cfg._attn_implementation == ATTENTION_NAME
        qwen.set_decoding("static", "off")
        assert cfg._attn_implementation == "sdpa"
    finally:
        qwen.set_decoding("dynamic", "off")
    assert cfg._attn_implementation == "sdpa"


def test_decode_step_capture_is_one_copy_per_layer(toy):
    """A capture decode step copies each layer's last position into one staging buffer and adds all layers at
    once (CUDA-graph nodes per step ~ layers, not ~7 ops per layer), with the same statistics bit for bit as
    the per-layer path (kept for split models)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from emotion_neurons import SPANS

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    class PerLayer(StatsRecorder):
        def _buffers(self, layer, g):
            super()._buffers(layer, g)
            self._stage = None

    sites = toy.resolve_sites("thinker", "gate")
    out = {}
    for name, cls in (("staged", StatsRecorder), ("per_layer", PerLayer)):
        tracker = SpanTracker(toy.stop_token_ids)
        rec = cls(sites, tracker, sum_squares=True)
        record, Count.n = rec._record, 0

        def counted(layer, g, _record=record, _tracker=tracker):
            if not _tracker.decoding:
                return _record(layer, g)
            with Count():
                return _record(layer, g)

        rec._record = counted
        with tracker.attached(toy.decoder_root("thinker")), rec.attached():
            prepared = toy.prepare(*TOY_BATCH)
            codes = prepared.span_codes.clone()
            codes[:, -1] = SPANS.index("generated")  # a prefill position coded generated, as the talker's has
            tracker.start(codes)
            rec.reset(2)
            with torch.inference_mode():
                toy.generate(prepared, SETTINGS)
            out[name] = (rec.result(), Count.n / (tracker.calls - 1))
    (staged, ops), (ref, ops_ref) = out["staged"], out["per_layer"]
    for key in ("tokens", "pos_count", "act_sum", "act_sqsum"):
        np.testing.assert_array_equal(staged[key], ref[key], err_msg=key)
    assert staged["tokens"][:, 2].min() > 0
    assert ops <= 3 * len(sites) + 20 < ops_ref, (ops, ops_ref)
