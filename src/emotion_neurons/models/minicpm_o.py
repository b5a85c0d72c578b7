"""Adapter for MiniCPM-o 4.5 (`openbmb/MiniCPM-o-4_5`): audio in, text and 24 kHz speech out.

Sources read (public code; nothing copied). Line numbers refer to OpenBMB/MiniCPM-o-Demo at commit 28b60cf,
folder `MiniCPMO45/` (the hub remote code), unless another repository is named:

- `modeling_minicpmo.py`
  - `MiniCPMO.__init__` (l. 111): `self.llm = Qwen3ForCausalLM(config)` (runtime paths
    `llm.model.layers.{i}.mlp.{gate_proj,up_proj,down_proj,act_fn}`), `self.apm` (Whisper encoder),
    `self.tts = MiniCPMTTS(...)`, terminators `<|im_end|>`, `<|endoftext|>`.
  - `MiniCPMTTS.__init__` (l. 4057): `self.model = LlamaModel(...)` (paths `tts.model.layers.{i}.mlp...`),
    `emb_text`, `emb_code[0]`, `head_code`, `projector_semantic`, `audio_tokenizer`.
  - `init_tts(streaming=False, ...)` (l. 239): streaming speech needs `streaming=True`, which loads
    `stepaudio2.Token2wav` from `assets/token2wav` (package `minicpmo-utils[all]`).
  - `get_sys_prompt(ref_audio=None, mode="default", language="en")` (l. 286, static).
  - `generate(input_ids, ..., audio_features, audio_feature_lens, audio_bounds, attention_mask, tokenizer,
    **kwargs) -> (texts, outputs)` (l. 847): embeddings from `get_vllm_embedding` (which calls
    `llm.model.embed_tokens(input_ids)`) and `get_omni_embedding`, then
    `llm.generate(inputs_embeds=..., pad_token_id=0, eos_token_id=terminators, output_hidden_states=True,
    return_dict_in_generate=True)`. `chat` (l. 1060) builds the prompt with the tokenizer's chat template
    (`use_tts_template=True` whenever audio is present, `enable_thinking=False`), calls the processor,
    pops `image_sizes` and calls `generate`; for greedy decoding it uses `repetition_penalty=1.02`
    (`prepare_generation_config`, l. 1027). `chat` only returns row 0, so batches go through `generate`.
  - `streaming_prefill(session_id, msgs, omni_mode=True, ..., is_last_chunk=False)` (l. 1835): one message
    per call; each call runs `llm(inputs_embeds=..., past_key_values=...)` once.
  - `streaming_generate(session_id, ..., generate_audio=True, max_new_tokens=256, enable_thinking=False,
    use_tts_template=True, do_sample=True, **kwargs)` (l. 1994): yields `(waveform_chunk [1, n], new_text)`
    with audio, `(text_chunk, is_finished)` without. It feeds the bos string
    `<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n<|tts_bos|>` as embeddings, then one
    generated token per call through `utils.ChunkPrefillChunkGenerate.chunk_generate` (utils.py l. 118),
    which looks each token up with `llm.get_input_embeddings()` right before feeding it and stops before
    feeding a terminator (`<|tts_eos|>`, `<|im_end|>`, `</s>`). The TTS is driven by
    `utils.TTSStreamingGenerator.generate_with_buffer` (utils.py l. 684): condition chunks, then one audio
    code per `tts.model(inputs_embeds=emb_code[0](code))` call. Output audio is 24 kHz (README, l. 2267).
  - `init_token2wav_cache(prompt_speech_16k)` (l. 1388): voice prompt of the vocoder (16 kHz array).
  - `prepare_inputs_for_generation` patch (l. 4861): `llm.generate` passes `inputs_embeds` only at the
    first step and `input_ids` [B, 1] afterwards.
- `processing_minicpmo.py`: audio placeholder `<|audio_start|>` + `<unk>` x n + `<|audio_end|>`
  (`get_audio_placeholder`), `audio_bounds` = positions strictly between the markers (`_convert`), batches
  left-padded with id 0 (`pad`).
- `tokenizer_config.json`: chat template (ChatML; generation prompt adds `<think>\\n\\n</think>\\n\\n` when
  `enable_thinking` is false and `<|tts_bos|>` with `use_tts_template`).
- OpenBMB/MiniCPM-o `README.md` (commit 3ec4cb0): loading (`AutoModel.from_pretrained(...,
  trust_remote_code=True, attn_implementation="sdpa", torch_dtype=torch.bfloat16, init_vision=...,
  init_audio=True, init_tts=True)`), the half-duplex speech recipe (system prefill, 1 s user audio chunks
  with the last padded to 1 s, `omni_mode=False`, then `streaming_generate`), `transformers==4.51.0`.
- `minicpmo-utils` 1.0.7 (PyPI sdist) `stepaudio2/token2wav.py`: `Token2wav` works on CUDA, 24 kHz.

Span tracking (the LLM only ever receives `inputs_embeds` for prompt positions, and the streaming path
spreads one prompt over several LLM calls): `decoder_root(component)` is a `SpanRelay`, a stand-in root
module owned by the adapter. During `generate` the adapter puts a forward pre-hook on the real decoder
(`llm` or `tts.model`) that, before each call, either re-arms the span trackers hooked on the relay with the
span codes of that call's prompt positions (codes derived from the token ids the call's embeddings were
looked up from) or, for a decode step, calls the relay with the id of the fed token. A `SpanTracker` on the
relay therefore labels every position of every LLM call, exactly as it does for a model whose decoder
receives `input_ids`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .. import SPANS
from ..hooks import first_tensor_arg
from ..types import GenerationOutput, GenerationSettings, Instance
from .base import ModelAdapter, Prepared, resolve_device, resolve_dtype, revision_kwargs

ENV_FILE = "envs/models-minicpm.yaml"
OUTPUT_SAMPLE_RATE = 24000
#: README half-duplex recipe: user audio is prefilled in 1 s chunks, the last one zero-padded to 1 s
STREAM_CHUNK_SAMPLES = 16000
#: `prepare_generation_config` for `do_sample=False, num_beams=1`
GREEDY_REPETITION_PENALTY = 1.02
AUDIO_PLACEHOLDER = "<audio>./</audio>"

TEXT = SPANS.index("text")
AUDIO = SPANS.index("audio")


def codes_between_markers(ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """Span codes of token ids [B, T]: audio strictly between a start and an end marker, text elsewhere."""
    is_start = (ids == start_id).long()
    is_end = (ids == end_id).long()
    opened = torch.cumsum(is_start, dim=-1) - is_start  # starts strictly before each position
    closed = torch.cumsum(is_end, dim=-1)  # ends up to and including each position
    return torch.where(opened - closed > 0, AUDIO, TEXT).long()


class SpanRelay(torch.nn.Module):
    """Decoder root for a component whose decoder never receives `input_ids` (see module docstring).

    `prompt(codes)` re-arms every span tracker hooked on this module with the codes [B, T] of the next
    decoder call and then calls the module, so that call is the tracker's prefill; `step(ids)` calls the
    module with the ids [B, 1] fed at a decode step.
    """

    def forward(self, input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        return input_ids

    def trackers(self) -> list[Any]:
        """Span trackers attached to this module (`SpanTracker.attached`), or owners of a forward pre-hook
        on it that can be re-armed."""
        from ..hooks import attached_trackers

        found = attached_trackers(self)
        for hook in list(self._forward_pre_hooks.values()):
            owner = getattr(hook, "__self__", None)
            if owner is not None and callable(getattr(owner, "start", None)):
                found.append(owner)
        return found

    def prompt(self, codes: torch.Tensor) -> None:
        for tracker in self.trackers():
            tracker.start(codes)
        self(input_ids=None)

    def step(self, ids: torch.Tensor) -> None:
        self(input_ids=ids)


class DecoderCallDriver:
    """Turns each forward call of a real decoder into `SpanRelay` calls.

    Modes: "prompt" (every call processes prompt positions), "generate" (the first call processes prompt
    positions, every later call one generated token per row), "auto" (a call is a decode step when it has
    one position and a fresh [B, 1] lookup in `lookup` preceded it, else it processes prompt positions).
    Token ids come from the call's `input_ids` or, for embeddings-only calls, from the latest call of the
    `lookup` embedding module (the model embeds ids right before feeding them).
    """

    def __init__(
        self,
        relay: SpanRelay,
        decoder: torch.nn.Module,
        lookup: torch.nn.Module | None,
        codes_from_ids: Callable[[torch.Tensor], torch.Tensor] | None,
        mode: str = "prompt",
    ) -> None:
        if mode not in ("prompt", "generate", "auto"):
            raise ValueError(f"mode {mode!r} unknown")
        self.relay = relay
        self.decoder = decoder
        self.lookup = lookup
        self.codes_from_ids = codes_from_ids
        self.mode = mode
        self.first_codes: torch.Tensor | None = None
        self._last_ids: torch.Tensor | None = None
        self._fresh = False
        self._generate_started = False
        self.prompt_calls = 0
        self.step_calls = 0
        self.generated_lookups = 0

    def begin_generation(self, first_codes: torch.Tensor | None = None) -> None:
        """From now on: one more prompt call (optionally with explicit codes), then decode steps."""
        self.mode = "generate"
        self.first_codes = first_codes
        self._generate_started = False

    def _on_lookup(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        ids = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if ids is None:
            return
        self._last_ids = ids if ids.ndim == 2 else ids.reshape(1, -1)
        self._fresh = True
        if self.mode == "generate" and self._generate_started and self._last_ids.shape[-1] == 1:
            self.generated_lookups += 1

    def _prompt_codes(
        self, ids: torch.Tensor | None, n: int, batch: int, device: torch.device
    ) -> torch.Tensor:
        if self.first_codes is not None:
            codes, self.first_codes = self.first_codes, None
            if codes.shape != (batch, n):
                raise RuntimeError(
                    f"prompt call has shape {(batch, n)} but its span codes {tuple(codes.shape)}"
                )
            return codes.to(device)
        if ids is None and self._fresh and self._last_ids is not None and self._last_ids.shape == (batch, n):
            ids = self._last_ids
        if self.codes_from_ids is None:  # e.g. the TTS: every prompt position is conditioning text
            return torch.full((batch, n), TEXT, dtype=torch.long, device=device)
        if ids is None or ids.shape != (batch, n):
            raise RuntimeError(
                f"no token ids for a {n}-position prompt call of {type(self.decoder).__name__}: "
                "cannot tell audio from text positions (has the model's embedding path changed?)"
            )
        return self.codes_from_ids(ids).to(device)

    def _on_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = first_tensor_arg(args, kwargs, "input_ids")
        if ids is not None and ids.is_floating_point():
            ids = None
        embeds = kwargs.get("inputs_embeds")
        if ids is not None:
            batch, n = ids.shape[0], ids.shape[-1]
            device = ids.device
        elif embeds is not None:
            batch, n = embeds.shape[0], embeds.shape[1]
            device = embeds.device
        else:
            raise RuntimeError(f"{type(module).__name__} called without input_ids or inputs_embeds")
        if self.mode == "prompt":
            is_step = False
        elif self.mode == "generate":
            is_step = self._generate_started
            self._generate_started = True
        else:  # auto
            is_step = (
                n == 1 and self._fresh and self._last_ids is not None and self._last_ids.shape == (batch, 1)
            )
        if is_step:
            tok = ids if ids is not None else (self._last_ids if self._fresh else None)
            if tok is None or tok.shape[0] != batch or n != 1:
                raise RuntimeError(
                    f"decode call of {type(module).__name__} with {n} positions and no fresh token ids; "
                    "span tracking cannot label it"
                )
            self.relay.step(tok[:, -1:].to(device))
            self.step_calls += 1
        else:
            self.relay.prompt(self._prompt_codes(ids, n, batch, device))
            self.prompt_calls += 1
        self._fresh = False

    @contextlib.contextmanager
    def attached(self) -> Iterator[DecoderCallDriver]:
        handles = [self.decoder.register_forward_pre_hook(self._on_call, with_kwargs=True)]
        try:
            if self.lookup is not None:
                handles.append(self.lookup.register_forward_hook(self._on_lookup))
            yield self
        finally:
            for h in handles:
                h.remove()


def _require_stack(need_speech: bool) -> None:
    """Raise one ImportError naming everything missing from the MiniCPM-o environment."""
    problems = []
    try:
        import transformers
    except ImportError:
        problems.append("transformers is not installed")
    else:
        version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
        if not (4, 51) <= version < (4, 53):
            problems.append(
                f"transformers {transformers.__version__} is installed, its remote code pins 4.51"
            )
    if need_speech and importlib.util.find_spec("stepaudio2") is None:
        problems.append("stepaudio2 (package minicpmo-utils[all]) is not installed")
    if problems:
        raise ImportError(
            f"MiniCPM-o 4.5 needs the environment of {ENV_FILE} (transformers==4.51.3, minicpmo-utils[all]): "
            + "; ".join(problems)
        )


class MiniCPMOAdapter(ModelAdapter):
    """MiniCPM-o 4.5 through its hub remote code (module docstring lists the sources).

    - SER (text): batched like `chat`: chat template with `use_tts_template=True, enable_thinking=False`,
      processor, `MiniCPMO.generate` (greedy, `num_beams=1`, `repetition_penalty=1.02`).
    - EVC (speech): one instance at a time through `streaming_prefill` / `streaming_generate` as in the
      README's half-duplex recipe; the vocoder voice prompt is the source utterance unless
      `settings.speaker` names a 16 kHz reference wav. The system message is `get_sys_prompt(mode=...)`
      with `settings.extra["system_mode"]` (default "default"; "none" for no system message).
    - Components: "thinker" = `llm.model.layers.{i}.mlp` (Qwen3), "tts" = `tts.model.layers.{i}.mlp`
      (Llama backbone of the speech-token decoder; only runs in the EVC path).
    - `supports_batching` is False because speech generation is batch size 1; the SER path accepts
      batches when called directly (set `supports_batching = True` on an instance to use them).
    """

    name = "minicpm_o"
    tasks = ("evc", "ser")
    env = "models-minicpm"
    input_sample_rate = 16000
    output_sample_rate = OUTPUT_SAMPLE_RATE
    components = {
        "thinker": r"^llm\.model\.layers\.(\d+)\.mlp$",
        "tts": r"^tts\.model\.layers\.(\d+)\.mlp$",
    }
    supports_batching = False
    #: EVC/SER user turn order: audio, then the instruction (as in the README's audio chat example)
    audio_first = True

    def __init__(self) -> None:
        super().__init__()
        self.processor: Any = None
        self.tokenizer: Any = None
        self.model_id = ""
        self.has_speech = False
        self.relays = {"thinker": SpanRelay(), "tts": SpanRelay()}
        self._ids: dict[str, int] = {}
        self._stop_ids: list[int] = []
        self._ref_key: str | None = None

    # -- loading -------------------------------------------------------------------------------------------
    def load(
        self, model_id: str, revision: str | None = None, device: str = "auto", dtype: str = "auto"
    ) -> None:
        """Load the remote-code model (vision tower skipped), its processor and, on CUDA, the streaming TTS."""
        _require_stack(need_speech=False)
        from transformers import AutoModel, AutoProcessor

        dev = resolve_device(device)
        kwargs: dict[str, Any] = {
            "trust_remote_code": True,
            "attn_implementation": "sdpa",
            "torch_dtype": resolve_dtype(dtype, dev),
            "init_vision": False,
            "init_audio": True,
            "init_tts": True,
            **revision_kwargs(revision),
        }
        try:
            model = AutoModel.from_pretrained(str(model_id), **kwargs)
            processor = AutoProcessor.from_pretrained(
                str(model_id), trust_remote_code=True, **revision_kwargs(revision)
            )
        except OSError as e:
            raise OSError(f"cannot load MiniCPM-o from {model_id!r} (revision {revision}): {e}") from e
        model.eval().to(dev)
        model.processor = processor  # streaming_prefill/chat reuse it instead of reloading
        self._init_speech(model)
        self._attach(model, processor, str(model_id))

    @staticmethod
    def _init_speech(model: Any) -> None:
        """`init_tts(streaming=True)` (stepaudio2 Token2wav, CUDA only); warn and stay text-only otherwise."""
        if getattr(model, "tts", None) is None:
            return
        if importlib.util.find_spec("stepaudio2") is None:
            warnings.warn(
                f"stepaudio2 missing (see {ENV_FILE}): MiniCPM-o loaded without speech", stacklevel=3
            )
            return
        if not torch.cuda.is_available():
            warnings.warn("MiniCPM-o streaming vocoder needs CUDA: loaded without speech", stacklevel=3)
            return
        params = inspect.signature(model.init_tts).parameters
        model.init_tts(**({"streaming": True} if "streaming" in params else {}))

    @classmethod
    def from_model(cls, model: Any, processor: Any = None, model_id: str = "") -> MiniCPMOAdapter:
        """Wrap an already built model (e.g. a test stand-in) that exposes the remote code's interface."""
        adapter = cls()
        adapter._attach(model, processor if processor is not None else model.processor, model_id)
        return adapter

    def _attach(self, model: Any, processor: Any, model_id: str) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id or str(getattr(getattr(model, "config", None), "_name_or_path", ""))
        self.device = model.llm.get_input_embeddings().weight.device
        tts = getattr(model, "tts", None)
        self.has_speech = tts is not None and hasattr(getattr(tts, "audio_tokenizer", None), "stream")
        tok = self.tokenizer
        unk = tok.unk_token_id
        for name in (
            "<|im_end|>",
            "<|endoftext|>",
            "<|tts_eos|>",
            "<|tts_bos|>",
            "<|audio_start|>",
            "<|audio_end|>",
        ):
            tid = tok.convert_tokens_to_ids(name)
            if tid is None or (unk is not None and tid == unk):
                raise ValueError(f"{self.model_id}: tokenizer has no {name}")
            self._ids[name] = int(tid)
        self._stop_ids = [self._ids["<|im_end|>"], self._ids["<|endoftext|>"], self._ids["<|tts_eos|>"]]

    def _require(self) -> Any:
        if self.model is None or self.tokenizer is None:
            raise RuntimeError("MiniCPMOAdapter: call load() or from_model() first")
        return self.model

    # -- inputs --------------------------------------------------------------------------------------------
    def span_codes(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """0 inside `<|audio_start|>...<|audio_end|>`, 1 elsewhere, -1 for padding."""
        codes = codes_between_markers(ids, self._ids["<|audio_start|>"], self._ids["<|audio_end|>"])
        if attention_mask is not None:
            codes = torch.where(attention_mask.bool(), codes, -1)
        return codes

    def render_prompt(self, prompt: str) -> str:
        """Chat text of one SER/EVC turn as `chat` renders it (audio placeholder still unexpanded)."""
        parts = [AUDIO_PLACEHOLDER, prompt] if self.audio_first else [prompt, AUDIO_PLACEHOLDER]
        msgs = [{"role": "user", "content": "\n".join(parts)}]
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, use_tts_template=True, enable_thinking=False
        )

    def prepare(self, instances: list[Instance], audios: list[np.ndarray]) -> Prepared:
        """SER: processor batch (left-padded) with span codes. EVC: the raw turn for the streaming API.

        Streaming prompt positions only exist once the model's streaming processor has tokenised each
        chunk, so EVC span codes are [1, 0] here and the relay supplies them per LLM call.
        """
        self._require()
        self.check_batch(instances, audios)
        tasks = {inst.task for inst in instances}
        if len(tasks) != 1:
            raise ValueError(f"one task per batch, got {sorted(tasks)}")
        waves = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
        if tasks == {"evc"}:
            if len(instances) != 1:
                raise ValueError(
                    "MiniCPM-o speech generation goes through its streaming API: batch size must be 1"
                )
            codes = torch.zeros((1, 0), dtype=torch.long, device=self.device)
            inputs = {"mode": "streaming", "audio": waves[0], "prompt": instances[0].prompt}
            return Prepared(inputs=inputs, span_codes=codes, instances=list(instances))
        texts = [self.render_prompt(inst.prompt) for inst in instances]
        feats = self.processor(
            texts,
            [[] for _ in instances],
            [[w] for w in waves],
            [[0] for _ in instances],  # audio_parts: the message index of each clip, as `chat` passes
            max_slice_nums=None,
            use_image_id=None,
            stream_input=False,
            return_tensors="pt",
            max_length=8192,
        ).to(self.device)
        model_inputs = dict(feats)
        model_inputs.pop("image_sizes", None)
        ids, mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        codes = self.span_codes(ids, mask).to(self.device)
        n_audio = (codes == AUDIO).sum(-1)
        n_bounds = torch.tensor(
            [int((b[:, 1] - b[:, 0]).sum()) if len(b) else 0 for b in model_inputs["audio_bounds"]]
        )
        if not torch.equal(n_audio.cpu(), n_bounds):
            raise RuntimeError(
                f"audio positions {n_audio.tolist()} != processor audio_bounds {n_bounds.tolist()}"
            )
        return Prepared(
            inputs={"mode": "text", "model_inputs": model_inputs}, span_codes=codes, instances=list(instances)
        )

    # -- generation ----------------------------------------------------------------------------------------
    def generate(self, prepared: Prepared, settings: GenerationSettings) -> list[GenerationOutput]:
        """Text path for SER batches, streaming path (text + 24 kHz speech) for EVC."""
        self._require()
        torch.manual_seed(int(settings.seed))
        if prepared.inputs.get("mode") == "streaming":
            return [self._generate_streaming(prepared, settings)]
        if settings.want_audio:
            raise ValueError(
                "speech output needs EVC instances (streaming path); this batch was prepared for text"
            )
        return self._generate_text(prepared, settings)

    def _text_driver(self) -> DecoderCallDriver:
        return DecoderCallDriver(
            self.relays["thinker"], self.model.llm, self.model.llm.get_input_embeddings(), self.span_codes
        )

    def _generate_text(self, prepared: Prepared, settings: GenerationSettings) -> list[GenerationOutput]:
        model = self.model
        extra = settings.extra
        kw: dict[str, Any] = {
            "max_new_tokens": int(settings.max_new_tokens),
            "min_new_tokens": 0,
            "do_sample": bool(settings.do_sample),
            "num_beams": 1,
            "repetition_penalty": float(extra.get("repetition_penalty", GREEDY_REPETITION_PENALTY)),
        }
        if settings.do_sample:
            kw.update(
                temperature=float(settings.temperature or extra.get("temperature", 0.7)),
                top_p=float(extra.get("top_p", 0.8)),
                top_k=int(extra.get("top_k", 100)),
            )
        driver = self._text_driver()
        driver.begin_generation(first_codes=prepared.span_codes)
        with torch.no_grad(), driver.attached():
            _, outputs = model.generate(**prepared.inputs["model_inputs"], tokenizer=self.tokenizer, **kw)
        # generation from inputs_embeds only: sequences hold the new tokens only
        seqs = outputs.sequences if hasattr(outputs, "sequences") else outputs["sequences"]
        decoded = self.decode_until_stop(self.tokenizer, seqs.cpu(), self._stop_ids)
        return [GenerationOutput(text=text.strip(), n_generated=n) for text, n in decoded]

    def reference_audio(self, settings: GenerationSettings, source: np.ndarray) -> np.ndarray:
        """Vocoder voice prompt at 16 kHz: the source utterance, or the wav named by `settings.speaker`."""
        if not settings.speaker or settings.speaker == "source":
            return source
        from ..io import load_audio

        return load_audio(settings.speaker, 16000)

    def system_message(self, mode: str, ref_audio: np.ndarray) -> dict[str, Any] | None:
        """`get_sys_prompt` of the remote code; modes other than "default" put the voice prompt in it."""
        if mode == "none":
            return None
        if mode == "default":
            return self.model.get_sys_prompt(ref_audio=None, mode="default", language="en")
        return self.model.get_sys_prompt(ref_audio=ref_audio, mode=mode, language="en")

    def _stream_turn(self, audio: np.ndarray, prompt: str) -> list[tuple[list[Any], bool]]:
        """User turn as (content, is_last_chunk) prefill steps: 1 s audio chunks and the instruction."""
        chunks = [
            audio[i : i + STREAM_CHUNK_SAMPLES] for i in range(0, max(1, audio.size), STREAM_CHUNK_SAMPLES)
        ]
        last = chunks[-1]
        if last.size < STREAM_CHUNK_SAMPLES:
            chunks[-1] = np.concatenate([last, np.zeros(STREAM_CHUNK_SAMPLES - last.size, dtype=np.float32)])
        audio_steps: list[tuple[list[Any], bool]] = [
            ([c], k == len(chunks) - 1) for k, c in enumerate(chunks)
        ]
        if self.audio_first:
            return audio_steps + [(["\n" + prompt], False)]
        return [([prompt + "\n"], False)] + audio_steps

    def _generate_streaming(self, prepared: Prepared, settings: GenerationSettings) -> GenerationOutput:
        model = self.model
        extra = dict(settings.extra)
        want_audio = bool(settings.want_audio)
        if want_audio and not self.has_speech:
            raise RuntimeError(
                f"{self.model_id}: streaming TTS not initialised (needs CUDA and stepaudio2, see {ENV_FILE})"
            )
        source = prepared.inputs["audio"]
        ref = self.reference_audio(settings, source)
        key = self.audio_key(ref)
        same_voice = key == self._ref_key and getattr(model, "token2wav_cache", None) is not None
        model.reset_session(reset_token2wav_cache=not same_voice)
        if not same_voice:
            self._ref_key = None
            if want_audio:
                model.init_token2wav_cache(prompt_speech_16k=ref)
                self._ref_key = key
        system = self.system_message(str(extra.pop("system_mode", "default")), ref)
        gen_kw: dict[str, Any] = {
            k: extra[k]
            for k in (
                "temperature",
                "top_p",
                "top_k",
                "repetition_penalty",
                "length_penalty",
                "audio_token_chunk_size",
            )
            if k in extra
        }
        if settings.do_sample and settings.temperature > 0:
            gen_kw["temperature"] = float(settings.temperature)

        llm_driver = self._text_driver()
        drivers = [llm_driver]
        if want_audio:
            tts = model.tts
            drivers.append(
                DecoderCallDriver(self.relays["tts"], tts.model, tts.emb_code[0], None, mode="auto")
            )
        session = f"en-{uuid.uuid4().hex}"
        text_parts: list[str] = []
        wav_parts: list[np.ndarray] = []
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for d in drivers:
                stack.enter_context(d.attached())
            if system is not None:
                model.streaming_prefill(
                    session_id=session, msgs=[system], omni_mode=False, is_last_chunk=True
                )
            for content, is_last in self._stream_turn(source, prepared.inputs["prompt"]):
                model.streaming_prefill(
                    session_id=session,
                    msgs=[{"role": "user", "content": content}],
                    omni_mode=False,
                    is_last_chunk=is_last,
                )
            llm_driver.begin_generation()
            stream = model.streaming_generate(
                session_id=session,
                generate_audio=want_audio,
                use_tts_template=True,
                enable_thinking=False,
                do_sample=bool(settings.do_sample),
                max_new_tokens=int(settings.max_new_tokens),
                **gen_kw,
            )
            for first, second in stream:
                if want_audio:
                    if first is not None:
                        wav_parts.append(
                            np.asarray(torch.as_tensor(first).detach().float().cpu()).reshape(-1)
                        )
                    text_parts.append(second or "")
                else:
                    text_parts.append(first or "")
        text = "".join(text_parts).split("<|tts_eos|>")[0]
        for special in ("<|im_end|>", "<|endoftext|>", "<|tts_bos|>"):
            text = text.replace(special, "")
        n = llm_driver.generated_lookups
        if not want_audio:
            return GenerationOutput(text=text.strip(), n_generated=n)
        wav = np.concatenate(wav_parts).astype(np.float32) if wav_parts else np.zeros(0, np.float32)
        return GenerationOutput(text=text.strip(), wav=wav, sample_rate=OUTPUT_SAMPLE_RATE, n_generated=n)

    # -- hooks ---------------------------------------------------------------------------------------------
    def decoder_root(self, component: str) -> torch.nn.Module:
        """The component's `SpanRelay` (the real decoders only receive `inputs_embeds` for prompts)."""
        model = self._require()
        if component not in self.relays:
            raise KeyError(
                f"component {component!r} not available for {self.name}; have {sorted(self.components)}"
            )
        if component == "tts" and getattr(model, "tts", None) is None:
            raise RuntimeError(f"{self.model_id}: TTS not loaded")
        return self.relays[component]

    @property
    def stop_token_ids(self) -> list[int]:
        """LLM end ids: `<|im_end|>`, `<|endoftext|>` (generate's terminators) and `<|tts_eos|>` (end of speech text)."""
        return list(self._stop_ids)

    @property
    def pad_token_id(self) -> int | None:
        return 0  # `MiniCPMO._decode` pads finished rows with id 0

    @staticmethod
    def audio_key(audio: np.ndarray) -> str:
        """Content hash of a voice prompt (to skip re-initialising the vocoder cache for the same clip)."""
        return hashlib.sha1(np.ascontiguousarray(audio, dtype=np.float32).tobytes()).hexdigest()
