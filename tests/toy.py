"""A toy adapter over a tiny random Qwen2 causal LM: fast unit tests of the generic hook machinery."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from emotion_neurons.models.base import ModelAdapter, Prepared
from emotion_neurons.types import GenerationOutput, GenerationSettings, Instance

AUDIO_ID, PAD_ID, EOS_ID = 5, 0, 2


class ToyAdapter(ModelAdapter):
    """Text LM where 'audio' becomes a run of AUDIO_ID tokens (one per 1600 samples) before the prompt."""

    name = "toy"
    components = {"thinker": r"^model\.layers\.(\d+)\.mlp$"}

    def __init__(self, eos_id: int = EOS_ID) -> None:
        super().__init__()
        self.eos_id = eos_id

    def load(self, model_id="", revision=None, device="cpu", dtype="float32") -> None:
        torch.manual_seed(0)
        cfg = Qwen2Config(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
            bos_token_id=1, tie_word_embeddings=False,
        )
        self.model = Qwen2ForCausalLM(cfg).eval()

    def tokens(self, inst: Instance, audio: np.ndarray) -> list[int]:
        n_audio = max(1, len(audio) // 1600)
        return [1] + [AUDIO_ID] * n_audio + [10 + (ord(c) % 50) for c in inst.prompt]

    def option_token_ids(self, n: int) -> list[int]:
        """The toy's token of each option number, as `tokens` encodes the character (no tokenizer)."""
        return [10 + (ord(str(k)) % 50) for k in range(1, n + 1)]

    def prepare(self, instances, audios) -> Prepared:
        seqs = [self.tokens(i, a) for i, a in zip(instances, audios, strict=True)]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), PAD_ID)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, T - len(s) :] = torch.tensor(s)
            att[b, T - len(s) :] = 1
        codes = self.span_codes_from_ids(ids, att, [AUDIO_ID])
        return Prepared({"input_ids": ids, "attention_mask": att}, codes, list(instances))

    def generate(self, prepared, settings: GenerationSettings):
        out = self.model.generate(
            **prepared.inputs, max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=PAD_ID,
            eos_token_id=self.eos_id,
        )
        self.last_sequences = out
        gen = out[:, prepared.inputs["input_ids"].shape[1] :]
        res = []
        for row in gen.tolist():
            n = row.index(self.eos_id) if self.eos_id in row else len(row)
            res.append(GenerationOutput(text=" ".join(map(str, row[:n])), n_generated=n))
        return res

    def decoder_root(self, component):
        return self.model

    @property
    def stop_token_ids(self):
        return [self.eos_id]

    @property
    def pad_token_id(self):
        return PAD_ID
