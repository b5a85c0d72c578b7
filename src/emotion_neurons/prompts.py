"""Prompts of both tasks and the SER answer parser (METHOD.md section 5)."""

from __future__ import annotations

import hashlib
import random
import re

NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

#: Word forms accepted for a label when the model answers with a word instead of a number.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "angry": ("angry", "anger"),
    "anger": ("anger", "angry"),
    "happy": ("happy", "happiness", "joy"),
    "happiness": ("happiness", "happy", "joy"),
    "sad": ("sad", "sadness"),
    "sadness": ("sadness", "sad"),
    "surprise": ("surprise", "surprised"),
    "surprised": ("surprised", "surprise"),
    "neutral": ("neutral",),
    "frustration": ("frustration", "frustrated"),
}


def evc_prompt(template: str, target_word: str) -> str:
    if "{target_emotion}" not in template:
        raise ValueError("tasks.evc.prompt must contain the placeholder {target_emotion}")
    return template.format(target_emotion=target_word)


def option_order(labels: list[str], instance_key: str, seed: int) -> list[str]:
    """A random but reproducible option order per sample (independent of Python's hash seed)."""
    digest = hashlib.sha256(f"{seed}:{instance_key}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    order = list(labels)
    rng.shuffle(order)
    return order


def ser_prompt(template: str, options: list[str]) -> str:
    if "{options}" not in template:
        raise ValueError("tasks.ser.prompt must contain the placeholder {options}")
    listing = "\n".join(f"{i}. {o}" for i, o in enumerate(options, 1))
    return template.format(options=listing)


def parse_answer(text: str, options: list[str]) -> str:
    """Map a free-text answer to an option: a digit first, then a spelled number, then an emotion word.

    Returns "" when nothing matches (counted as wrong, never as a guess).
    """
    low = text.lower()
    for m in re.finditer(r"(?<!\d)(\d+)(?!\d)", low):
        k = int(m.group(1))
        if 1 <= k <= len(options):
            return options[k - 1]
    words = re.findall(r"[a-z]+", low)
    for w in words:
        if w in NUMBER_WORDS:
            k = NUMBER_WORDS.index(w) + 1
            if k <= len(options):
                return options[k - 1]
    for w in words:
        for opt in options:
            if w in SYNONYMS.get(opt, (opt.lower(),)):
                return opt
    return ""
