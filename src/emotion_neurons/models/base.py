"""The one interface every model adapter implements.

An adapter knows how to load a model, turn audio + prompt into model inputs, generate, and where its decoder
MLPs are. Everything hook-related (capture, intervention) is generic and lives in `emotion_neurons.hooks`;
an adapter only names module regexes and the token ids that delimit spans.
"""

from __future__ import annotations

import os
import pathlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..sites import HOOK_SITES
from ..types import GenerationOutput, GenerationSettings, Instance

#: Hook sites inside one SwiGLU MLP (METHOD.md section 2, `emotion_neurons.sites`): (submodule, hook kind).
#: "forward" hooks see/replace the submodule output; "pre" hooks see/replace its first input.
SITE_SUBMODULES: dict[str, tuple[str, str]] = {k: (s.submodule, s.kind) for k, s in HOOK_SITES.items()}


@dataclass
class Prepared:
    """Model inputs for one batch plus the span code of every prompt position.

    `span_codes` is [B, T] int64 on the model's input device: index into `emotion_neurons.SPANS`
    (0 audio, 1 text, 3 prefix) for real positions, -1 for padding.
    """

    inputs: dict[str, Any]
    span_codes: torch.Tensor
    instances: list[Instance] = field(default_factory=list)


@dataclass
class LayerSite:
    layer: int
    name: str  # full module name in named_modules()
    module: torch.nn.Module
    kind: str  # "forward" | "pre"


class ModelAdapter(ABC):
    """Base class. Subclasses set the class attributes and implement the abstract methods."""

    #: Declaration: `name`, `tasks`, `env`, `hook_sites`, `components` (its keys) and `max_audio_seconds` are
    #: plain literals in the class body, read without importing torch (`emotion_neurons.models.declare`).
    #: registry name used in config.yaml (`model.adapter`)
    name: str = ""
    #: tasks this model supports ("evc" needs speech output)
    tasks: tuple[str, ...] = ("ser",)
    #: environment file under envs/ (without .yaml) that can run this adapter (the GPU rules' `conda:`)
    env: str = ""
    #: hook sites (`emotion_neurons.sites.HOOK_SITES`) this adapter supports; None = all of them
    hook_sites: tuple[str, ...] | None = None
    #: sample rate the model's audio encoder expects
    input_sample_rate: int = 16000
    #: component -> regex matching the full names of that component's decoder MLP modules; group 1 = layer index
    components: dict[str, str] = {}
    #: whether left-padded batched generation is supported
    supports_batching: bool = True
    #: longest audio (seconds) the model takes in whole; longer input would be cut, so preparation skips or
    #: refuses it (`data.on_too_long`). None = no known limit. A plain literal: the Snakefile reads it without
    #: importing torch (`config.adapter_input_window`).
    max_audio_seconds: float | None = None

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.device: torch.device = torch.device("cpu")

    # -- loading -------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self, model_id: str, revision: str | None = None, device: str = "auto", dtype: str = "auto") -> None:
        """Load weights from a hub id or a local directory; set `self.model` and `self.device`."""

    # -- inputs / generation -------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, instances: list[Instance], audios: list[np.ndarray]) -> Prepared:
        """Build left-padded batch inputs; audios are mono float32 at `input_sample_rate`."""

    @abstractmethod
    def generate(self, prepared: Prepared, settings: GenerationSettings) -> list[GenerationOutput]:
        """Generate for a prepared batch (greedy unless settings say otherwise)."""

    @abstractmethod
    def decoder_root(self, component: str) -> torch.nn.Module:
        """Module whose forward receives `input_ids` for every step of `component`'s generation.

        The span tracker puts a forward pre-hook on it to learn, per call, which positions are prompt,
        generated or padding, without host synchronisation.
        """

    @property
    @abstractmethod
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generated sequence of the hooked component (EOS / end-of-turn)."""

    @property
    def pad_token_id(self) -> int | None:
        return None

    def component_stop_token_ids(self, component: str) -> list[int]:
        """Stop ids of `component`'s own vocabulary (a speech decoder stops on codec ids)."""
        return list(self.stop_token_ids)

    def prefill_span_codes(self, component: str, prepared: Prepared) -> torch.Tensor:
        """Span codes of `component`'s prefill call (a speech decoder may see extra positions)."""
        return prepared.span_codes

    # -- hook sites ----------------------------------------------------------------------------------------
    def resolve_sites(self, component: str = "thinker", site: str = "gate") -> list[LayerSite]:
        """Resolve hook modules by regex over `named_modules()`, ordered by layer index."""
        if self.model is None:
            raise RuntimeError("model not loaded")
        if component not in self.components:
            raise KeyError(f"component {component!r} not available for {self.name}; have {sorted(self.components)}")
        if site not in SITE_SUBMODULES:
            raise KeyError(f"hook_site {site!r} unknown; expected one of {sorted(SITE_SUBMODULES)}")
        sub, kind = SITE_SUBMODULES[site]
        pattern = re.compile(self.components[component].rstrip("$") + r"\." + re.escape(sub) + "$")
        found: dict[int, LayerSite] = {}
        seen_ids: dict[int, str] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            m = pattern.match(name)
            if not m:
                continue
            layer = int(m.group(1))
            if id(module) in seen_ids:
                raise RuntimeError(
                    f"module {name} is shared with {seen_ids[id(module)]}; per-layer hooks would be ambiguous"
                )
            seen_ids[id(module)] = name
            found[layer] = LayerSite(layer, name, module, kind)
        if not found:
            raise RuntimeError(
                f"no module of {self.name} matches {pattern.pattern!r} (component={component}, site={site})"
            )
        layers = sorted(found)
        if layers != list(range(len(layers))):
            raise RuntimeError(f"layer indices of {pattern.pattern!r} are not contiguous: {layers}")
        return [found[i] for i in layers]

    def n_neurons(self, component: str = "thinker") -> int:
        sites = self.resolve_sites(component, "pre_act")
        return int(sites[0].module.out_features)

    def device_map(self) -> dict[str, str]:
        """Which device holds which module (recorded in store attributes for multi-GPU runs)."""
        hf_map = getattr(self.model, "hf_device_map", None)
        if hf_map:
            return {k: str(v) for k, v in hf_map.items()}
        return {"": str(self.device)}

    # -- helpers -------------------------------------------------------------------------------------------
    @staticmethod
    def check_batch(instances: list[Instance], audios: list[np.ndarray]) -> None:
        """A batch needs at least one instance and exactly one audio per instance."""
        if len(instances) != len(audios) or not instances:
            raise ValueError(
                f"need one audio per instance, got {len(instances)} instances, {len(audios)} audios"
            )

    @staticmethod
    def decode_until_stop(tokenizer: Any, rows: torch.Tensor, stop_ids: list[int]) -> list[tuple[str, int]]:
        """Per row of generated ids [B, N] (on the CPU): the text of the ids before the first stop id (special
        tokens skipped) and how many ids that is (N when the row has no stop id)."""
        stops = torch.tensor(stop_ids)
        out: list[tuple[str, int]] = []
        for row in rows:
            hit = torch.nonzero(torch.isin(row, stops)).flatten()
            n = int(hit[0]) if hit.numel() else int(row.numel())
            out.append((tokenizer.decode(row[:n].tolist(), skip_special_tokens=True), n))
        return out

    @staticmethod
    def option_probabilities(tokenizer: Any, logits: torch.Tensor, options: list[str]) -> dict[str, float]:
        """Per option, the first-step probability of answering it, renormalised over the options.

        Why: the gold-answer probability is less coarse than accuracy on small test sets (METHOD.md 3.5). An
        option is answered by its number (`1`, `one`, as the parser reads it) or by one of its emotion words
        (`prompts.SYNONYMS`); its mass is the softmax probability of the first tokens of those forms (with and
        without a leading space), each token counted once."""
        from ..prompts import NUMBER_WORDS, SYNONYMS

        probs = torch.softmax(logits.detach().float().reshape(-1), dim=-1)
        seen: set[int] = set()
        mass: dict[str, float] = {}
        for k, opt in enumerate(options, 1):
            forms = [str(k), NUMBER_WORDS[k - 1] if k <= len(NUMBER_WORDS) else str(k), *SYNONYMS.get(opt, (opt,))]
            ids: set[int] = set()
            for f in forms:
                for text in (f, " " + f):
                    tok = tokenizer.encode(text, add_special_tokens=False)
                    if tok and tok[0] not in seen:
                        ids.add(int(tok[0]))
            seen |= ids
            mass[opt] = float(probs[sorted(ids)].sum()) if ids else 0.0
        total = sum(mass.values())
        return {o: (m / total if total > 0 else float("nan")) for o, m in mass.items()}

    @staticmethod
    def span_codes_from_ids(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, audio_token_ids: list[int]
    ) -> torch.Tensor:
        """Audio placeholder positions -> `audio`, positions before a row's first audio token -> `prefix`, other
        prompt positions -> `text`, padding -> -1 (codes index `emotion_neurons.SPANS`).

        A row without audio tokens has no prefix (all its prompt positions are `text`)."""
        from .. import SPANS

        is_audio = torch.isin(input_ids, torch.tensor(audio_token_ids, device=input_ids.device))
        valid = attention_mask.bool()
        before_audio = (torch.cumsum(is_audio.long(), dim=1) == 0) & is_audio.any(dim=1, keepdim=True)
        codes = torch.full_like(input_ids, SPANS.index("text"), dtype=torch.long)
        codes = torch.where(before_audio, SPANS.index("prefix"), codes)
        codes = torch.where(is_audio, SPANS.index("audio"), codes)
        return torch.where(valid, codes, -1).long()


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available; a node without GPUs runs everything on CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def looks_local(model_id: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (absolute, ./, ~, deeper paths) is meant as a path."""
    return (
        os.path.isabs(model_id)
        or model_id.startswith((".", "~"))
        or model_id.count("/") > 1
        or (os.sep != "/" and os.sep in model_id)
    )


def resolve_model_source(model_id: str, what: str) -> str:
    """`model_id` as given when it is a hub id; the expanded path when it names a local directory.

    A local path (`looks_local`, or anything that exists) must be a directory holding `config.json`; otherwise
    FileNotFoundError names the path and `what` (the model family, e.g. "Qwen2.5-Omni").
    """
    model_id = str(model_id)
    if looks_local(model_id) or os.path.exists(model_id):
        path = pathlib.Path(model_id).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{what} model directory not found: {path}")
        if not (path / "config.json").is_file():
            article = "an" if what[:1].upper() in "AEIOU" else "a"
            raise FileNotFoundError(f"{path} is not {article} {what} model directory (no config.json)")
        return str(path)
    return model_id


def revision_kwargs(revision: str | None) -> dict[str, Any]:
    """`{"revision": revision}` for `from_pretrained` when a revision is pinned, else nothing."""
    return {"revision": revision} if revision else {}


def pretrained_kwargs(device: str, dtype: str, revision: str | None) -> tuple[dict[str, Any], torch.device]:
    """`from_pretrained` kwargs (dtype, revision, and `device_map="auto"` for `device="auto"` with CUDA, which
    spreads the model over the visible GPUs through accelerate) and the device to move the model to.

    When the kwargs hold no `device_map`, the caller moves the loaded model to the returned device itself.
    """
    dev = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, dev), **revision_kwargs(revision)}
    if device == "auto" and torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    return kwargs, dev
