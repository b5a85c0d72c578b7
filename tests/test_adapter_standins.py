"""MiniCPM-o 4.5 and Kimi-Audio adapters on structural stand-ins (tests/standins): the real models need
their own environments (envs/models-minicpm.yaml, envs/models-kimi.yaml) and a GPU, so these tests check
paths, call patterns, span tracking and interventions on tiny modules that mimic the public code."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
import torch
from standins.kimi_audio import StandInKimiAudio
from standins.minicpm_o import StandInMiniCPMO, num_audio_tokens

from emotion_neurons import SPANS
from emotion_neurons.hooks import Intervention, InterventionSpec, SpanTracker, StatsRecorder
from emotion_neurons.models import get_adapter
from emotion_neurons.models.kimi_audio import KimiAudioAdapter
from emotion_neurons.models.minicpm_o import STREAM_CHUNK_SAMPLES, MiniCPMOAdapter
from emotion_neurons.types import GenerationSettings, Instance

SR = 16000
AUDIO, TEXT, GEN = (SPANS.index(s) for s in ("audio", "text", "generated"))
SER = GenerationSettings(max_new_tokens=6, extra={"repetition_penalty": 1.0})
EVC = GenerationSettings(max_new_tokens=10, want_audio=True, seed=3)


def _audio(seconds: float, freq: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


def _inst(i: int, task: str, prompt: str = "Which emotion? 1. happy 2. sad") -> Instance:
    return Instance(
        id=f"u{i}",
        task=task,
        wav="",
        speaker="s",
        emotion="neutral",
        split="ident",
        prompt=prompt,
        target="angry" if task == "evc" else "",
    )


SER_BATCH = ([_inst(0, "ser"), _inst(1, "ser", "Emotion?")], [_audio(1.0, 220, 0), _audio(2.5, 440, 1)])
EVC_ONE = ([_inst(2, "evc", "Repeat the audio. Speak with angry emotion.")], [_audio(2.3, 330, 2)])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight parallel test runs for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minicpm() -> MiniCPMOAdapter:
    model = StandInMiniCPMO()
    model.init_tts(streaming=True)
    return MiniCPMOAdapter.from_model(model)


@pytest.fixture(scope="module")
def kimi() -> KimiAudioAdapter:
    return KimiAudioAdapter.from_model(StandInKimiAudio(both_budget=16))


def run(adapter, component, batch, settings, spec=None, masks=None, site="gate"):
    """Capture (and optionally intervene) exactly as emotion_neurons.stages.generate.run does."""
    instances, audios = batch
    sites = adapter.resolve_sites(component, site)
    tracker = SpanTracker(adapter.stop_token_ids)
    rec = StatsRecorder(sites, tracker, sum_squares=True)
    iv = Intervention(sites, tracker, spec or InterventionSpec("none"))
    prepared = adapter.prepare(instances, audios)
    with tracker.attached(adapter.decoder_root(component)), iv.attached(), rec.attached():
        tracker.start(prepared.span_codes)
        rec.reset(len(instances))
        if masks is not None:
            iv.set_masks(masks)
        with torch.inference_mode():
            outs = adapter.generate(prepared, settings)
    return rec.result(), outs, prepared


def count_positions(module: torch.nn.Module):
    """Context manager counting every position that reaches `module` (input_ids or inputs_embeds)."""
    seen = []

    def hook(mod, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        seen.append(int(x.shape[1]))

    class _Ctx:
        def __enter__(self):
            self.h = module.register_forward_pre_hook(hook, with_kwargs=True)
            return seen

        def __exit__(self, *exc):
            self.h.remove()

    return _Ctx()


def _masks(adapter, component, batch, frac=0.3, seed=0):
    n_layers = len(adapter.resolve_sites(component, "gate"))
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, n_layers, adapter.n_neurons(component)), generator=g) < frac


# -- structure --------------------------------------------------------------------------------------------------
def test_registry():
    assert isinstance(get_adapter("minicpm_o"), MiniCPMOAdapter)
    assert isinstance(get_adapter("kimi_audio"), KimiAudioAdapter)


@pytest.mark.parametrize(
    "which,component,pattern,n_layers,n_neurons",
    [
        ("minicpm", "thinker", r"llm\.model\.layers\.(\d+)\.mlp", 3, 48),
        ("minicpm", "tts", r"tts\.model\.layers\.(\d+)\.mlp", 2, 24),
        ("kimi", "thinker", r"model\.layers\.(\d+)\.mlp", 4, 48),
        ("kimi", "mimo", r"model\.mimo_layers\.(\d+)\.mlp", 2, 48),
    ],
)
def test_resolve_sites(request, which, component, pattern, n_layers, n_neurons):
    adapter = request.getfixturevalue(which)
    expected = {
        "gate": ("act_fn", "forward"),
        "pre_act": ("gate_proj", "forward"),
        "gated_product": ("down_proj", "pre"),
    }
    for site, (sub, kind) in expected.items():
        sites = adapter.resolve_sites(component, site)
        assert [s.layer for s in sites] == list(range(n_layers))
        for s in sites:
            assert re.fullmatch(pattern + r"\." + sub, s.name), s.name
            assert s.kind == kind
    assert adapter.n_neurons(component) == n_neurons


# -- MiniCPM-o ----------------------------------------------------------------------------------------------------
def test_minicpm_ser_batch(minicpm):
    stats, outs, prepared = run(minicpm, "thinker", SER_BATCH, SER)
    assert all(isinstance(o.text, str) and o.wav is None for o in outs)
    mask = prepared.inputs["model_inputs"]["attention_mask"].bool()
    expected_audio = [num_audio_tokens(len(a)) for a in SER_BATCH[1]]
    assert stats["tokens"][:, AUDIO].tolist() == expected_audio
    assert stats["tokens"][:, TEXT].tolist() == (mask.sum(-1) - torch.tensor(expected_audio)).tolist()
    # greedy decoding without a stop token: the last generated token is never fed back
    assert stats["tokens"][:, GEN].tolist() == [min(o.n_generated, SER.max_new_tokens - 1) for o in outs]
    assert (prepared.span_codes[~mask] == -1).all()


def test_minicpm_evc_streaming(minicpm):
    model = minicpm.model
    with count_positions(model.llm) as seen:
        stats, outs, prepared = run(minicpm, "thinker", EVC_ONE, EVC)
    out = outs[0]
    assert isinstance(out.text, str) and out.text
    assert out.sample_rate == 24000 and out.wav.dtype == np.float32 and out.wav.ndim == 1 and out.wav.size > 0
    assert prepared.span_codes.shape == (1, 0)  # streaming: codes come per LLM call through the relay
    n_chunks = -(-len(EVC_ONE[1][0]) // STREAM_CHUNK_SAMPLES)
    assert stats["tokens"][0, AUDIO] == n_chunks * num_audio_tokens(STREAM_CHUNK_SAMPLES)
    assert stats["tokens"][0].sum() == sum(seen)  # every position of every LLM call is labelled once
    assert (
        stats["tokens"][0, GEN]
        == sum(1 for n in seen if n == 1)
        == min(out.n_generated, EVC.max_new_tokens - 1)
    )
    # the streaming prefill spreads the prompt over several calls: system, audio chunks, instruction, bos
    assert sum(1 for n in seen if n > 1) == 1 + n_chunks + 1 + 1


def test_minicpm_tts_component(minicpm):
    with count_positions(minicpm.model.tts.model) as seen:
        stats, outs, _ = run(minicpm, "tts", EVC_ONE, EVC)
    assert stats["tokens"][0, AUDIO] == 0
    assert stats["tokens"][0].sum() == sum(seen)
    assert stats["tokens"][0, GEN] == sum(1 for n in seen if n == 1) > 0
    assert outs[0].wav.size == 480 * stats["tokens"][0, GEN]  # stand-in vocoder: 480 samples per fed code


@pytest.mark.parametrize(
    "which,component,batch,settings",
    [
        ("minicpm", "thinker", SER_BATCH, SER),
        ("minicpm", "thinker", EVC_ONE, EVC),
        ("minicpm", "tts", EVC_ONE, EVC),
        ("kimi", "thinker", ([_inst(0, "ser")], [_audio(1.5, 220, 0)]), SER),
        ("kimi", "mimo", ([_inst(1, "evc")], [_audio(1.2, 330, 1)]), EVC),
    ],
)
def test_alpha_zero_steer_is_identity(request, which, component, batch, settings):
    adapter = request.getfixturevalue(which)
    masks = _masks(adapter, component, len(batch[0]))
    base, base_outs, _ = run(adapter, component, batch, settings)
    stats, outs, _ = run(adapter, component, batch, settings, InterventionSpec("steer", 0.0), masks)
    assert [o.text for o in outs] == [o.text for o in base_outs]
    for o, b in zip(outs, base_outs, strict=True):
        assert (o.wav is None) == (b.wav is None)
        if o.wav is not None:
            np.testing.assert_array_equal(o.wav, b.wav)
    np.testing.assert_array_equal(stats["tokens"], base["tokens"])
    np.testing.assert_array_equal(stats["act_sum"], base["act_sum"])


@pytest.mark.parametrize("which,component", [("minicpm", "thinker"), ("minicpm", "tts"), ("kimi", "mimo")])
def test_deactivate_generated_only_keeps_prompt(request, which, component):
    adapter = request.getfixturevalue(which)
    batch = EVC_ONE if which == "minicpm" else ([_inst(1, "evc")], [_audio(1.2, 330, 1)])
    masks = _masks(adapter, component, 1)
    base, _, _ = run(adapter, component, batch, EVC)
    stats, _, _ = run(
        adapter, component, batch, EVC, InterventionSpec("deactivate", positions="generated"), masks
    )
    for span in (AUDIO, TEXT):  # prompt positions are untouched (same seed, same prompt)
        np.testing.assert_allclose(stats["act_sum"][:, span], base["act_sum"][:, span], rtol=1e-5, atol=1e-6)
    m = masks.numpy()
    assert stats["tokens"][0, GEN] > 0
    assert np.all(stats["pos_count"][:, GEN][m] == 0) and np.all(stats["act_sum"][:, GEN][m] == 0)


def test_minicpm_hooks_removed(minicpm):
    model = minicpm.model
    run(minicpm, "thinker", EVC_ONE, EVC)
    run(minicpm, "tts", EVC_ONE, EVC)
    run(minicpm, "thinker", SER_BATCH, SER)
    touched = [
        model.llm,
        model.llm.get_input_embeddings(),
        model.tts.model,
        model.tts.emb_code[0],
        *minicpm.relays.values(),
    ]
    touched += [
        s.module
        for c in ("thinker", "tts")
        for site in ("gate", "gated_product")
        for s in minicpm.resolve_sites(c, site)
    ]
    for m in touched:
        assert not m._forward_hooks and not m._forward_pre_hooks, m


def test_minicpm_prepare_checks(minicpm):
    with pytest.raises(ValueError, match="batch size must be 1"):
        minicpm.prepare([_inst(0, "evc"), _inst(1, "evc")], [_audio(1, 200, 0)] * 2)
    with pytest.raises(ValueError, match="one task per batch"):
        minicpm.prepare([_inst(0, "evc"), _inst(1, "ser")], [_audio(1, 200, 0)] * 2)
    with pytest.raises(ValueError, match="speech output needs EVC"):
        minicpm.generate(minicpm.prepare(SER_BATCH[0][:1], SER_BATCH[1][:1]), EVC)
    with pytest.raises(KeyError, match="component"):
        minicpm.decoder_root("talker")


def test_minicpm_voice_prompt_reused(minicpm):
    vocoder = minicpm.model.tts.audio_tokenizer
    before = len(vocoder.prompts)
    run(minicpm, "thinker", EVC_ONE, EVC)
    run(minicpm, "thinker", EVC_ONE, EVC)  # same source clip: vocoder cache kept
    assert len(vocoder.prompts) - before <= 1


# -- Kimi-Audio ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["ser", "evc"])
def test_kimi_capture(kimi, task):
    audio = _audio(1.7, 250, 4)
    settings = SER if task == "ser" else EVC
    with count_positions(kimi.model.model) as seen:
        stats, outs, prepared = run(kimi, "thinker", ([_inst(0, task)], [audio]), settings)
    out = outs[0]
    assert isinstance(out.text, str)
    n_speech = -(-audio.size // 1280)  # 12.5 Hz speech tokens
    assert stats["tokens"][0, AUDIO] == n_speech == int((prepared.span_codes == AUDIO).sum())
    assert stats["tokens"][0, TEXT] == prepared.inputs["prompt_len"] - n_speech
    assert seen[0] == prepared.inputs["prompt_len"] and all(n == 1 for n in seen[1:])
    assert stats["tokens"][0, GEN] == len(seen) - 1 == out.n_generated
    if task == "evc":
        assert out.sample_rate == 24000 and out.wav.ndim == 1 and out.wav.dtype == np.float32
    else:
        assert out.wav is None and out.n_generated <= settings.max_new_tokens - 1
    assert not any(os.path.exists(f) for f in prepared.inputs["files"])


def test_kimi_prepare_checks(kimi):
    with pytest.raises(ValueError, match="one instance at a time"):
        kimi.prepare([_inst(0, "ser"), _inst(1, "ser")], [_audio(1, 200, 0)] * 2)
    with pytest.raises(ValueError, match="speech output needs EVC"):
        kimi.generate(kimi.prepare([_inst(0, "ser")], [_audio(1, 200, 0)]), EVC)


# -- loading without the real packages ------------------------------------------------------------------------------
def test_minicpm_load_names_env_file(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.23.0")
    with pytest.raises(ImportError, match=re.escape("envs/models-minicpm.yaml")):
        MiniCPMOAdapter().load("openbmb/MiniCPM-o-4_5")


def test_kimi_load_names_env_file(monkeypatch):
    for name in ("kimia_infer", "kimia_infer.api", "kimia_infer.api.kimia"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(ImportError, match=re.escape("envs/models-kimi.yaml")):
        KimiAudioAdapter().load("moonshotai/Kimi-Audio-7B-Instruct")
