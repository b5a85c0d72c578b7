"""Adapter for Qwen2.5-Omni (`Qwen/Qwen2.5-Omni-7B`): audio in, text and 24 kHz speech out."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..types import GenerationOutput, GenerationSettings, Instance
from .base import ModelAdapter, Prepared, pretrained_kwargs, resolve_model_source, revision_kwargs

#: System prompt of the model card; Qwen states speech output only works with exactly this system prompt.
QWEN_OMNI_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech."
)

#: The processor chat template of Qwen/Qwen2.5-Omni-7B (chat_template.json; the same string is in
#: transformers' tests/models/qwen2_5_omni/test_processing_qwen2_5_omni.py). Rendered with the tokenizer's
#: jinja engine so prompts match `Qwen2_5OmniProcessor.apply_chat_template` token for token.
QWEN_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

AUDIO_TOKEN = "<|AUDIO|>"
OUTPUT_SAMPLE_RATE = 24000
DEFAULT_SPEAKER = "Chelsie"
#: `Qwen2_5OmniForConditionalGeneration.generate`'s default talker budget
TALKER_MAX_NEW_TOKENS = 4096
#: thinker KV cache kinds (`model.cache_implementation`) and decode-step compilation (`model.compile`)
CACHE_IMPLEMENTATIONS = ("dynamic", "static")
#: `model.static_cache_bucket` default: prompts of ~5 s clips (~250 tokens) and 32 new tokens fit 512 positions;
#: the decode step's attention over a 1024-position cache cost ~1.2 ms per step at bs 1 on an H200
STATIC_CACHE_BUCKET = 256
COMPILE_MODES = ("off", "cudagraphs", "inductor")


def _compile_config(mode: Any) -> Any:
    """`transformers.CompileConfig` of a `model.compile` / `model.talker_compile` name (a config passes through)."""
    if not isinstance(mode, str):
        return mode
    from transformers import CompileConfig

    if mode == "cudagraphs":
        from ..cudagraphs import register

        return CompileConfig(fullgraph=False, dynamic=False, backend=register(), mode=None)
    return CompileConfig(fullgraph=False, dynamic=False, backend="inductor", mode="reduce-overhead")


@functools.cache
def talker_cache_class() -> type:
    """A `StaticCache` that `generate` does not treat as compileable (so it neither compiles the talker's whole
    forward nor turns its 2D mask into a 4D one: the talker's prefill counts each row's left padding in the 2D
    mask for its rope positions). `TalkerDecodeStep` compiles the decode step itself."""
    from transformers import StaticCache

    class TalkerStaticCache(StaticCache):
        is_compileable = False  # type: ignore[assignment]  # shadows Cache.is_compileable (a property)

    return TalkerStaticCache


#: talker forward kwargs a decode step may get from `generate` that upstream reads only at prefill
_TALKER_PREFILL_ONLY = frozenset(
    {"input_text_ids", "image_grid_thw", "video_grid_thw", "use_audio_in_video", "audio_feature_lengths",
     "video_second_per_grid", "return_dict", "output_attentions", "output_hidden_states"}
)  # fmt: skip


class TalkerDecodeStep:
    """The talker's decode step with fixed shapes, compiled (`model.talker_compile`), installed as its `forward`.

    Why a wrapper: upstream's talker forward drops the first row of `thinker_reply_part` every decode step, so
    a compiled forward sees a new input shape per step (one compilation each), and it grows the 2D mask by one
    position per step. Here the shrinking part and the rope positions stay in eager code exactly as upstream
    computes them (`Qwen2_5OmniTalkerForConditionalGeneration.forward`, decode branch), and the compiled step
    gets only fixed shapes: this step's codec ids [B, 1], its reply row [B, 1, H], positions [3, B, 1], the mask
    padded with zeros to the static cache's length (as transformers pads it, `prepare_padding_mask`) and the
    static cache (which tracks its own write position). The prefill, and any call that is not a plain decode step, runs upstream's forward unchanged.
    """

    def __init__(self, talker: torch.nn.Module, compile_config: Any) -> None:
        self.talker = talker
        self.upstream = type(talker).forward.__get__(talker)
        self.__signature__ = inspect.signature(self.upstream)  # generate validates its kwargs against forward's
        self.compiled = torch.compile(self._step, **compile_config.to_dict())
        self.steps = 0  # compiled decode steps run (tests / benchmark)

    def _step(
        self, input_ids: torch.Tensor, reply_row: torch.Tensor, position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None, past_key_values: Any,
    ) -> torch.Tensor:  # fmt: skip
        t = self.talker
        inputs_embeds = t.get_input_embeddings()(input_ids) + reply_row
        out = t.model(
            attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
            inputs_embeds=t.thinker_to_talker_proj(inputs_embeds), use_cache=True, return_dict=True,
        )  # fmt: skip
        return t.codec_head(out[0]).float()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from transformers import StaticCache
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
            Qwen2_5OmniTalkerCausalLMOutputWithPast,
        )

        t = self.talker
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        cache, reply = kwargs.get("past_key_values"), kwargs.get("thinker_reply_part")
        known = {"input_ids", "attention_mask", "past_key_values", "thinker_reply_part", "inputs_embeds",
                 "position_ids", "use_cache"}  # fmt: skip
        decode = (
            not args and kwargs.get("inputs_embeds") is None and kwargs.get("position_ids") is None
            and isinstance(cache, StaticCache) and input_ids is not None and input_ids.shape[1] == 1
            and (mask is None or (mask.ndim == 2 and t.rope_deltas is not None)) and reply is not None
            and kwargs.get("use_cache", True) is not False
            and not kwargs.get("output_attentions") and not kwargs.get("output_hidden_states")
            and all(k in known or k in _TALKER_PREFILL_ONLY for k in kwargs)
        )  # fmt: skip
        if not decode:
            return self.upstream(*args, **kwargs)
        batch, seq = input_ids.shape
        position_ids = padded = None  # no mask (one row, no padding): upstream lets the model count positions
        if mask is not None:  # upstream's decode branch: positions continue after the prefill's rope deltas
            delta = (cache.get_seq_length() + t.rope_deltas).to(input_ids.device)
            position_ids = torch.arange(seq, device=input_ids.device).view(1, -1).expand(batch, -1).add(delta)
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        reply_row = reply[:, :1, :].contiguous()  # fixed strides (the reply part shrinks every step)
        if reply.shape[1] > 1:
            reply = reply[:, 1:, :]
        length = int(cache.layers[0].max_cache_len)
        if mask is not None:
            if mask.shape[1] > length:
                raise ValueError(f"talker static cache holds {length} positions; the mask has {mask.shape[1]}")
            padded = torch.nn.functional.pad(mask.to(reply.device), (0, length - mask.shape[1]))
        logits = self.compiled(input_ids, reply_row, position_ids, padded, cache)
        self.steps += 1
        # a CUDA-graph replay overwrites its outputs at the next replay: hand out a copy
        return Qwen2_5OmniTalkerCausalLMOutputWithPast(
            logits=logits.clone(), past_key_values=cache, thinker_reply_part=reply
        )


def set_packed_attention(text_config: Any, packed: bool) -> None:
    """Compiled decode steps attend on the key/value heads, as eager ones do (`cudagraphs.packed_gqa_sdpa`):
    transformers' own SDPA copies the cache per query head under `torch.compile`."""
    from ..cudagraphs import ATTENTION_NAME, register_attention

    current = text_config._attn_implementation
    if packed and current == "sdpa":
        text_config._attn_implementation_internal = register_attention()
    elif not packed and current == ATTENTION_NAME:
        text_config._attn_implementation_internal = "sdpa"


def instance_seed(seed: int, instance_id: str) -> int:
    """Per-instance seed from the config seed and the instance id (sha256; independent of batch and order)."""
    digest = hashlib.sha256(f"{int(seed)}:{instance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def talker_sampling(generate: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The talker's temperature / top-k / top-p: `talker_*` extras, else the defaults of upstream `generate`."""
    params = inspect.signature(generate).parameters
    return {k: extra.get(f"talker_{k}", params[f"talker_{k}"].default) for k in ("temperature", "top_k", "top_p")}


class RowSampler:
    """Sample each row from its own seeded generator, then leave only the drawn token (greedy keeps it).

    The same warpers and draw as transformers' sampling (temperature, top-k, top-p, softmax, multinomial),
    applied after every other processor (repetition penalty, suppressed and minimum-length tokens).
    """

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers: list[Any] = []
        if temperature is not None and float(temperature) != 1.0:
            self.warpers.append(TemperatureLogitsWarper(float(temperature)))
        if top_k:
            self.warpers.append(TopKLogitsWarper(int(top_k)))
        if top_p is not None and float(top_p) < 1.0:
            self.warpers.append(TopPLogitsWarper(float(top_p)))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            if len(self.seeds) != scores.shape[0]:
                raise RuntimeError(f"RowSampler has {len(self.seeds)} seeds for a batch of {scores.shape[0]}")
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        for w in self.warpers:
            scores = w(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        drawn = torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(self.generators)])
        out = torch.full_like(scores, -float("inf"))
        out[torch.arange(scores.shape[0], device=scores.device), drawn] = 0.0
        return out


@contextlib.contextmanager
def deferred_calls(module: torch.nn.Module) -> Iterator[list[tuple[tuple, dict]]]:
    """Record every call of `module` instead of running it (each returns an empty tensor); restored after.

    Upstream `generate` runs token2wav row by row at the end; deferring the calls lets `token2wav_batched`
    run them together afterwards, with upstream's arguments.
    """
    calls: list[tuple[tuple, dict]] = []
    had_own, previous = "forward" in vars(module), vars(module).get("forward")

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((args, kwargs))
        return torch.zeros(0)

    module.forward = forward
    try:
        yield calls
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


def dit_sample(
    dit: Any,
    conditioning: torch.Tensor,
    reference_mel: torch.Tensor,
    code: torch.Tensor,
    initial_state: torch.Tensor,
    num_steps: int = 10,
    guidance_scale: float = 0.5,
    sway_coefficient: float | None = -1.0,
) -> torch.Tensor:
    """`Qwen2_5OmniToken2WavDiTModel.sample` (transformers 5.23) with the initial noise given, so each row of
    a batch starts from the noise its own seed draws. Same ODE, same calls of the DiT."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

    duration = code.shape[1] * dit.repeats
    if duration > dit.config.max_position_embeddings:
        raise ValueError(
            f"Requested mel length ({duration}) exceeds `dit_config.max_position_embeddings` "
            f"({dit.config.max_position_embeddings}). Provide shorter `quantized_code`."
        )
    cond = conditioning.unsqueeze(1).repeat(1, duration, 1)

    def ode_function(time_step: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if guidance_scale < 1e-5:
            return dit(
                hidden_states=hidden_states, speaker_embedding=cond, condition_vector=reference_mel,
                quantized_code=code, time_step=time_step, drop_audio_conditioning=False, drop_code=False,
                apply_cfg=False,
            )  # fmt: skip
        out = dit(
            hidden_states=hidden_states, quantized_code=code, speaker_embedding=cond,
            condition_vector=reference_mel, time_step=time_step, apply_cfg=True,
        )  # fmt: skip
        guided, null = torch.chunk(out, 2, dim=0)
        return guided + (guided - null) * guidance_scale

    t = torch.linspace(0, 1, num_steps, device=code.device, dtype=cond.dtype)
    if sway_coefficient is not None:
        t += sway_coefficient * (torch.cos(torch.pi / 2 * t) - 1 + t)
    trajectory = RungeKutta4ODESolver(function=ode_function, initial_value=initial_state).integrate(t)
    return trajectory[-1].permute(0, 2, 1)


DIT_SAMPLE_KWARGS = ("num_steps", "guidance_scale", "sway_coefficient")


def token2wav_batched(
    token2wav: Any, calls: list[tuple[tuple, dict]], seeds: list[int], max_batch: int
) -> list[torch.Tensor]:
    """Run the recorded per-row token2wav calls in batches of up to `max_batch` rows of equal code length.

    Row k's initial noise is drawn right after `torch.manual_seed(seeds[k])`, as the per-row path draws it
    (`seeded_calls`), so a row's speech does not depend on its batch beyond float32 rounding of batched
    kernels. Returns one waveform per call, in call order.
    """
    if len(calls) != len(seeds):
        raise RuntimeError(f"token2wav was called {len(calls)} times for a batch of {len(seeds)} rows")
    rows = []
    for args, kwargs in calls:
        kw = dict(kwargs)
        code = args[0] if args else kw.pop("code")
        cond = kw.pop("conditioning")
        ref = kw.pop("reference_mel")
        # upstream's forward takes these three and swallows the rest (shared generate kwargs) in **kwargs
        rows.append((code, cond, ref, {k: v for k, v in kw.items() if k in DIT_SAMPLE_KWARGS}))
    groups: dict[tuple, list[int]] = {}
    for i, (code, _, _, kw) in enumerate(rows):
        groups.setdefault((int(code.shape[-1]), tuple(sorted(kw.items()))), []).append(i)
    dit, vocoder = token2wav.code2wav_dit_model, token2wav.code2wav_bigvgan_model
    out: list[torch.Tensor | None] = [None] * len(rows)
    with torch.no_grad():
        for (length, kw_items), members in groups.items():
            for start in range(0, len(members), max(1, int(max_batch))):
                chunk = members[start : start + max(1, int(max_batch))]
                code = torch.cat([rows[i][0] for i in chunk])
                cond = torch.cat([rows[i][1] for i in chunk])
                ref = torch.cat([rows[i][2] for i in chunk])
                noise = []
                for i in chunk:
                    torch.manual_seed(seeds[i])
                    noise.append(torch.randn([1, length * dit.repeats, dit.mel_dim], dtype=ref.dtype, device=code.device))
                mel = dit_sample(dit, cond, ref, code, torch.cat(noise), **dict(kw_items))
                wav = vocoder(mel).reshape(len(chunk), -1)
                for j, i in enumerate(chunk):
                    out[i] = wav[j].float()
    return out  # type: ignore[return-value]


@contextlib.contextmanager
def seeded_calls(module: torch.nn.Module, seeds: list[int]) -> Iterator[None]:
    """Reseed the global RNG before the k-th call of `module` with `seeds[k]` (token2wav runs row by row)."""
    calls = iter(seeds)

    def pre_hook(mod: torch.nn.Module, args: tuple) -> None:
        seed = next(calls, None)
        if seed is None:
            raise RuntimeError(f"{type(mod).__name__} called more often than the batch has rows")
        torch.manual_seed(seed)

    handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def num_audio_tokens(feature_lengths: torch.Tensor) -> torch.Tensor:
    """Audio placeholder count per clip from its mel-frame count (processing_qwen2_5_omni.py
    `_get_feat_extract_output_lengths`: conv stride 2, then 2x average pooling)."""
    lengths = (feature_lengths - 1) // 2 + 1
    return (lengths - 2) // 2 + 1


class QwenOmniAdapter(ModelAdapter):
    """Qwen2.5-Omni through `transformers.Qwen2_5OmniForConditionalGeneration` (transformers >= 5).

    Where each choice comes from:
    - Inputs replicate `Qwen2_5OmniProcessor` (transformers `processing_qwen2_5_omni.py`), which cannot be
      used here because its video processor needs torchvision: `WhisperFeatureExtractor` at 16 kHz with
      `padding="max_length"` (30 s) and `return_attention_mask=True`, renamed to `feature_attention_mask`;
      `<|AUDIO|>` expanded to `((L - 1) // 2 + 1 - 2) // 2 + 1` copies for L valid mel frames; text padded on
      the left (`text_kwargs = {"padding_side": "left"}`).
    - Prompt: the processor's chat template (`QWEN_OMNI_CHAT_TEMPLATE`) with the model card's system prompt
      (`QWEN_OMNI_SYSTEM_PROMPT`, required for speech output); the user turn holds the audio, then the text.
    - Generation (`modeling_qwen2_5_omni.py`, `Qwen2_5OmniForConditionalGeneration.generate`): text only via
      `generation_mode="text"` (5.x rejects `return_audio`); speech by default, speaker from `spk_dict.pt`
      (`load_speakers`, default "Chelsie"), talker EOS ids = codec pad/end ids of the talker config
      (upstream hard-codes the 7B values 8292/8294 as defaults), waveform at 24 kHz. Knobs come from
      `settings.extra`: `talker_do_sample` (default True) and any `thinker_*` / `talker_*` / `token2wav_*`
      key pass through. Talker sampling and token2wav noise are seeded per instance (`instance_seed` of
      `settings.seed` and the instance id; `RowSampler`, `seeded_calls`), so the speech of an instance does not
      depend on its batch. The talker budget is capped by `dit_config.max_position_embeddings // repeats` (the
      most codes token2wav accepts) and `talker_min_new_tokens` defaults to 1, because a first-step codec
      EOS makes token2wav fail on zero codes.
    - Loading: the class's `from_pretrained` requires `spk_dict.pt`; without one the checkpoint loads through
      `PreTrainedModel.from_pretrained` and only text output is possible.
    - Hooks: `decoder_root("thinker")` is the thinker (`Qwen2_5OmniThinkerForConditionalGeneration`): its
      forward receives `input_ids` [B, T_prompt] at prefill and [B, 1] per decode step; the inner
      language model only receives `inputs_embeds`. The talker's prefill gets `input_ids=None` and
      `inputs_embeds` [B, T_prompt + 2, D] and each decode step `input_ids` [B, 1] (codec ids); see
      `prefill_span_codes` and `component_stop_token_ids`.
    """

    name = "qwen2_5_omni"
    tasks = ("evc", "ser")
    env = "models-tf5"
    input_sample_rate = 16000
    output_sample_rate = OUTPUT_SAMPLE_RATE
    components = {
        # runtime paths: transformers 5.23 thinker.model.language_model.layers.{i}.mlp; 5.17 and 4.x (and the
        # checkpoint keys) thinker.model.layers.{i}.mlp; the talker is talker.model.layers.{i}.mlp in all
        "thinker": r"^thinker\.(?:model\.)?(?:language_model\.)?layers\.(\d+)\.mlp$",
        "talker": r"^talker\.(?:model\.)?(?:language_model\.)?layers\.(\d+)\.mlp$",
    }
    supports_batching = True
    max_audio_seconds = 30  # WhisperFeatureExtractor n_samples (padding="max_length" cuts the rest)
    system_prompt = QWEN_OMNI_SYSTEM_PROMPT
    chat_template = QWEN_OMNI_CHAT_TEMPLATE

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer: Any = None
        self.feature_extractor: Any = None
        self.audio_token_id: int = -1
        self._stop_ids: list[int] = []
        self._pad_id: int | None = None
        self.model_id: str = ""
        self.cache_implementation = "dynamic"
        self.compile: Any = "off"
        self._caches: dict[int, tuple[int, Any]] = {}  # batch size -> (max length, StaticCache), reused
        self.static_cache_bucket = STATIC_CACHE_BUCKET
        self.token2wav_batch_size = 1
        self.talker_compile: Any = "off"
        self._talker_caches: dict[int, tuple[int, Any]] = {}  # as `_caches`, for the talker
        self._talker_step: TalkerDecodeStep | None = None

    def set_speech(self, token2wav_batch_size: int = 1, talker_compile: Any = "off") -> None:
        """Speech fast path. `model.token2wav_batch_size`: token2wav for up to that many rows of equal code
        length in one call (upstream: one call per row, ~0.9 s each on an H200, launch-bound float32 DiT).
        `model.talker_compile` (off | cudagraphs | inductor, or a `transformers.CompileConfig` in tests): the
        talker decodes on its own static cache with its decode step compiled (`TalkerDecodeStep`; upstream: a
        dynamic cache, eager, ~17 ms per codec token on an H200); `cudagraphs` = the eager kernels replayed."""
        if int(token2wav_batch_size) < 1:
            raise ValueError(f"model.token2wav_batch_size must be >= 1; got {token2wav_batch_size!r}")
        if isinstance(talker_compile, str) and talker_compile not in COMPILE_MODES:
            raise ValueError(f"model.talker_compile {talker_compile!r} unknown; expected one of {COMPILE_MODES}")
        self.token2wav_batch_size = int(token2wav_batch_size)
        if talker_compile != self.talker_compile:
            self._talker_step = None
        self.talker_compile = talker_compile

    def set_decoding(
        self, cache_implementation: str = "dynamic", compile: Any = "off", static_cache_bucket: int | None = None
    ) -> None:
        """Thinker decoding fast path (`model.cache_implementation`, `model.compile`).

        `static` pre-allocates the KV cache (transformers `StaticCache`), which makes the decode step shape-stable;
        `compile` then compiles it: `cudagraphs` replays the eager kernels as one CUDA graph per step (same
        arithmetic as eager, seconds to capture; our backend, `emotion_neurons.cudagraphs`, because torch's
        keeps the KV-cache writes outside the graph), `inductor` fuses kernels too (mode reduce-overhead, tens
        of seconds to compile, other bf16 rounding). The capture and intervention hooks run inside the compiled step. A
        `transformers.CompileConfig` may be given instead of a name (tests). `static_cache_bucket`
        (`model.static_cache_bucket`): the static cache holds the positions a batch needs rounded up to a multiple
        of it (and grows, never shrinks, per batch size); a decode step attends over the whole cache, so a
        shorter one is faster, and each new length is one more compilation.
        """
        if static_cache_bucket is not None:
            if int(static_cache_bucket) < 16:
                raise ValueError(f"model.static_cache_bucket must be >= 16; got {static_cache_bucket!r}")
            if int(static_cache_bucket) != self.static_cache_bucket:
                self._caches.clear()
                self._talker_caches.clear()
            self.static_cache_bucket = int(static_cache_bucket)
        if cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"model.cache_implementation {cache_implementation!r} unknown; expected one of {CACHE_IMPLEMENTATIONS}"
            )
        if isinstance(compile, str) and compile not in COMPILE_MODES:
            raise ValueError(f"model.compile {compile!r} unknown; expected one of {COMPILE_MODES}")
        if compile != "off" and cache_implementation != "static":
            raise ValueError(
                f"model.compile {compile!r} needs model.cache_implementation: static (a dynamic cache changes shape "
                "every step)"
            )
        self.cache_implementation = cache_implementation
        self.compile = compile
        self._set_attention(packed=compile != "off")

    def _set_attention(self, packed: bool) -> None:
        """Compiled decode steps attend on the key/value heads, as eager ones do (`cudagraphs.packed_gqa_sdpa`):
        transformers' own SDPA copies the cache per query head under `torch.compile`. Eager: identity."""
        if self.model is not None:
            set_packed_attention(self.model.thinker.config.get_text_config(decoder=True), packed)

    def _static_cache(self, batch: int, needed: int, component: str = "thinker") -> Any:
        """One `StaticCache` per batch size (and component), reset and reused while long enough (`needed` rounded
        up to a multiple of `static_cache_bucket`), so the compiled / CUDA-graph decode step sees the same buffers
        batch after batch (no re-capture)."""
        from transformers import StaticCache

        caches = self._talker_caches if component == "talker" else self._caches
        length, cache = caches.get(batch, (0, None))
        if cache is None or length < needed:
            # rounded up: a prompt a little longer than the last must not re-allocate (and recompile)
            bucket = self.static_cache_bucket
            length = max(bucket, -(-needed // bucket) * bucket)
            root = self.decoder_root(component)
            config = root.config.get_text_config(decoder=True)
            cls = talker_cache_class() if component == "talker" else StaticCache
            cache = cls(config=config, max_cache_len=length)
            caches[batch] = (length, cache)
        else:
            cache.reset()
        return cache

    def _decoding_kwargs(self, batch: int = 1, needed: int = 0, speech: bool = False) -> dict[str, Any]:
        """`thinker_*` generate kwargs of the decoding fast path (empty for the default dynamic cache).

        With speech output the thinker's decode step is not compiled: transformers keeps every step's hidden
        states for the talker, and a CUDA graph overwrites its outputs at the next replay.
        """
        if self.cache_implementation == "dynamic":
            return {}
        kw: dict[str, Any] = {"thinker_past_key_values": self._static_cache(batch, needed)}
        if self.compile == "off" or speech:
            kw["thinker_disable_compile"] = True
            return kw
        kw["thinker_compile_config"] = _compile_config(self.compile)
        return kw

    @contextlib.contextmanager
    def _talker_fast_path(self, kw: dict[str, Any], batch: int, needed: int) -> Iterator[None]:
        """`model.talker_compile`: the talker's static cache in `kw`, `TalkerDecodeStep` as its forward while
        generating. Not when something else already wraps the talker's forward (e.g. a span tracker)."""
        talker = self._require().talker
        if self.talker_compile == "off" or "forward" in vars(talker):
            yield
            return
        if self._talker_step is None:
            set_packed_attention(talker.config.get_text_config(decoder=True), True)
            self._talker_step = TalkerDecodeStep(talker, _compile_config(self.talker_compile))
        kw.update(talker_past_key_values=self._static_cache(batch, needed, "talker"), talker_disable_compile=True)
        talker.forward = self._talker_step
        try:
            yield
        finally:
            del talker.forward

    # -- loading -------------------------------------------------------------------------------------------
    def load(
        self, model_id: str, revision: str | None = None, device: str = "auto", dtype: str = "auto"
    ) -> None:
        """Load model, tokenizer, feature extractor and speakers from a hub id or a local directory."""
        from transformers import AutoTokenizer, Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor

        model_id = resolve_model_source(model_id, "Qwen2.5-Omni")
        kwargs, dev = pretrained_kwargs(device, dtype, revision)
        cls = Qwen2_5OmniForConditionalGeneration
        try:
            if os.path.isdir(model_id) and not os.path.isfile(os.path.join(model_id, "spk_dict.pt")):
                model = self._load_without_speakers(cls, model_id, kwargs)
            else:
                try:
                    model = cls.from_pretrained(model_id, **kwargs)  # also loads spk_dict.pt
                except OSError as e:
                    if "spk_dict.pt" not in str(e):
                        raise
                    model = self._load_without_speakers(cls, model_id, kwargs)
            tok_kwargs = revision_kwargs(revision)
            self.tokenizer = AutoTokenizer.from_pretrained(model_id, **tok_kwargs)
            self.feature_extractor = WhisperFeatureExtractor.from_pretrained(model_id, **tok_kwargs)
        except OSError as e:
            raise OSError(f"cannot load Qwen2.5-Omni from {model_id!r} (revision {revision}): {e}") from e

        model.eval()
        if "device_map" not in kwargs:
            model.to(dev)
        self.model = model
        self.model_id = model_id
        self.device = model.thinker.get_input_embeddings().weight.device
        self.tokenizer.padding_side = "left"

        self.audio_token_id = int(self.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
        expected = int(model.config.thinker_config.audio_token_index)
        if self.audio_token_id != expected:
            raise ValueError(
                f"{model_id}: tokenizer maps {AUDIO_TOKEN} to {self.audio_token_id}, model expects {expected}"
            )
        vocab = self.tokenizer.get_vocab()
        self._stop_ids = [int(vocab[t]) for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]
        if not self._stop_ids:
            raise ValueError(f"{model_id}: tokenizer has neither <|im_end|> nor <|endoftext|>")
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else self._stop_ids[-1]

    @staticmethod
    def _load_without_speakers(cls: Any, model_id: str, kwargs: dict[str, Any]) -> Any:
        """The class's own from_pretrained insists on spk_dict.pt; PreTrainedModel's does not."""
        warnings.warn(
            f"{model_id}: no spk_dict.pt, loading without speakers (text output only)", stacklevel=3
        )
        return super(cls, cls).from_pretrained(model_id, **kwargs)

    def _require(self) -> Any:
        if self.model is None or self.tokenizer is None:
            raise RuntimeError("QwenOmniAdapter: call load() first")
        return self.model

    # -- inputs --------------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str, n_audio_tokens: int) -> str:
        """Chat text of one instance, `<|AUDIO|>` already expanded (as the processor does)."""
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]},
        ]
        text = self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        if text.count(AUDIO_TOKEN) != 1:
            raise RuntimeError(
                f"rendered prompt has {text.count(AUDIO_TOKEN)} {AUDIO_TOKEN} tokens, expected 1"
            )
        return text.replace(AUDIO_TOKEN, AUDIO_TOKEN * int(n_audio_tokens))

    def prepare(self, instances: list[Instance], audios: list[np.ndarray]) -> Prepared:
        """Left-padded batch: token ids, mel features (30 s, masked) and the span code of every position."""
        self._require()
        self.check_batch(instances, audios)
        waves = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
        feats = self.feature_extractor(
            waves,
            sampling_rate=self.input_sample_rate,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        feature_mask = feats["attention_mask"]
        n_audio = num_audio_tokens(feature_mask.sum(-1))
        texts = [
            self.render_prompt(inst.prompt, int(n))
            for inst, n in zip(instances, n_audio.tolist(), strict=True)
        ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        input_ids = enc["input_ids"]
        attention_mask = enc["attention_mask"]
        got = (input_ids == self.audio_token_id).sum(-1)
        if not torch.equal(got, n_audio):
            raise RuntimeError(
                f"audio placeholder counts {got.tolist()} != audio token counts {n_audio.tolist()}"
            )
        inputs = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "input_features": feats["input_features"].to(self.device),
            "feature_attention_mask": feature_mask.to(self.device),
        }
        codes = self.span_codes_from_ids(inputs["input_ids"], inputs["attention_mask"], [self.audio_token_id])
        return Prepared(inputs=inputs, span_codes=codes, instances=list(instances))

    # -- generation ----------------------------------------------------------------------------------------
    @property
    def speakers(self) -> list[str]:
        return list(getattr(self.model, "speaker_map", {}) or {})

    def resolve_speaker(self, speaker: str = "") -> str | None:
        """`speaker` if given (must exist), else "Chelsie" if present, else the first speaker, else None."""
        names = self.speakers
        if speaker:
            if speaker not in names:
                raise ValueError(f"speaker {speaker!r} not in spk_dict.pt of {self.model_id}; have {names}")
            return speaker
        if DEFAULT_SPEAKER in names:
            return DEFAULT_SPEAKER
        return names[0] if names else None

    def talker_code_cap(self) -> int:
        """Most codec tokens token2wav accepts (`Requested mel length ... exceeds` otherwise)."""
        dit = self._require().config.token2wav_config.dit_config
        return int(dit.max_position_embeddings // max(1, int(dit.repeats)))

    def generate(self, prepared: Prepared, settings: GenerationSettings) -> list[GenerationOutput]:
        """Greedy thinker decoding; with `want_audio` also the talker + token2wav waveform per row."""
        model = self._require()
        inputs = prepared.inputs
        prompt_len = int(inputs["input_ids"].shape[1])
        kw: dict[str, Any] = dict(inputs)
        kw.update(
            use_audio_in_video=False,
            thinker_max_new_tokens=int(settings.max_new_tokens),
            thinker_do_sample=bool(settings.do_sample),
            thinker_eos_token_id=list(self._stop_ids),
            thinker_pad_token_id=self._pad_id,
        )
        if settings.do_sample and settings.temperature > 0:
            kw["thinker_temperature"] = float(settings.temperature)
        batch = int(inputs["input_ids"].shape[0])
        kw.update(self._decoding_kwargs(batch, prompt_len + int(settings.max_new_tokens), bool(settings.want_audio)))
        kw.update({k: v for k, v in settings.extra.items() if k.startswith("thinker_")})
        speaker = self.resolve_speaker(settings.speaker)
        want_options = not settings.want_audio and any(i.options for i in prepared.instances)
        if want_options:  # SER: keep the first step's logits for the option probabilities
            kw.update(thinker_output_logits=True, thinker_return_dict_in_generate=True)

        torch.manual_seed(int(settings.seed))
        wavs: list[torch.Tensor] | None = None
        seed_rows = contextlib.nullcontext()
        with torch.no_grad():
            if settings.want_audio:
                if speaker is None or not getattr(model, "has_talker", False):
                    raise RuntimeError(f"{self.model_id}: no talker/speakers loaded, cannot generate speech")
                talker = model.talker
                # one seed per instance, never per batch, so an instance's speech does not depend on which
                # instances share its batch: the talker samples each row from its own generator (upstream
                # samples all rows from the global RNG) and token2wav draws each row's noise after reseeding
                row_seeds = [instance_seed(settings.seed, inst.id) for inst in prepared.instances]
                if bool(settings.extra.get("talker_do_sample", True)):
                    from transformers import LogitsProcessorList

                    kw["talker_logits_processor"] = LogitsProcessorList(
                        [RowSampler(row_seeds, **talker_sampling(type(model).generate, settings.extra))]
                    )
                batched = self.token2wav_batch_size > 1 and len(row_seeds) > 1
                seed_rows = deferred_calls(model.token2wav) if batched else seeded_calls(model.token2wav, row_seeds)
                kw.update(
                    speaker=speaker,
                    talker_do_sample=False,  # RowSampler already drew the token: greedy keeps it
                    # an EOS as the very first code makes token2wav fail on an empty code sequence
                    talker_min_new_tokens=int(settings.extra.get("talker_min_new_tokens", 1)),
                    talker_eos_token_id=[int(talker.codec_pad_token), int(talker.codec_eos_token)],
                    talker_max_new_tokens=min(
                        int(settings.extra.get("talker_max_new_tokens", TALKER_MAX_NEW_TOKENS)),
                        self.talker_code_cap(),
                    ),
                )
                kw.update({k: v for k, v in settings.extra.items() if k.startswith("token2wav_")})
                for k, v in settings.extra.items():  # other talker_* knobs (top_k, top_p, temperature, ...)
                    if k.startswith("talker_") and k not in kw:
                        kw[k] = v
                talker_needed = prompt_len + 2 + int(kw["talker_max_new_tokens"])  # + text bos and first reply row
                with seed_rows as calls, self._talker_fast_path(kw, batch, talker_needed):
                    sequences, audio = model.generate(**kw)
                if batched:
                    wavs = token2wav_batched(model.token2wav, calls, row_seeds, self.token2wav_batch_size)
                else:
                    wavs = [audio] if isinstance(audio, torch.Tensor) else list(audio)
            elif speaker is not None:
                sequences = model.generate(**kw, speaker=speaker, generation_mode="text")
            else:  # no spk_dict.pt: upstream generate refuses even text mode, so call the thinker directly
                thinker_kw = {k[len("thinker_") :]: v for k, v in kw.items() if k.startswith("thinker_")}
                rest = {k: v for k, v in kw.items() if not k.startswith("thinker_")}
                sequences = model.thinker.generate(**rest, **thinker_kw)
        first_logits = None
        if not isinstance(sequences, torch.Tensor):
            if want_options and getattr(sequences, "logits", None):
                first_logits = sequences.logits[0].cpu()
            sequences = sequences.sequences
        new = sequences[:, prompt_len:].cpu()
        out: list[GenerationOutput] = []
        for i, (text, n) in enumerate(self.decode_until_stop(self.tokenizer, new, self._stop_ids)):
            if wavs is not None:
                wav = wavs[i].detach().float().reshape(-1).cpu().numpy().astype(np.float32)
                out.append(
                    GenerationOutput(text=text, wav=wav, sample_rate=OUTPUT_SAMPLE_RATE, n_generated=n)
                )
            else:
                probs = None
                if first_logits is not None and prepared.instances and prepared.instances[i].options:
                    probs = self.option_probabilities(self.tokenizer, first_logits[i], prepared.instances[i].options)
                out.append(GenerationOutput(text=text, n_generated=n, option_probs=probs))
        return out

    # -- hooks ---------------------------------------------------------------------------------------------
    def decoder_root(self, component: str) -> torch.nn.Module:
        """The thinker / talker `...ForConditionalGeneration` module (their forwards see `input_ids`)."""
        model = self._require()
        if component == "thinker":
            return model.thinker
        if component == "talker":
            if not getattr(model, "has_talker", False):
                raise RuntimeError(f"{self.model_id}: talker not loaded")
            return model.talker
        raise KeyError(
            f"component {component!r} not available for {self.name}; have {sorted(self.components)}"
        )

    @property
    def stop_token_ids(self) -> list[int]:
        """Thinker end-of-turn / EOS ids (<|im_end|>, <|endoftext|>)."""
        return list(self._stop_ids)

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id

    def component_stop_token_ids(self, component: str) -> list[int]:
        """Stop ids per component: the thinker's text EOS ids, or the talker's codec pad/end ids."""
        if component == "talker":
            talker = self.decoder_root("talker")
            return [int(talker.codec_pad_token), int(talker.codec_eos_token)]
        self.decoder_root(component)
        return self.stop_token_ids

    def prefill_span_codes(self, component: str, prepared: Prepared) -> torch.Tensor:
        """Span codes of the first forward call of `component` during `generate`.

        Thinker: `prepared.span_codes` [B, T]. Talker: its prefill has T + 2 positions (the prompt, the
        speaker's text-bos embedding, and the first generated thinker token), coded text and generated.
        """
        codes = prepared.span_codes
        if component != "talker":
            return codes
        from .. import SPANS

        extra = torch.tensor([SPANS.index("text"), SPANS.index("generated")], device=codes.device)
        return torch.cat([codes, extra.expand(codes.shape[0], 2)], dim=1)
