"""Structural stand-in for `kimia_infer.api.kimia.KimiAudio` (see emotion_neurons.models.kimi_audio).

What matches the public code (MoonshotAI/Kimi-Audio `kimia_infer`, hub `modeling_moonshot_kimia.py`):
- `alm` is a causal LM whose `forward(input_ids, text_input_ids, whisper_input_feature, is_continuous_mask,
  attention_mask, position_ids, past_key_values, ..., return_dict)` calls `self.model(...)` and, with
  `return_dict=False`, returns `(audio_logits, text_logits, past_key_values)`; its `model` has
  `embed_tokens`, `layers.{i}` and `mimo_layers.{i}` decoder layers whose `mlp` is transformers' `Qwen2MLP`
  (`model.layers.{i}.mlp.act_fn` ...), the MIMO branch starting after layer `from_layer_index`, norms and a
  `vq_adaptor` for the Whisper features;
- `KimiAudio.generate(chats, output_type, audio_temperature, audio_top_k, text_temperature, text_top_k,
  audio_repetition_penalty, audio_repetition_window_size, text_repetition_penalty,
  text_repetition_window_size, max_new_tokens) -> (wav | None, text)`, `prompt_manager.get_prompt(messages,
  output_type)` returning a `KimiAContent`-like object (`to_tensor()`, `continuous_feature`), `extra_tokens`,
  `eod_ids`, `detokenizer`, with audio messages given as file paths read at 16 kHz;
- the decoding loop calls `self.alm.forward(...)` directly (so hooks on `alm` itself never fire): the whole
  prompt once, then one (audio, text) token pair per call, 6 audio delay steps, stopping before feeding a text
  EOS ("text") or an audio end token ("both").
Simplified: the audio tokenizer, Whisper features, attention (no rotary embedding), sampler details and the
detokenizer (sine tones at 24 kHz); "both" stops after `both_budget` steps (real: 1500 minus the prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

from . import char_tokenizer

SPECIALS = [
    "<|im_kimia_text_blank|>",
    "<|im_msg_end|>",
    "<|im_user_msg_start|>",
    "<|im_assistant_msg_start|>",
    "<|im_media_begin|>",
    "<|im_media_end|>",
    "<|im_kimia_text_eos|>",
    "<|im_kimia_user_msg_start|>",
    "<|im_kimia_assistant_msg_start|>",
    "<|im_kimia_speech_ct_id|>",
    "<|im_kimia_speech_ctd_id|>",
    "<|pad|>",
]
TEXT_VOCAB = 128  # text ids live below the offset, audio ids above it (real: 152064 + 16384)
AUDIO_VOCAB = 64
ADAPTOR_DIM = 16
SAMPLES_PER_TOKEN = 1280  # 12.5 Hz speech tokens at 16 kHz


@dataclass
class ExtraTokens:
    msg_end: int
    user_msg_start: int
    assistant_msg_start: int
    media_begin: int
    media_end: int
    kimia_text_blank: int
    kimia_text_eos: int
    kimia_user_msg_start: int
    kimia_assistant_msg_start: int
    kimia_speech_ct_id: int
    kimia_speech_ctd_id: int
    pad: int


class TextTokenizer:
    """Tokenizer with the remote tokenizer's `encode(text, bos=False, eos=False)`, `decode`, `special_tokens`."""

    def __init__(self) -> None:
        self._tok = char_tokenizer(SPECIALS)
        if len(self._tok) > TEXT_VOCAB:
            raise ValueError("text vocabulary exceeds the stand-in's offset")
        self.special_tokens = {t: self._tok.convert_tokens_to_ids(t) for t in SPECIALS}
        self.pad_id = self.special_tokens["<|pad|>"]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


def extra_tokens(tok: TextTokenizer) -> ExtraTokens:
    s = tok.special_tokens
    return ExtraTokens(
        msg_end=s["<|im_msg_end|>"],
        user_msg_start=s["<|im_user_msg_start|>"],
        assistant_msg_start=s["<|im_assistant_msg_start|>"],
        media_begin=s["<|im_media_begin|>"],
        media_end=s["<|im_media_end|>"],
        kimia_text_blank=s["<|im_kimia_text_blank|>"],
        kimia_text_eos=s["<|im_kimia_text_eos|>"],
        kimia_user_msg_start=s["<|im_kimia_user_msg_start|>"],
        kimia_assistant_msg_start=s["<|im_kimia_assistant_msg_start|>"],
        kimia_speech_ct_id=s["<|im_kimia_speech_ct_id|>"],
        kimia_speech_ctd_id=s["<|im_kimia_speech_ctd_id|>"],
        pad=tok.pad_id,
    )


class Content:
    """`KimiAContent`-like pair of token streams plus the continuous-feature mask."""

    def __init__(self) -> None:
        self.audio_token_ids: list[int] = []
        self.text_token_ids: list[int] = []
        self.is_continuous_mask: list[bool] = []
        self.continuous_feature: list[torch.Tensor] = []

    def add(self, audio: list[int], text: list[int], continuous: bool = False) -> None:
        if len(audio) != len(text):
            raise ValueError("streams must grow together")
        self.audio_token_ids += audio
        self.text_token_ids += text
        self.is_continuous_mask += [continuous] * len(audio)

    def merge(self, other: Content) -> None:
        self.audio_token_ids += other.audio_token_ids
        self.text_token_ids += other.text_token_ids
        self.is_continuous_mask += other.is_continuous_mask
        self.continuous_feature += other.continuous_feature

    def to_tensor(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.tensor([self.audio_token_ids], dtype=torch.long),
            torch.tensor([self.text_token_ids], dtype=torch.long),
            torch.tensor([self.is_continuous_mask], dtype=torch.bool),
        )


class PromptManager:
    """`KimiAPromptManager`-like: the two-stream prompt layout of `get_prompt` / `tokenize_message`."""

    def __init__(self, offset: int) -> None:
        self.text_tokenizer = TextTokenizer()
        self.extra_tokens = extra_tokens(self.text_tokenizer)
        self.kimia_token_offset = offset

    @staticmethod
    def _read(path: str) -> np.ndarray:
        import soundfile as sf

        wav, sr = sf.read(path, dtype="float32", always_2d=True)
        if sr != 16000:
            raise ValueError(f"stand-in reads 16 kHz audio only, got {sr}")
        return wav.mean(axis=1)

    def _speech_tokens(self, wav: np.ndarray) -> tuple[list[int], torch.Tensor]:
        n = max(1, math.ceil(wav.size / SAMPLES_PER_TOKEN))
        padded = np.zeros(n * SAMPLES_PER_TOKEN, np.float32)
        padded[: wav.size] = wav
        blocks = padded.reshape(n, ADAPTOR_DIM, -1)
        feats = torch.from_numpy(np.log1p(100 * np.abs(blocks).mean(-1))).float()[None]  # [1, n, ADAPTOR_DIM]
        rms = np.sqrt((padded.reshape(n, -1) ** 2).mean(-1))
        tokens = [self.kimia_token_offset + int(v * 1000) % AUDIO_VOCAB for v in rms]
        return tokens, feats

    def tokenize_message(
        self,
        message: dict,
        tokenize_role: bool,
        has_ct_token: bool,
        has_msg_end_token: bool,
        output_type: str,
    ) -> Content:
        x = self.extra_tokens
        blank = x.kimia_text_blank
        msg = Content()
        if tokenize_role:
            start = x.kimia_user_msg_start if message["role"] == "user" else x.kimia_assistant_msg_start
            msg.add([start], [blank])
        kind = message.get("message_type")
        if kind == "text":
            ids = self.text_tokenizer.encode(message["content"], bos=False, eos=False)
            msg.add([blank] * len(ids), ids)
        elif kind == "audio":
            tokens, feats = self._speech_tokens(self._read(message["content"]))
            msg.add([x.media_begin], [blank])
            msg.add(tokens, [blank] * len(tokens), continuous=True)
            msg.add([x.media_end], [blank])
            if has_ct_token:
                msg.add([x.kimia_speech_ct_id if output_type == "text" else x.kimia_speech_ctd_id], [blank])
            msg.continuous_feature.append(feats)
        elif kind is not None:
            raise NotImplementedError(kind)
        if has_msg_end_token:
            msg.add([x.msg_end], [blank])
        return msg

    def get_prompt(self, messages: list[dict], output_type: str = "text") -> Content:
        assert output_type in ("text", "both")
        out = Content()
        for i, m in enumerate(messages):
            same_as_prev = i > 0 and messages[i - 1]["role"] == m["role"]
            ends_turn = i == len(messages) - 1 or messages[i + 1]["role"] != m["role"]
            out.merge(self.tokenize_message(m, not same_as_prev, ends_turn, ends_turn, output_type))
        out.merge(
            self.tokenize_message(
                {"role": "assistant", "message_type": None}, True, False, False, output_type
            )
        )
        return out


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, past: tuple | None) -> tuple[torch.Tensor, tuple]:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and t > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d)), (k, v)


class DecoderLayer(nn.Module):
    """`MoonshotDecoderLayer`-like: attention + transformers' `Qwen2MLP`, pre-norm residuals."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, past: tuple | None) -> tuple[torch.Tensor, tuple]:
        h, present = self.self_attn(self.input_layernorm(x), past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class KimiaModel(nn.Module):
    """`MoonshotKimiaModel`-like: main layers, MIMO (audio-output) layers branching off, Whisper adaptor."""

    def __init__(self, cfg: Qwen2Config, media_begin: int, media_end: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mimo_layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.kimia_mimo_layers)])
        self.mimo_norm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.vq_adaptor = nn.Module()
        self.vq_adaptor.layers = nn.Sequential(
            nn.Linear(ADAPTOR_DIM, cfg.hidden_size),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(cfg.hidden_size, cfg.hidden_size),
            nn.LayerNorm(cfg.hidden_size),
        )
        self.kimia_mimo_transformer_from_layer_index = cfg.kimia_mimo_transformer_from_layer_index
        self.kimia_media_begin = media_begin
        self.kimia_media_end = media_end

    def forward(
        self,
        input_ids=None,
        text_input_ids=None,
        whisper_input_feature=None,
        is_continuous_mask=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        x = self.embed_tokens(input_ids)
        if whisper_input_feature is not None:
            feats = torch.zeros((x.shape[1], ADAPTOR_DIM), dtype=x.dtype, device=x.device)
            begins = torch.nonzero(input_ids[0] == self.kimia_media_begin).flatten().tolist()
            ends = torch.nonzero(input_ids[0] == self.kimia_media_end).flatten().tolist()
            for seg, (s, e) in enumerate(zip(begins, ends, strict=True)):
                f = whisper_input_feature[seg].reshape(-1, ADAPTOR_DIM)
                feats[s + 1 : e] = f[: e - s - 1].to(x.dtype)
            w = self.vq_adaptor.layers(feats)[None]
            mask = is_continuous_mask.to(x.device)[:, :, None]
            x = torch.where(mask, (x + w) * math.sqrt(2.0), x)
        if text_input_ids is not None and int(text_input_ids.sum()) != 0:
            x = x + self.embed_tokens(text_input_ids)
        cache: list[tuple] = []
        mimo = x
        for i, layer in enumerate(self.layers):
            x, present = layer(x, past_key_values[i] if past_key_values is not None else None)
            cache.append(present)
            if i == self.kimia_mimo_transformer_from_layer_index:
                mimo = x.clone()
        x = self.norm(x)
        for j, layer in enumerate(self.mimo_layers):
            past = past_key_values[len(self.layers) + j] if past_key_values is not None else None
            mimo, present = layer(mimo, past)
            cache.append(present)
        return x, self.mimo_norm(mimo), tuple(cache)


class KimiaForCausalLM(nn.Module):
    """`MoonshotKimiaForCausalLM`-like: `model`, text head `lm_head`, audio head `mimo_output`."""

    def __init__(self, cfg: Qwen2Config, media_begin: int, media_end: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = KimiaModel(cfg, media_begin, media_end)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mimo_output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids=None,
        text_input_ids=None,
        whisper_input_feature=None,
        is_continuous_mask=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        generation_mode=None,
        return_dict=None,
    ):
        hidden, mimo, cache = self.model(
            input_ids=input_ids,
            text_input_ids=text_input_ids,
            whisper_input_feature=whisper_input_feature,
            is_continuous_mask=is_continuous_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=False,
        )
        audio_logits, text_logits = self.mimo_output(mimo), self.lm_head(hidden)
        if return_dict:
            return {"logits": (audio_logits, text_logits), "past_key_values": cache}
        return audio_logits, text_logits, cache


class StandInKimiAudio:
    """`KimiAudio`-like wrapper with tiny random weights (see module docstring for what is faithful)."""

    def __init__(self, seed: int = 0, both_budget: int = 40, hidden: int = 32, layers: int = 4) -> None:
        torch.manual_seed(seed)
        self.kimia_token_offset = TEXT_VOCAB
        self.prompt_manager = PromptManager(self.kimia_token_offset)
        self.extra_tokens = self.prompt_manager.extra_tokens
        cfg = Qwen2Config(
            vocab_size=TEXT_VOCAB + AUDIO_VOCAB,
            hidden_size=hidden,
            intermediate_size=48,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            hidden_act="silu",
        )
        cfg.kimia_mimo_layers = 2
        cfg.kimia_mimo_transformer_from_layer_index = layers - 2
        cfg.kimia_token_offset = self.kimia_token_offset
        self.alm = KimiaForCausalLM(cfg, self.extra_tokens.media_begin, self.extra_tokens.media_end).eval()
        self.detokenizer: Any = object()  # present: speech output enabled
        self.kimia_text_audiodelaytokens = 6
        self.eod_ids = [self.extra_tokens.msg_end, self.extra_tokens.media_end]
        self.both_budget = both_budget

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
        logits = logits[:, -1].float()
        if temperature <= 1e-6:
            return logits.argmax(-1)
        vals, idx = torch.topk(torch.log_softmax(logits, -1) / temperature, top_k, dim=-1)
        return idx.gather(-1, torch.multinomial(F.softmax(vals, -1), 1)).squeeze(-1)

    @torch.inference_mode()
    def generate(
        self,
        chats: list[dict],
        output_type: str = "text",
        audio_temperature: float = 0.0,
        audio_top_k: int = 5,
        text_temperature: float = 0.0,
        text_top_k: int = 5,
        audio_repetition_penalty: float = 1.0,
        audio_repetition_window_size: int = 64,
        text_repetition_penalty: float = 1.0,
        text_repetition_window_size: int = 16,
        max_new_tokens: int = -1,
    ):
        assert output_type in ("text", "both")
        history = self.prompt_manager.get_prompt(chats, output_type=output_type)
        audio_ids, text_ids, mask = history.to_tensor()
        if output_type == "both":
            max_new_tokens = self.both_budget
        elif max_new_tokens == -1:
            max_new_tokens = 7500 - audio_ids.shape[1]
        dev = next(self.alm.parameters()).device  # real: torch.cuda.current_device()
        audio_ids, text_ids, mask = audio_ids.to(dev), text_ids.to(dev), mask.to(dev)
        x = self.extra_tokens
        feats = [f.to(dev) for f in history.continuous_feature]
        past = None
        text_out: list[int] = []
        audio_out: list[int] = []
        text_done = False
        for i in range(max_new_tokens):
            audio_logits, text_logits, past = self.alm.forward(  # called directly, as kimia.py does
                input_ids=audio_ids,
                text_input_ids=text_ids,
                whisper_input_feature=feats,
                is_continuous_mask=mask,
                position_ids=None,
                past_key_values=past,
                return_dict=False,
            )
            nxt_text = self._sample(text_logits, text_temperature, text_top_k)
            nxt_audio = self._sample(audio_logits, audio_temperature, audio_top_k)
            if text_done:
                nxt_text.fill_(x.kimia_text_blank)
            elif int(nxt_text) == x.kimia_text_eos:
                text_done = True
            else:
                text_out.append(int(nxt_text))
            if i < self.kimia_text_audiodelaytokens or output_type == "text":
                nxt_audio.fill_(x.kimia_text_blank)
            else:
                audio_out.append(int(nxt_audio))
            if (output_type == "text" and text_done) or (
                output_type == "both" and int(nxt_audio) in self.eod_ids
            ):
                break
            audio_ids, text_ids = nxt_audio.view(1, 1), nxt_text.view(1, 1)
            feats, mask = None, None
        wav_tokens = [t - self.kimia_token_offset for t in audio_out if t >= self.kimia_token_offset]
        text = self.detokenize_text([t for t in text_out if t < self.kimia_token_offset])
        wav = self.detokenize_audio(torch.tensor([wav_tokens])) if output_type == "both" else None
        return wav, text

    def detokenize_audio(self, audio_tokens: torch.Tensor) -> torch.Tensor:
        t = np.arange(SAMPLES_PER_TOKEN * 3 // 2) / 24000  # 80 ms of 24 kHz audio per 12.5 Hz token
        pieces = [0.1 * np.sin(2 * np.pi * (120 + 5 * int(k)) * t) for k in audio_tokens.reshape(-1)]
        return torch.from_numpy(np.concatenate(pieces) if pieces else np.zeros(0)).float()[None]

    def detokenize_text(self, text_tokens: list[int]) -> str:
        ids = []
        for t in text_tokens:
            if t == self.extra_tokens.kimia_text_eos:
                break
            ids.append(t)
        return self.prompt_manager.text_tokenizer.decode(ids)
