"""Emotion-sensitive neurons in large audio-language models: capture, select, intervene."""

__version__ = "0.1.0"

SPANS: tuple[str, ...] = ("audio", "text", "generated")
"""Token spans recorded per instance; the index of a span is its code in span-code tensors."""
