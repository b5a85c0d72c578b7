"""Small structural stand-ins for models that cannot be installed here (MiniCPM-o 4.5, Kimi-Audio).

Each stand-in is written for these tests (no upstream code is copied). It reproduces what an adapter relies
on according to the public code cited in the adapter's docstring: module paths in `named_modules()`,
method and argument names, return types and the pattern of forward calls into the hooked decoders. The
decoder MLPs are real transformers modules, so hooks, capture and interventions run for real on CPU.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def char_tokenizer(
    specials: list[str], chat_template: str | None = None, pad: str | None = None, eos: str | None = None
) -> PreTrainedTokenizerFast:
    """Character-level fast tokenizer: `specials` first (ids 0..), then printable ASCII and newline."""
    chars = [c for c in string.printable[:95] + "\n" if c not in specials]
    vocab = {tok: i for i, tok in enumerate(list(specials) + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=specials[0],
        pad_token=pad,
        eos_token=eos,
        additional_special_tokens=list(specials[1:]),
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
