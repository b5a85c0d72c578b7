"""Emotion-sensitive neurons in large audio-language models: capture, select, intervene."""

__version__ = "0.1.0"

SPANS: tuple[str, ...] = ("audio", "text", "generated", "prefix")
"""Token spans recorded per instance; the index of a span is its code in span-code tensors.

`prefix`: prompt positions before the first audio token (system prompt, chat template). Under causal attention
they see no audio, so they are identical for every instance of a task; recorded, not counted in P by default
(METHOD.md section 4). Appended last so the codes of the other spans stay as they were."""
