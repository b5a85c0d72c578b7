"""A tiny, randomly initialised Audio Flamingo 3 checkpoint for offline tests.

It is an instance of the real `transformers.AudioFlamingo3ForConditionalGeneration` (Whisper-style encoder,
projector, Qwen2 LM) saved with the real `AudioFlamingo3Processor`, so the adapter, hooks and pipeline run the
same code paths as `nvidia/audio-flamingo-3-hf`, in well under a second per instance on CPU. What mirrors the
real checkpoint (transformers `convert_audioflamingo3_to_hf.py`): the processor chat template (audio first as
`<sound>`, then the text), a Qwen2 byte-level BPE tokenizer with `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`
and `<sound>`, `WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)` with 30 s windows,
`text_config.use_cache=False`, and a sampling generation config (do_sample, temperature 0.7, repetition
penalty 1.05, EOS = [<|im_end|>, <|endoftext|>], pad = <|endoftext|>) that the adapter must override for greedy
decoding. Sizes are chosen for speed, not quality.
"""

from __future__ import annotations

import pathlib

from . import seeded_out_dir
from .tokenizer import train_qwen2_tokenizer, training_corpus

#: special tokens the processor, chat template and generation config of the real checkpoint use
AF3_SPECIALS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>")
AUDIO_TOKEN = "<sound>"

#: words that must be single tokens (SER answer parsing, emotion names in prompts)
SINGLE_TOKEN_WORDS: tuple[str, ...] = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "neutral", "angry", "happy", "sad", "surprise", "anger", "happiness", "sadness", "frustration",
)  # fmt: skip

_CORPUS: tuple[str, ...] = (
    "What emotion does the speaker express in this audio? Choose one option.\n\n1. {e}\n2. neutral\n\n"
    "Answer with the number of the option only.",
    "The answer is {e}. The speaker sounds {e}, not neutral.",
    "You are a helpful assistant.",
    "system\nuser\nassistant\n",
)

SEED = 1234
#: byte alphabet (256) + learned merges; the specials come after
VOCAB_TARGET = 448

#: the processor chat template of nvidia/audio-flamingo-3-hf (transformers
#: `models/audioflamingo3/convert_audioflamingo3_to_hf.py`, `write_processor`): one `<sound>` at the start of a
#: user turn that holds audio, whatever the order of the content items, then the concatenated text items
AF3_PROCESSOR_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}"
    "{{ m['content'] }}"
    "{% else %}"
    "{% set audio = namespace(found=False) %}"
    "{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}"
    "{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}"
    "{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)
#: the tokenizer's own (text-only) chat template from the same converter
AF3_TOKENIZER_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def build_tokenizer():  # -> transformers.Qwen2Tokenizer
    """The tiny Qwen2 byte-level BPE (`tiny.tokenizer`) with the AF3 specials and tokenizer chat template."""
    # both word forms the Qwen pre-tokenizer produces: "word" (text start / after newline) and " word"
    corpus = training_corpus(SINGLE_TOKEN_WORDS, _CORPUS, "{w} {w}. {W} {w}\n{w}")
    tok = train_qwen2_tokenizer(
        corpus, vocab_size=VOCAB_TARGET, single_token_words=SINGLE_TOKEN_WORDS, added_specials=AF3_SPECIALS
    )
    tok.chat_template = AF3_TOKENIZER_CHAT_TEMPLATE
    return tok


def _config(tok):  # -> transformers.AudioFlamingo3Config
    """Tiny encoder + Qwen2 LM with the token ids of the tiny tokenizer."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3EncoderConfig, Qwen2Config

    ids = {t: int(tok.convert_tokens_to_ids(t)) for t in AF3_SPECIALS}
    audio = AudioFlamingo3EncoderConfig(
        num_mel_bins=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_size=32,
        max_source_positions=1500,  # 30 s windows of 3000 mel frames, halved by conv2 (as the real encoder)
    )
    text = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        use_cache=False,  # as the converter writes it; generation must ask for the cache explicitly
        # a wider init than 0.02 so that logits of the random LM are well separated and depend on the audio
        initializer_range=0.2,
    )
    return AudioFlamingo3Config(audio_config=audio, text_config=text, audio_token_id=ids[AUDIO_TOKEN])


def build(out_dir: pathlib.Path) -> pathlib.Path:
    """Build and save the tiny checkpoint into `out_dir` (deterministic for a given torch/transformers)."""
    import torch
    from transformers import (
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
        GenerationConfig,
        WhisperFeatureExtractor,
    )

    out_dir = seeded_out_dir(out_dir, SEED)

    tok = build_tokenizer()
    config = _config(tok)
    model = AudioFlamingo3ForConditionalGeneration(config).to(torch.float32).eval()
    ids = {t: int(tok.convert_tokens_to_ids(t)) for t in AF3_SPECIALS}
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        do_sample=True,
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        repetition_penalty=1.05,
        temperature=0.7,
        top_k=20,
        top_p=0.8,
    )
    model.save_pretrained(out_dir)

    processor = AudioFlamingo3Processor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
        tokenizer=tok,
        chat_template=AF3_PROCESSOR_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir
