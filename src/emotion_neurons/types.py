"""Plain data records shared by the stages (no torch, so judges and filters import them cheaply)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Instance:
    """One model call: EVC = (source utterance, target emotion); SER = (utterance, question)."""

    id: str
    task: str  # "evc" | "ser"
    wav: str
    speaker: str
    emotion: str  # emotion of the source audio (the gold label for SER)
    split: str  # "ident" | "eval"
    prompt: str
    text: str = ""  # reference transcript of the source audio
    target: str = ""  # EVC target emotion ("" for SER)
    options: list[str] = field(default_factory=list)  # SER option order shown to the model

    @property
    def group(self) -> str:
        """Emotion whose statistics this instance feeds: the EVC target, or the SER gold label."""
        return self.target if self.task == "evc" else self.emotion

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Instance:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if isinstance(known.get("options"), str):
            known["options"] = [o for o in known["options"].split("|") if o]
        return cls(**known)


@dataclass
class GenerationSettings:
    """Decoding settings that determine the recorded statistics (part of the stage-1 cache key)."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 0.0
    want_audio: bool = False
    speaker: str = ""  # voice of the speech decoder, when the model has one
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationOutput:
    text: str
    wav: Any = None  # 1-D float32 numpy array, or None for text-only models/tasks
    sample_rate: int = 0
    n_generated: int = 0
    #: SER: probability of each option at the first generated step (its number's and its words' first tokens),
    #: renormalised over the options; None when the adapter does not record it
    option_probs: dict[str, float] | None = None
