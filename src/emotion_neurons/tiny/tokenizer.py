"""The tiny Qwen2 byte-level BPE tokenizer shared by the tiny Qwen2.5-Omni and Audio Flamingo 3 checkpoints.

Both real checkpoints use a Qwen2 tokenizer; the tiny ones train a small byte-level BPE with Qwen2's
pre-tokenizer on a corpus in which the words that must be single tokens dominate, then wrap it as the real
`transformers.Qwen2Tokenizer` class. Each builder passes its own words, prompt templates and special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence


def training_corpus(words: Sequence[str], templates: Sequence[str], word_line: str) -> list[str]:
    """Training lines: `word_line` 50 times per word, then every template (`{e}` = word) twice per word.

    `word_line` is formatted with `w` (the word) and `W` (it capitalised); it should hold both word forms the
    Qwen pre-tokenizer produces, "word" (text start) and " word". The required words dominate the counts so
    BPE merges them into whole tokens first.
    """
    lines: list[str] = []
    for w in words:
        lines.extend([word_line.format(w=w, W=w.capitalize())] * 50)
    for _ in range(2):
        for w in words:
            lines.extend(t.format(e=w) for t in templates)
    lines.append("0 1 2 3 4 5 6 7 8 9 10")
    return lines


def train_qwen2_tokenizer(
    corpus: Iterable[str],
    *,
    vocab_size: int,
    single_token_words: Sequence[str],
    added_specials: Sequence[str],
    trainer_specials: Sequence[str] = (),
):  # -> transformers.Qwen2Tokenizer
    """Train a byte-level BPE with Qwen2's pre-tokenizer, then wrap it as the real `Qwen2Tokenizer` class.

    `vocab_size`: byte alphabet (256) + learned merges (+ `trainer_specials`, which the trainer puts first);
    `added_specials` are added after, as special tokens, in order. EOS is `<|im_end|>`, pad `<|endoftext|>`.
    Raises RuntimeError when a word of `single_token_words` (as "word" or " word") or a digit is not one token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(trainer_specials),
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # the single-token words must be whole tokens in both forms, whatever the trainer's ranking did
    for w in single_token_words:
        for form in (w, "\u0120" + w):
            if form not in vocab:
                raise RuntimeError(f"tiny tokenizer: {form!r} did not become a token; enlarge VOCAB_TARGET")
    for d in "0123456789":
        if d not in vocab:
            raise RuntimeError(f"tiny tokenizer: digit {d!r} is not a token")

    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added_specials])
    return tok
