"""Adapter for Audio Flamingo 3 (`nvidia/audio-flamingo-3-hf`): audio in, text out (SER only)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..types import GenerationOutput, GenerationSettings, Instance
from .base import ModelAdapter, Prepared, pretrained_kwargs, resolve_model_source, revision_kwargs

#: stop tokens of the checkpoint's generation_config.json (eos_token_id = [<|im_end|>, <|endoftext|>])
STOP_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")


def num_audio_tokens(valid_frames: torch.Tensor) -> torch.Tensor:
    """Audio placeholder count per clip from its valid mel frames summed over its 30 s windows
    (`AudioFlamingo3Processor._get_audio_token_length`: conv stride 2, then 2x average pooling)."""
    lengths = (valid_frames - 1) // 2 + 1
    return (lengths - 2) // 2 + 1


class AudioFlamingo3Adapter(ModelAdapter):
    """Audio Flamingo 3 through `transformers.AudioFlamingo3ForConditionalGeneration` (transformers >= 5).

    Where each choice comes from:
    - Inputs: the real `AudioFlamingo3Processor` of the checkpoint. The prompt is rendered with the
      processor's chat template as in the transformers model doc (docs/source/en/model_doc/audioflamingo3.md,
      "Audio Instruct Mode"): one user turn holding an audio item and the prompt text, with the template's
      default system turn. That template (transformers `convert_audioflamingo3_to_hf.py`, `write_processor`)
      always puts one `<sound>` at the start of the user turn, whatever the item order. The rendered text
      and the waveforms then go through `processor(text=..., audio=...)`, which the processor documents as
      equal to `apply_chat_template(tokenize=True)` and which avoids its URL/path audio loading. The
      processor windows audio into 30 s chunks, pads each to 3000 mel frames, expands `<sound>` to
      `((L - 1) // 2 + 1 - 2) // 2 + 1` copies (L = valid frames over all windows) and pads text on the left.
    - Generation: greedy by default with the KV cache forced on (the converter writes
      `text_config.use_cache=False`) and `repetition_penalty=1.0` (the checkpoint's generation config
      samples with temperature 0.7, top-p 0.8, top-k 20 and repetition penalty 1.05; override through
      `settings.extra["repetition_penalty"]`). Stop ids = generation_config EOS ids (<|im_end|>,
      <|endoftext|>); pad = <|endoftext|>.
    - Hooks: `decoder_root("thinker")` is the top `AudioFlamingo3ForConditionalGeneration`: its forward
      receives `input_ids` [B, T_prompt] (with `input_features`) at prefill and [B, 1] at every decode step;
      `model.language_model` (Qwen2Model) only receives `inputs_embeds`. Decoder MLPs at runtime (5.x):
      `model.language_model.layers.{i}.mlp.{gate_proj,up_proj,down_proj,act_fn}`.
    """

    name = "audio_flamingo3"
    tasks = ("ser",)
    env = "models-tf5"
    input_sample_rate = 16000
    components = {
        # 5.x runtime: model.language_model.layers.{i}.mlp; 4.x style (Qwen2ForCausalLM): language_model.model.layers
        "thinker": r"^(?:model\.)?language_model\.(?:model\.)?layers\.(\d+)\.mlp$",
    }
    supports_batching = True
    max_audio_seconds = 600  # AudioFlamingo3Processor max_audio_len (it truncates longer audio)

    def __init__(self) -> None:
        super().__init__()
        self.processor: Any = None
        self.tokenizer: Any = None
        self.audio_token_id: int = -1
        self._stop_ids: list[int] = []
        self._pad_id: int | None = None
        self._feature_dtype: torch.dtype = torch.float32
        self.model_id: str = ""

    # -- loading -------------------------------------------------------------------------------------------
    def load(
        self, model_id: str, revision: str | None = None, device: str = "auto", dtype: str = "auto"
    ) -> None:
        """Load model and processor from a hub id or a local directory."""
        from transformers import AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor

        model_id = resolve_model_source(model_id, "Audio Flamingo 3")
        kwargs, dev = pretrained_kwargs(device, dtype, revision)
        try:
            model = AudioFlamingo3ForConditionalGeneration.from_pretrained(model_id, **kwargs)
            self.processor = AudioFlamingo3Processor.from_pretrained(model_id, **revision_kwargs(revision))
        except OSError as e:
            raise OSError(f"cannot load Audio Flamingo 3 from {model_id!r} (revision {revision}): {e}") from e
        model.eval()
        if "device_map" not in kwargs:
            model.to(dev)
        self.model = model
        self.model_id = model_id
        self.device = model.get_input_embeddings().weight.device
        self._feature_dtype = next(model.model.audio_tower.parameters()).dtype
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"

        self.audio_token_id = int(self.processor.audio_token_id)
        if self.audio_token_id != int(model.config.audio_token_id):
            raise ValueError(
                f"{model_id}: processor maps {self.processor.audio_token} to {self.audio_token_id}, "
                f"model expects {model.config.audio_token_id}"
            )
        vocab = self.tokenizer.get_vocab()
        stops = [int(vocab[t]) for t in STOP_TOKENS if t in vocab]
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        for i in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
            if int(i) not in stops:
                stops.append(int(i))
        if not stops:
            raise ValueError(
                f"{model_id}: no stop token (<|im_end|>, <|endoftext|> or generation_config EOS)"
            )
        self._stop_ids = stops
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = getattr(model.generation_config, "pad_token_id", None)
        self._pad_id = int(pad) if pad is not None else stops[-1]

    def _require(self) -> Any:
        if self.model is None or self.processor is None:
            raise RuntimeError("AudioFlamingo3Adapter: call load() first")
        return self.model

    # -- inputs --------------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str) -> str:
        """Chat text of one instance with one unexpanded `<sound>` (the processor expands it)."""
        conversation = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        if isinstance(text, list):
            text = text[0]
        token = self.processor.audio_token
        if text.count(token) != 1:
            raise RuntimeError(f"rendered prompt has {text.count(token)} {token} tokens, expected 1")
        return text

    def prepare(self, instances: list[Instance], audios: list[np.ndarray]) -> Prepared:
        """Left-padded batch through the real processor, plus the span code of every prompt position."""
        self._require()
        self.check_batch(instances, audios)
        waves = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
        texts = [self.render_prompt(inst.prompt) for inst in instances]
        enc = self.processor(
            text=texts,
            audio=waves,
            sampling_rate=self.input_sample_rate,
            padding_side="left",
            return_tensors="pt",
        )
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        if bool((attention_mask[:, -1] == 0).any()):
            raise RuntimeError(
                "processor padded on the right; left padding is required for batched generation"
            )
        got = (input_ids == self.audio_token_id).sum(-1)
        if "input_features_mask" in enc:
            fe = self.processor.feature_extractor
            window = int(self.input_sample_rate * fe.chunk_length)
            cap = int(self.processor.max_audio_len // fe.chunk_length)
            n_windows = [min(cap, max(1, -(-len(w) // window))) for w in waves]
            frames = torch.stack(
                [s.sum() for s in torch.split(enc["input_features_mask"].sum(-1), n_windows)]
            )
            expected = num_audio_tokens(frames)
            if not torch.equal(got, expected):
                raise RuntimeError(
                    f"audio placeholder counts {got.tolist()} != audio token counts {expected.tolist()}"
                )
        inputs: dict[str, Any] = {}
        for k, v in enc.items():
            if k == "num_audio_tokens" or not isinstance(v, torch.Tensor):
                continue
            v = v.to(self.device)
            inputs[k] = v.to(self._feature_dtype) if v.is_floating_point() else v
        codes = self.span_codes_from_ids(inputs["input_ids"], inputs["attention_mask"], [self.audio_token_id])
        return Prepared(inputs=inputs, span_codes=codes, instances=list(instances))

    # -- generation ----------------------------------------------------------------------------------------
    def generate(self, prepared: Prepared, settings: GenerationSettings) -> list[GenerationOutput]:
        """Greedy (unless settings sample) text generation; decodes only the new tokens before the first stop."""
        model = self._require()
        inputs = prepared.inputs
        prompt_len = int(inputs["input_ids"].shape[1])
        sample = bool(settings.do_sample)
        kw: dict[str, Any] = dict(inputs)
        kw.update(
            max_new_tokens=int(settings.max_new_tokens),
            do_sample=sample,
            eos_token_id=list(self._stop_ids),
            pad_token_id=self._pad_id,
            use_cache=True,
            repetition_penalty=float(settings.extra.get("repetition_penalty", 1.0)),
        )
        if sample:
            if settings.temperature > 0:
                kw["temperature"] = float(settings.temperature)
        else:  # drop the checkpoint's sampling parameters so greedy decoding does not warn about them
            kw.update(temperature=None, top_p=None, top_k=None)
        want_options = any(i.options for i in prepared.instances)
        if want_options:  # SER: keep the first step's logits for the option probabilities
            kw.update(output_logits=True, return_dict_in_generate=True)
        torch.manual_seed(int(settings.seed))
        with torch.no_grad():
            sequences = model.generate(**kw)
        first_logits = None
        if not isinstance(sequences, torch.Tensor):
            if want_options and getattr(sequences, "logits", None):
                first_logits = sequences.logits[0].cpu()
            sequences = sequences.sequences
        new = sequences[:, prompt_len:].cpu()
        decoded = self.decode_until_stop(self.tokenizer, new, self._stop_ids)
        out = []
        for i, (text, n) in enumerate(decoded):
            probs = None
            if first_logits is not None and prepared.instances[i].options:
                probs = self.option_probabilities(self.tokenizer, first_logits[i], prepared.instances[i].options)
            out.append(GenerationOutput(text=text, n_generated=n, option_probs=probs))
        return out

    # -- hooks ---------------------------------------------------------------------------------------------
    def decoder_root(self, component: str) -> torch.nn.Module:
        """The top model: its forward receives `input_ids` at prefill and at every decode step."""
        model = self._require()
        if component not in self.components:
            raise KeyError(
                f"component {component!r} not available for {self.name}; have {sorted(self.components)}"
            )
        return model

    @property
    def stop_token_ids(self) -> list[int]:
        """<|im_end|> and <|endoftext|> (the checkpoint's generation_config EOS ids)."""
        return list(self._stop_ids)

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id
