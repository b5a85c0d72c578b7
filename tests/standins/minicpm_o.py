"""Structural stand-in for MiniCPM-o 4.5's remote-code model `MiniCPMO` (see emotion_neurons.models.minicpm_o).

What matches the public code (MiniCPMO45/ in OpenBMB/MiniCPM-o-Demo):
- module paths: `llm` is a `Qwen3ForCausalLM` (`llm.model.layers.{i}.mlp.act_fn` ...), `apm` a Whisper
  encoder, `tts.model` a `LlamaModel` (`tts.model.layers.{i}.mlp`), `tts.emb_text`, `tts.emb_code[0]`,
  `tts.head_code[0]`, `tts.projector_semantic`, `tts.audio_tokenizer` (a `Token2wav`-like vocoder);
- the methods and argument names the adapter calls: `generate(input_ids, ..., audio_features,
  audio_feature_lens, audio_bounds, attention_mask, tokenizer, **kwargs) -> (texts, outputs)`,
  `streaming_prefill(session_id, msgs, omni_mode, ..., is_last_chunk)`, `streaming_generate(session_id, ...,
  generate_audio, max_new_tokens, enable_thinking, use_tts_template, do_sample, **kwargs)` yielding
  `(waveform [1, n], text)` or `(text, finished)`, `init_tts`, `init_token2wav_cache`, `reset_session`,
  `get_sys_prompt`, and a processor with the same call signature and outputs (left padding, audio bounds);
- the call pattern: prompt pieces reach `llm` as `inputs_embeds` (after `llm.model.embed_tokens(ids)`),
  the streaming bos string is one embeddings call, each generated token is looked up with
  `llm.get_input_embeddings()` right before the one-position call that feeds it, terminators are never fed;
  the TTS gets condition chunks as embeddings and one `emb_code[0]` lookup per fed audio code.
Simplified: the audio encoder features, TTS conditioning, sampling details and the vocoder (sine tones).
"""

from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel, Qwen3Config, Qwen3ForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from . import char_tokenizer

SPECIALS = [
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|tts_bos|>",
    "<|tts_eos|>",
    "<|spk_bos|>",
    "<|spk_eos|>",
    "<image>",
    "</image>",
    "</s>",
]
#: ChatML with the generation-prompt options of the real template (`enable_thinking`, `use_tts_template`)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% if use_tts_template is defined and use_tts_template %}<|tts_bos|>{% endif %}{% endif %}"
)
AUDIO_PATTERN = "<audio>./</audio>"
HOP = 160
N_MELS = 16
APM_FRAMES = 400  # fixed encoder window of mel frames (real Whisper: 3000 = 30 s); longer clips are windowed
POOL = 5


def build_tokenizer():
    return char_tokenizer(SPECIALS, CHAT_TEMPLATE, pad="<|endoftext|>", eos="<|im_end|>")


def num_audio_tokens(n_samples: int) -> int:
    """Placeholders per clip: mel frames -> stride-2 conv -> average pooling by 5."""
    frames = max(1, n_samples // HOP)
    cnn = (frames - 1) // 2 + 1
    return max(1, (cnn - POOL) // POOL + 1)


def mel_like(wave: np.ndarray) -> torch.Tensor:
    """[N_MELS, frames] log band energies of 10 ms frames (a cheap stand-in for log-mel features)."""
    frames = max(1, wave.size // HOP)
    w = np.zeros(frames * HOP, np.float32)
    w[: min(wave.size, w.size)] = wave[: w.size]
    bands = np.abs(w.reshape(frames, N_MELS, HOP // N_MELS)).mean(-1)
    return torch.from_numpy(np.log1p(100 * bands).T.astype(np.float32))


class Feature(dict):
    """Processor output; `.to()` moves nested tensors like the real `MiniCPMOBatchFeature`."""

    def to(self, device: Any) -> Feature:
        def move(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, list):
                return [move(x) for x in v]
            return v

        return Feature({k: move(v) for k, v in self.items()})


class StandInProcessor:
    """Same call signature and outputs as `MiniCPMOProcessor.__call__` for text + audio."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(
        self,
        text,
        images=None,
        audios=None,
        audio_parts=None,
        max_length=None,
        do_pad=True,
        max_slice_nums=None,
        use_image_id=True,
        stream_input=False,
        return_tensors="pt",
        sampling_rate=16000,
        online_streaming=False,
        audio_chunk_idx=0,
        is_last_chunk=False,
        **kwargs,
    ) -> Feature:
        texts = [text] if isinstance(text, str) else list(text)
        if audios is None:
            audios = [[] for _ in texts]
        elif isinstance(audios, np.ndarray):
            audios = [[audios]]
        elif audios and isinstance(audios[0], np.ndarray):
            audios = [list(audios)]
        tok = self.tokenizer
        start, end = tok.convert_tokens_to_ids("<|audio_start|>"), tok.convert_tokens_to_ids("<|audio_end|>")
        rows, bounds, feats, lens = [], [], [], []
        for t, clips in zip(texts, audios, strict=True):
            parts = t.split(AUDIO_PATTERN)
            if len(parts) - 1 != len(clips):
                raise ValueError(f"{len(parts) - 1} audio placeholders for {len(clips)} clips")
            s = parts[0]
            for clip, rest in zip(clips, parts[1:], strict=True):
                s += "<|audio_start|>" + "<unk>" * num_audio_tokens(len(clip)) + "<|audio_end|>" + rest
            ids = torch.tensor(tok.encode(s, add_special_tokens=False), dtype=torch.int32)
            starts = torch.nonzero(ids == start).flatten() + 1
            ends = torch.nonzero(ids == end).flatten()
            rows.append(ids)
            bounds.append(
                torch.stack([starts, ends], dim=-1) if len(starts) else torch.zeros((0, 2), dtype=torch.long)
            )
            row_feats = [mel_like(np.asarray(c, np.float32)) for c in clips]
            feats.extend(row_feats)
            lens.append(torch.tensor([f.shape[-1] for f in row_feats], dtype=torch.long))
        width = max(len(r) for r in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.int32)  # left padding with id 0
        attention_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, r in enumerate(rows):
            input_ids[b, width - len(r) :] = r
            attention_mask[b, width - len(r) :] = True
            bounds[b] = bounds[b] + (width - len(r))
        if feats:
            frames = max(f.shape[-1] for f in feats)
            audio_features = torch.zeros((len(feats), N_MELS, frames))
            for i, f in enumerate(feats):
                audio_features[i, :, : f.shape[-1]] = f
        else:
            audio_features = []
        empty = [[] for _ in rows]
        return Feature(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=empty,
            image_sizes=empty,
            image_bound=[torch.zeros((0, 2), dtype=torch.long) for _ in rows],
            tgt_sizes=empty,
            audio_bounds=bounds,
            spk_bounds=[torch.zeros((0, 2), dtype=torch.long) for _ in rows],
            audio_features=audio_features,
            audio_feature_lens=lens,
        )


class StandInToken2wav:
    """`stepaudio2.Token2wav`-like streaming vocoder: 24 kHz, 480 samples per speech token (sine tones)."""

    sample_rate = 24000
    hop = 480

    def __init__(self) -> None:
        self.cache: dict | None = {}
        self.stream_cache: Any = None
        self.hift_cache_dict: dict = {}
        self.prompts: list[str] = []

    def set_stream_cache(self, prompt_wav: str) -> tuple[dict, dict]:
        self.prompts.append(str(prompt_wav))
        self.stream_cache = {"prompt": str(prompt_wav)}
        self.hift_cache_dict = {"first_chunk": torch.ones(1, dtype=torch.long)}
        return self.stream_cache, self.hift_cache_dict

    def stream(self, generated_speech_tokens, prompt_wav=None, last_chunk=False, return_waveform=False):
        if self.stream_cache is None:
            raise ValueError("Call set_stream_cache(prompt_wav) before stream()")
        toks = [int(t) for t in generated_speech_tokens]
        t = np.arange(self.hop) / self.sample_rate
        pieces = [0.1 * np.sin(2 * np.pi * (100 + 10 * k) * t) for k in toks]
        wav = (np.concatenate(pieces) if pieces else np.zeros(0)).astype(np.float32)[None, :]
        return wav if return_waveform else (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()


class StandInTTS(nn.Module):
    """`MiniCPMTTS`-like: Llama backbone `model`, text/code embeddings, code head, semantic projector."""

    def __init__(self, llm_dim: int, text_vocab: int, hidden: int = 16, n_codes: int = 33) -> None:
        super().__init__()
        cfg = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            vocab_size=8,
        )
        self.model = LlamaModel(cfg)
        self.emb_text = nn.Embedding(text_vocab + 2, hidden)
        self.projector_semantic = nn.Linear(llm_dim, hidden)
        self.emb_code = nn.ModuleList([nn.Embedding(n_codes, hidden)])
        self.head_code = nn.ModuleList([nn.Linear(hidden, n_codes, bias=False)])
        self.num_audio_tokens = n_codes
        self.audio_bos_token_id = text_vocab
        self.config = SimpleNamespace(
            num_audio_tokens=n_codes,
            text_eos_token_id=text_vocab + 1,
            normalize_projected_hidden=True,
            audio_tokenizer_type="s3tokenizer",
        )
        self.audio_tokenizer: Any = None


class StandInMiniCPMO(nn.Module):
    """`MiniCPMO`-like model with tiny random weights (see module docstring for what is faithful)."""

    def __init__(self, seed: int = 0, with_tts: bool = True, hidden: int = 32, layers: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        tok = build_tokenizer()
        cfg = Qwen3Config(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=48,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            pad_token_id=0,
        )
        self.config = cfg
        self.llm = Qwen3ForCausalLM(cfg)
        self.apm = WhisperEncoder(
            WhisperConfig(
                num_mel_bins=N_MELS,
                d_model=16,
                encoder_layers=1,
                encoder_attention_heads=2,
                encoder_ffn_dim=32,
                max_source_positions=APM_FRAMES // 2,
            )
        )
        self.audio_avg_pooler = nn.AvgPool1d(POOL, stride=POOL)
        self.audio_projection_layer = nn.Linear(16, hidden)
        self.tts = StandInTTS(hidden, len(tok)) if with_tts else None
        self.processor = StandInProcessor(tok)
        self.terminators = ["<|im_end|>", "<|endoftext|>"]
        self.think_str = "<think>\\n\\n</think>\\n\\n"
        self.token2wav_cache: dict | None = None
        self.reset_session(reset_token2wav_cache=True)
        self.eval()

    # -- session / speech set-up ------------------------------------------------------------------------------
    def reset_session(self, reset_token2wav_cache: bool = True) -> None:
        self.llm_past_key_values = None
        self.session_id = None
        self.new_user_msg = True
        self.llm_generated = False
        if reset_token2wav_cache:
            self.token2wav_cache = None

    def init_tts(self, streaming: bool = False, model_dir=None, enable_float16=False, n_timesteps=10):
        self.tts.config.audio_tokenizer_type = "s3tokenizer_step_audio" if streaming else "s3tokenizer"
        self.tts.audio_tokenizer = StandInToken2wav()
        return self.tts.audio_tokenizer

    def init_token2wav_cache(self, prompt_speech_16k: np.ndarray) -> None:
        import soundfile as sf

        fd, path = tempfile.mkstemp(suffix=".wav")
        os.close(fd)
        try:
            sf.write(path, np.asarray(prompt_speech_16k, np.float32), 16000)
            flow, hift = self.tts.audio_tokenizer.set_stream_cache(path)
        finally:
            os.remove(path)
        self.token2wav_cache = {"flow_cache_base": dict(flow), "hift_cache_base": dict(hift)}

    @staticmethod
    def get_sys_prompt(ref_audio=None, mode="default", language="en"):
        if mode == "default" or ref_audio is None:
            return {"role": "system", "content": ["You are a helpful assistant who can listen and speak."]}
        return {
            "role": "system",
            "content": ["Clone the voice in the audio prompt.", ref_audio, "Assist the user."],
        }

    # -- embeddings ----------------------------------------------------------------------------------------------
    def get_vllm_embedding(self, data: dict) -> tuple[torch.Tensor, list]:
        return self.llm.model.embed_tokens(data["input_ids"]), [[] for _ in range(len(data["input_ids"]))]

    def _audio_embeds(self, feats: torch.Tensor, n_frames: int) -> torch.Tensor:
        states = []
        for w0 in range(0, n_frames, APM_FRAMES):
            w = min(APM_FRAMES, n_frames - w0)
            x = torch.zeros((1, N_MELS, APM_FRAMES), dtype=feats.dtype, device=feats.device)
            x[0, :, :w] = feats[:, w0 : w0 + w]
            states.append(self.apm(x).last_hidden_state[:, : (w - 1) // 2 + 1])
        states = torch.cat(states, dim=1)
        emb = self.audio_avg_pooler(self.audio_projection_layer(states).transpose(1, 2)).transpose(1, 2)[0]
        n = num_audio_tokens(n_frames * HOP)
        if emb.shape[0] < n:
            emb = torch.cat([emb, emb[-1:].expand(n - emb.shape[0], -1)])
        return emb[:n]

    def get_omni_embedding(
        self, data: dict, input_embeddings: torch.Tensor, chunk_length=-1, stream_input=False
    ):
        feats = data.get("audio_features", [])
        if len(feats) == 0:
            return input_embeddings
        clip = 0
        for b, (bounds, lens) in enumerate(
            zip(data["audio_bounds"], data["audio_feature_lens"], strict=True)
        ):
            for (s, e), n_frames in zip(bounds.tolist(), lens.tolist(), strict=True):
                emb = self._audio_embeds(feats[clip], int(n_frames))
                input_embeddings[b, s:e] = emb[: e - s].to(input_embeddings.dtype)
                clip += 1
        return input_embeddings

    # -- offline generation (chat path) ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        input_ids=None,
        pixel_values=None,
        tgt_sizes=None,
        audio_features=None,
        audio_feature_lens=None,
        image_bound=None,
        audio_bounds=None,
        spk_bounds=None,
        attention_mask=None,
        tokenizer=None,
        vision_hidden_states=None,
        stream=False,
        **kwargs,
    ):
        assert input_ids is not None and len(input_ids) == len(pixel_values)
        data = {
            "input_ids": input_ids,
            "audio_features": audio_features,
            "audio_feature_lens": audio_feature_lens,
            "audio_bounds": audio_bounds,
        }
        embeds, _ = self.get_vllm_embedding(data)
        embeds = self.get_omni_embedding(data, embeds)
        terminators = [tokenizer.convert_tokens_to_ids(t) for t in self.terminators]
        outputs = self.llm.generate(
            inputs_embeds=embeds,
            pad_token_id=0,
            eos_token_id=terminators,
            attention_mask=attention_mask,
            output_hidden_states=True,
            return_dict_in_generate=True,
            **kwargs,
        )
        texts = [
            tokenizer.decode(row[row != 0].tolist(), skip_special_tokens=True) for row in outputs.sequences
        ]
        return texts, outputs

    # -- streaming ---------------------------------------------------------------------------------------------
    def _cache_len(self) -> int:
        return 0 if self.llm_past_key_values is None else int(self.llm_past_key_values.get_seq_length())

    @torch.inference_mode()
    def streaming_prefill(
        self,
        session_id,
        msgs,
        omni_mode=True,
        max_slice_nums=None,
        use_tts_template=True,
        enable_thinking=False,
        is_last_chunk=False,
        **kwargs,
    ) -> str:
        assert session_id is not None and len(msgs) == 1
        msg = msgs[0]
        is_first = self.session_id is None or session_id != self.session_id
        clips, parts = [], []
        for c in msg["content"]:
            if isinstance(c, np.ndarray):
                clips.append(c)
                parts.append(AUDIO_PATTERN)
            elif isinstance(c, str):
                parts.append(c)
        contents = "".join(parts) if omni_mode else "\n".join(parts)
        if msg["role"] in ("system", "assistant"):
            self.new_user_msg = True
        if is_first:
            self.reset_session(reset_token2wav_cache=False)
            self.session_id = session_id
        if msg["role"] == "user":
            if self.new_user_msg:
                prompt = ("<|im_end|>\n" if self.llm_generated else "") + "<|im_start|>user\n" + contents
                self.new_user_msg = False
            else:
                prompt = contents
        else:
            prompt = self.processor.tokenizer.apply_chat_template(
                [{"role": msg["role"], "content": contents}],
                tokenize=False,
                add_generation_prompt=False,
                use_tts_template=use_tts_template,
                enable_thinking=enable_thinking,
            )
        inputs = self.processor(
            [prompt], [[]], [clips], online_streaming=msg["role"] == "user", is_last_chunk=is_last_chunk
        ).to(self.llm.device)
        embeds, _ = self.get_vllm_embedding(inputs)
        embeds = self.get_omni_embedding(inputs, embeds, stream_input=msg["role"] == "user")
        mask = torch.ones((1, self._cache_len() + embeds.shape[1]), dtype=torch.bool, device=embeds.device)
        out = self.llm(
            past_key_values=self.llm_past_key_values,
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=None,
            use_cache=True,
            return_dict=True,
        )
        self.llm_past_key_values = out.past_key_values
        return prompt

    def _tts_chunk(
        self, ids: torch.Tensor, hidden: torch.Tensor, finished: bool, state: dict, temperature: float
    ):
        tts = self.tts
        cond = tts.emb_text(ids) + F.normalize(tts.projector_semantic(hidden), p=2, dim=-1)
        tail = [tts.config.text_eos_token_id] if finished else []
        tail_ids = torch.tensor([tail + [tts.audio_bos_token_id]], device=ids.device)
        cond = torch.cat([cond, tts.emb_text(tail_ids)], dim=1)
        out = tts.model(inputs_embeds=cond, past_key_values=state.get("cache"), use_cache=True)
        codes: list[int] = []
        eos = tts.num_audio_tokens - 1
        for _ in range(2 * ids.shape[1] + 2):
            state["cache"] = out.past_key_values
            logits = tts.head_code[0](out.last_hidden_state[:, -1]).float() / temperature
            if len(codes) < 2:  # stand-in only: at least two codes per chunk, so every test run makes sound
                logits[:, eos] = float("-inf")
            code = torch.multinomial(F.softmax(logits, dim=-1), 1)  # [1, 1]
            if int(code) == eos:
                break
            codes.append(int(code))
            out = tts.model(
                inputs_embeds=tts.emb_code[0](code), past_key_values=state["cache"], use_cache=True
            )
        state["cache"] = out.past_key_values
        return codes

    @torch.inference_mode()
    def streaming_generate(
        self,
        session_id,
        bos_input=None,
        generate_audio=True,
        audio_token_chunk_size=25,
        tts_sampling_params=None,
        max_new_tokens=256,
        enable_thinking=False,
        use_tts_template=True,
        do_sample=True,
        **kwargs,
    ):
        tok = self.processor.tokenizer
        self.new_user_msg = True
        self.llm_generated = True
        if generate_audio:
            if self.token2wav_cache is None:
                raise RuntimeError("init_token2wav_cache() was not called")
            self.tts.audio_tokenizer.stream_cache = dict(self.token2wav_cache["flow_cache_base"])
        terminators = {tok.convert_tokens_to_ids(t) for t in ("<|tts_eos|>", "<|im_end|>", "</s>")}
        if bos_input is None:
            bos_input = (
                "<|im_end|>\n<|im_start|>assistant\n"
                + ("" if enable_thinking else self.think_str.replace("\\n", "\n"))
                + ("<|tts_bos|>" if use_tts_template else "")
            )
        bos_ids = torch.tensor([tok.encode(bos_input, add_special_tokens=False)], device=self.llm.device)
        current = self.llm.get_input_embeddings()(bos_ids)
        temperature = float(kwargs.get("temperature", 0.7))
        chunk_ids: list[torch.Tensor] = []
        chunk_hidden: list[torch.Tensor] = []
        tts_state: dict = {}
        finished = False
        for _ in range(max_new_tokens):
            out = self.llm(
                inputs_embeds=current,
                past_key_values=self.llm_past_key_values,
                use_cache=True,
                output_hidden_states=True,
            )
            self.llm_past_key_values = out.past_key_values
            logits = out.logits[:, -1].float()
            if do_sample:
                nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            if int(nxt) in terminators:  # a terminator is never fed back
                finished = True
                break
            chunk_ids.append(nxt)
            chunk_hidden.append(out.hidden_states[-1][:, -1:])
            current = self.llm.get_input_embeddings()(nxt)
            if len(chunk_ids) == 10:
                yield from self._flush(chunk_ids, chunk_hidden, False, generate_audio, tts_state)
                chunk_ids, chunk_hidden = [], []
        yield from self._flush(chunk_ids, chunk_hidden, True, generate_audio, tts_state, finished)

    def _flush(self, ids, hidden, last, generate_audio, tts_state, finished=False):
        tok = self.processor.tokenizer
        text = tok.decode(torch.cat(ids, dim=1)[0].tolist()) if ids else ""
        if not generate_audio:
            if ids or last:
                yield text, last and finished
            return
        codes = (
            self._tts_chunk(torch.cat(ids, dim=1), torch.cat(hidden, dim=1), last, tts_state, 0.8)
            if ids
            else []
        )
        wav = self.tts.audio_tokenizer.stream(codes, prompt_wav=None, last_chunk=last, return_waveform=True)
        if wav.shape[-1] or text:
            yield torch.from_numpy(wav), text
