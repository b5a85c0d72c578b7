"""A tiny, randomly initialised Qwen2.5-Omni checkpoint for offline tests.

It is an instance of the real `transformers.Qwen2_5OmniForConditionalGeneration` (thinker + talker + token2wav)
so the adapter, hooks and pipeline run the same code paths as the 7B model, in well under a second per
instance on CPU. Alongside the weights it saves what `QwenOmniAdapter.load` reads from a real checkpoint:
a Qwen2 byte-level BPE tokenizer (trained here on a small corpus), a `WhisperFeatureExtractor(feature_size=128)`
and `spk_dict.pt` in the real format `{speaker: {"cond", "ref_mel", "bos_token"}}` (read by
`Qwen2_5OmniForConditionalGeneration.load_speakers`, consumed in its `generate`).
"""

from __future__ import annotations

import pathlib

from . import seeded_out_dir
from .tokenizer import train_qwen2_tokenizer, training_corpus

#: special tokens of the real Qwen2.5-Omni tokenizer that the adapter and the model use
QWEN_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
)
#: ids the talker embeds through the thinker's embedding table (unnamed reserved ids in the real vocabulary;
#: named here so that every thinker id decodes)
TTS_SPECIALS: tuple[str, ...] = ("<|tts_text_pad|>", "<|tts_text_bos|>", "<|tts_text_eos|>")
#: speakers of the real checkpoint (Chelsie is the default of `generate`)
SPEAKERS: tuple[str, ...] = ("Chelsie", "Ethan")

#: words that must be single tokens (answer parsing of SER, emotion names of EVC prompts)
SINGLE_TOKEN_WORDS: tuple[str, ...] = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "neutral", "angry", "happy", "sad", "surprise", "surprised",
    "anger", "happiness", "sadness", "frustration",
)  # fmt: skip

_CORPUS: tuple[str, ...] = (
    "Repeat the audio word-for-word exactly. Speak with {e} emotion. Do not add or remove any words. "
    "Output speech only.",
    "What is the emotion of the speaker? Choose one of the options: 1. {e} 2. neutral. "
    "Answer with the number or the emotion word.",
    "The answer is {e}. The speaker sounds {e}, not neutral.",
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech.",
    "system\nuser\nassistant\n",
)

SEED = 1234
VOCAB_TARGET = 512  # byte alphabet (256) + learned merges; specials come after


def build_tokenizer():  # -> transformers.Qwen2Tokenizer
    """The tiny Qwen2 byte-level BPE (`tiny.tokenizer`) with the Qwen2.5-Omni, TTS and speaker specials."""
    # both word forms the Qwen pre-tokenizer produces: "word" (text start) and " word"
    corpus = training_corpus(SINGLE_TOKEN_WORDS, _CORPUS, "{w} {w}. {W} {w}")
    tok = train_qwen2_tokenizer(
        corpus,
        vocab_size=VOCAB_TARGET,
        single_token_words=SINGLE_TOKEN_WORDS,
        added_specials=QWEN_SPECIALS + TTS_SPECIALS + tuple(f"<|spk_{s}|>" for s in SPEAKERS),
        trainer_specials=["<|endoftext|>"],
    )
    tok.padding_side = "left"
    return tok


def _configs(
    tok,
    hidden: int = 32,
    layers: int = 3,
    intermediate: int = 64,
    audio_layers: int = 1,
    audio_d_model: int = 32,
    init_range: float | None = None,
) -> dict:
    """Tiny sub-configs with the token ids of the tiny tokenizer; sizes chosen for speed, not quality.

    The defaults are the random tiny model; the trained miniature (`tiny.miniature`) passes its own sizes.
    """
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS + TTS_SPECIALS}
    vocab = len(tok)
    heads = 4
    head_dim = hidden // heads
    # mrope sections sum to head_dim // 2 (8 -> [2, 1, 1], 16 -> [4, 2, 2])
    quarter = head_dim // 8
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2 * quarter, quarter, quarter]}
    # multimodal placeholder / delimiter ids, the same in the thinker and the talker config
    modal_ids = {
        "audio_token_index": ids["<|AUDIO|>"],
        "image_token_index": ids["<|IMAGE|>"],
        "video_token_index": ids["<|VIDEO|>"],
        "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"],
        # read by get_rope_index but not declared by the config class (ENVIRONMENT.md)
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
    }
    thinker = {
        "audio_config": {
            "num_mel_bins": 128,
            "encoder_layers": audio_layers,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 2 * audio_d_model,
            "d_model": audio_d_model,
            "output_dim": hidden,
            "n_window": 100,
            "max_source_positions": 1500,
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "text_config": {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": rope,
            "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "tie_word_embeddings": True,
            # larger random weights so greedy answers depend on the input (a demo needs some variety)
            "initializer_range": INIT_RANGE if init_range is None else init_range,
        },
        **modal_ids,
        "user_token_id": tok.convert_tokens_to_ids("user") if "user" in tok.get_vocab() else 0,
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    n_codes = 32  # codec vocabulary: 28 acoustic codes + pad, bos, eos, mask
    talker = {
        "vocab_size": n_codes,
        "tts_codec_pad_token_id": n_codes - 4,
        "tts_codec_start_token_id": n_codes - 3,
        "tts_codec_end_token_id": n_codes - 2,
        "tts_codec_mask_token_id": n_codes - 1,
        "tts_text_pad_token_id": ids["<|tts_text_pad|>"],
        "tts_text_start_token_id": ids["<|tts_text_bos|>"],
        "tts_text_end_token_id": ids["<|tts_text_eos|>"],
        **modal_ids,
        "embedding_size": hidden,  # the talker embeds thinker hidden states
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 1, 1]},
        "pad_token_id": n_codes - 4,
    }
    mel_dim = 20
    token2wav = {
        "dit_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 16,
            "ff_mult": 2,
            "emb_dim": 16,
            # caps the codes token2wav accepts (max_position_embeddings // repeats); the adapter caps the talker
            # at this many codes so an untrained talker that never emits EOS stays cheap
            "max_position_embeddings": 256,
            "block_size": 24,
            "look_ahead_layers": [1],
            "look_backward_layers": [0],
            "repeats": 2,
            "num_embeds": n_codes,  # every codec id the random talker may emit must embed
            "mel_dim": mel_dim,
            "dropout": 0.0,
            "enc_emb_dim": 16,
            "enc_dim": 16,
            "enc_channels": [16, 16, 16, 32],  # last == sum of the middle entries
            "enc_kernel_sizes": [5, 3, 3, 1],
            "enc_dilations": [1, 2, 3, 1],
            "enc_attention_channels": 8,
            "enc_res2net_scale": 2,
            "enc_se_channels": 8,
        },
        "bigvgan_config": {
            "mel_dim": mel_dim,
            "upsample_initial_channel": 32,
            "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]],
            "upsample_rates": [8, 6, 5],  # 240 samples per mel frame, as the real (5,3,2,2,2,2): 24 kHz
            "upsample_kernel_sizes": [16, 12, 11],
        },
    }
    return {"thinker_config": thinker, "talker_config": talker, "token2wav_config": token2wav}


INIT_RANGE = 1.0
VOCODER_GAIN = 1.0


def _audible_vocoder(bigvgan, seed: int) -> None:
    """Re-draw the vocoder's conv weights at fan-in scale: with the default std 0.02 the signal dies out
    through the tiny BigVGAN (about -90 dBFS, judged silent), while real checkpoints produce speech levels."""
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bigvgan.named_parameters():
            if p.ndim == 3:
                fan_in = (p.shape[0] if name.startswith("ups") else p.shape[1]) * p.shape[2]
                p.copy_(torch.randn(p.shape, generator=gen) * VOCODER_GAIN / math.sqrt(fan_in))


def build(out_dir: pathlib.Path, seed: int = SEED, **sizes) -> pathlib.Path:
    """Build and save the tiny checkpoint into `out_dir` (deterministic for a given torch/transformers).

    `sizes` go to `_configs` (the random tiny model uses its defaults)."""
    import torch
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor
    from transformers.utils import logging as hf_logging

    from ..models.qwen_omni import QWEN_OMNI_CHAT_TEMPLATE

    out_dir = seeded_out_dir(out_dir, seed)

    tok = build_tokenizer()
    tok.chat_template = QWEN_OMNI_CHAT_TEMPLATE
    # the talker config holds thinker-vocabulary ids (tts text tokens), which transformers warns about for
    # the real 7B config too; silence that noise while building
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = Qwen2_5OmniConfig(**_configs(tok, **sizes), enable_audio_output=True)
        model = Qwen2_5OmniForConditionalGeneration(config).to(torch.float32).eval()
        _audible_vocoder(model.token2wav.code2wav_bigvgan_model, seed)
        model.save_pretrained(out_dir)
    finally:
        hf_logging.set_verbosity(verbosity)
    tok.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(out_dir)

    dit = config.token2wav_config.dit_config
    gen = torch.Generator().manual_seed(seed)
    spk = {
        name: {
            "cond": torch.randn(1, dit.enc_emb_dim, generator=gen),
            "ref_mel": torch.randn(1, 30, dit.mel_dim, generator=gen),
            "bos_token": int(tok.convert_tokens_to_ids(f"<|spk_{name}|>")),
        }
        for name in SPEAKERS
    }
    torch.save(spk, out_dir / "spk_dict.pt")
    return out_dir
