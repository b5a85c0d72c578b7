"""Interventions on the hook site, one registered class each (METHOD.md section 3.4).

An intervention edits the site's tensor g [B, T, N] of every hooked layer before the model uses it, with a
per-row mask m [B, L, N] (bool, or float in [0, 1] for a weighted mix of emotion masks):

- `deactivate`: g <- g * (1 - m)                      (no strength; one condition per mask)
- `steer`:      g <- g * (1 + alpha m)
- `steer_norm`: steer, then each position's edited vector g'[b, t, :] rescaled to the norm of g[b, t, :]
- `erase`:      g <- g * (1 - m) + m * Mbar, Mbar the mean activation of the row's mask emotion's OTHER
                emotions (needs `capture.act_sums`; no strength)
- label-agnostic injection (SER, the test label unknown): an unintervened first pass gives option scores
  s_e and a prediction e^, then a steer with `two_pass`: m_e^, `mix`: sum_e softmax(s / tau)_e m_e,
  `union`: OR_e m_e. (`two_pass` is METHOD.md's `2pass`: registry names start with a letter.)

Each edit is a dense factor row per layer (plus an offset row for `erase`) computed once per batch and kept
at a fixed address, so a compiled decode step traces the hooks once (tests/test_fastpath.py). An identity
intervention (`none`, alpha 0) attaches no hook at all, so its outputs are the plain ones.

Adding an intervention is one class: subclass `Intervention`, set the class attributes, override `factor`
(and `offset` / `finish` if needed), and decorate it with `@INTERVENTIONS.register("name")`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from . import SPANS
from .registry import Registry

if TYPE_CHECKING:  # importable without torch: the Snakefile and the CPU stages read the registry
    import torch

    from .models.base import LayerSite

GENERATED = SPANS.index("generated")

#: name -> Intervention subclass
INTERVENTIONS: Registry[type[Intervention]] = Registry("intervention")

POSITIONS = ("all", "generated")
#: how an intervention's rows get their masks in evaluation: `label` = the EVC target / each SER emotion in
#: turn (the change matrix); the others are label-agnostic and need the first pass (`predicted`, `softmax`)
#: or nothing at all (`union`)
ROUTINGS = ("label", "predicted", "softmax", "union")


def _static(t: torch.Tensor) -> torch.Tensor:
    """Tell `torch.compile` that `t` keeps its address (CUDA graphs may then update it in place)."""
    import torch

    with contextlib.suppress(Exception):  # older torch / no dynamo: only a missed optimisation
        torch._dynamo.mark_static_address(t)
    return t


@dataclass
class InterventionSpec:
    """Serialisable description of one intervention (pyvene-style config, no tensors)."""

    kind: str  # a name of INTERVENTIONS
    alpha: float = 0.0
    positions: str = "all"  # "all" | "generated"
    temperature: float = 1.0  # `mix` only: tau of softmax(s / tau)

    def __post_init__(self) -> None:
        if self.kind not in INTERVENTIONS:
            raise ValueError(
                f"intervention {self.kind!r} unknown; expected one of {', '.join(INTERVENTIONS.names())}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"positions {self.positions!r} unknown; expected all or generated")
        if not float(self.temperature) > 0:
            raise ValueError(f"intervention temperature must be > 0, got {self.temperature}")

    @property
    def cls(self) -> type[Intervention]:
        return INTERVENTIONS[self.kind]

    @property
    def is_identity(self) -> bool:
        """`none`, and the strength interventions at alpha 0, leave every site unchanged (no hook)."""
        return self.cls.identity(self)


class Intervention:
    """Edits the hook site with a per-row mask [B, L, N] before the model uses it.

    `Intervention(sites, tracker, spec)` builds the registered class of `spec.kind`.
    """

    #: one condition per alpha (False: one condition per mask, alpha fixed to 1)
    uses_alpha: ClassVar[bool] = True
    #: needs `values` (the mean activations of `erase`) in `set_masks`
    needs_means: ClassVar[bool] = False
    routing: ClassVar[str] = "label"

    def __new__(cls, sites: list[LayerSite], tracker: Any, spec: InterventionSpec) -> Intervention:
        if cls is Intervention:
            cls = spec.cls
        return super().__new__(cls)

    def __init__(self, sites: list[LayerSite], tracker: Any, spec: InterventionSpec) -> None:
        self.sites = sites
        self.tracker = tracker
        self.spec = spec
        self.masks: torch.Tensor | None = None
        self._factor: torch.Tensor | None = None  # [B, L, N] float32
        self._offset: torch.Tensor | None = None  # [B, L, N] float32 or None
        self._rows: list[torch.Tensor | None] = []  # per layer [B, 1, N] in the site's dtype and device
        self._orows: list[torch.Tensor | None] = []
        self._fresh: list[bool] = []

    # -- what a subclass defines ---------------------------------------------------------------------------
    @classmethod
    def identity(cls, spec: InterventionSpec) -> bool:
        """Whether `spec` leaves every site unchanged whatever the mask (then no hook is attached)."""
        return False

    def factor(self, m: torch.Tensor) -> torch.Tensor:
        """Multiplicative rows [B, L, N] (float32) from the mask m [B, L, N] (float32 in [0, 1])."""
        raise NotImplementedError

    def offset(self, m: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor | None:
        """Additive rows [B, L, N] (float32) or None."""
        return None

    def finish(self, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Last step of the edit of one site tensor (g the original, out = g * factor + offset)."""
        return out

    # -- machinery -----------------------------------------------------------------------------------------
    def set_masks(self, masks: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Masks of the next batch's rows [B, L, N] (bool or float in [0, 1]); `values` [B, L, N] for `erase`."""
        if masks.ndim != 3 or masks.shape[1] != len(self.sites):
            raise ValueError(f"masks must be [B, {len(self.sites)}, N]; got {tuple(masks.shape)}")
        self.masks = masks if masks.is_floating_point() else masks.bool()
        if self.needs_means and (values is None or tuple(values.shape) != tuple(masks.shape)):
            got = None if values is None else tuple(values.shape)
            raise ValueError(f"intervention {self.spec.kind!r} needs values shaped like the masks; got {got}")
        if self.spec.is_identity:
            return
        m = self.masks.float()
        self._factor = self.factor(m)
        self._offset = self.offset(m, None if values is None else values.float())
        if len(self._rows) != len(self.sites):
            self._rows = [None] * len(self.sites)
            self._orows = [None] * len(self.sites)
        # rows are cast lazily at the prefill (dtype / device of each site); stale rows are refreshed there
        self._fresh = [False] * len(self.sites)

    @staticmethod
    def _refresh(store: list[torch.Tensor | None], p: int, src: torch.Tensor) -> torch.Tensor:
        row = store[p]
        if row is None or row.shape != src.shape or row.dtype != src.dtype or row.device != src.device:
            row = _static(src.clone())
            store[p] = row
        else:
            row.copy_(src)
        return row

    def _row(self, p: int, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's factor (and offset) row in g's dtype/device; refreshed in place once per batch."""
        if not self._fresh[p]:
            self._refresh(self._rows, p, self._factor[:, p].to(device=g.device, dtype=g.dtype).unsqueeze(1))
            if self._offset is not None:
                self._refresh(self._orows, p, self._offset[:, p].to(device=g.device, dtype=g.dtype).unsqueeze(1))
            self._fresh[p] = True
        return self._rows[p], (self._orows[p] if self._offset is not None else None)

    def _edit(self, layer_pos: int, g: torch.Tensor) -> torch.Tensor:
        if self.masks is None:
            raise RuntimeError("Intervention.set_masks() was not called")
        if self.tracker.decoding:  # rows were set at the prefill: a decode step reads no Python state
            row = self._rows[layer_pos]
            off = self._orows[layer_pos] if self._offset is not None else None
        else:
            row, off = self._row(layer_pos, g)
        out = g * row
        if off is not None:
            out = out + off
        out = self.finish(g, out)
        if self.spec.positions == "generated":
            gen = (self.tracker.codes.to(g.device) == GENERATED).unsqueeze(-1)  # [B, T, 1]
            return out.where(gen, g)
        return out

    @contextlib.contextmanager
    def attached(self) -> Iterator[Intervention]:
        handles = []
        try:
            if not self.spec.is_identity:
                for pos, site in enumerate(self.sites):
                    if site.kind == "pre":

                        def pre_hook(module, args, _p=pos):
                            return (self._edit(_p, args[0]),) + tuple(args[1:])

                        handles.append(site.module.register_forward_pre_hook(pre_hook))
                    else:

                        def fwd_hook(module, args, output, _p=pos):
                            return self._edit(_p, output)

                        handles.append(site.module.register_forward_hook(fwd_hook))
            yield self
        finally:
            for h in handles:
                h.remove()


@INTERVENTIONS.register("none")
class NoIntervention(Intervention):
    """The unintervened baseline: never attaches a hook."""

    uses_alpha = False

    @classmethod
    def identity(cls, spec: InterventionSpec) -> bool:
        return True

    def factor(self, m: torch.Tensor) -> torch.Tensor:  # never called: the identity attaches no hook
        return m * 0 + 1


@INTERVENTIONS.register("deactivate")
class Deactivate(Intervention):
    """Ablation: g <- g * (1 - m)."""

    uses_alpha = False

    def factor(self, m: torch.Tensor) -> torch.Tensor:
        return 1 - m


@INTERVENTIONS.register("steer")
class Steer(Intervention):
    """Gain: g <- g * (1 + alpha m); alpha 0 is the identity."""

    @classmethod
    def identity(cls, spec: InterventionSpec) -> bool:
        return float(spec.alpha) == 0.0

    def factor(self, m: torch.Tensor) -> torch.Tensor:
        return 1 + float(self.spec.alpha) * m


@INTERVENTIONS.register("steer_norm")
class SteerNorm(Steer):
    """Norm-preserving steer (EmoSteer-style): the steered vector of each position and layer is rescaled to
    the L2 norm of the original, so the edit changes the direction of g, not its size."""

    def finish(self, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        gf, of = g.float(), out.float()
        scale = gf.norm(dim=-1, keepdim=True) / of.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (of * scale).to(g.dtype)


@INTERVENTIONS.register("erase")
class Erase(Intervention):
    """Erasure: masked neurons move to Mbar, their mean activation over the other emotions (EmoSteer-style);
    `values` are those means per row. No strength; an empty mask is the identity."""

    uses_alpha = False
    needs_means = True

    def factor(self, m: torch.Tensor) -> torch.Tensor:
        return 1 - m

    def offset(self, m: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            raise ValueError("erase needs the mean activations (values) of the masked neurons")
        return m * values


@INTERVENTIONS.register("two_pass")
class TwoPass(Steer):
    """Label-agnostic (Paper B `2pass`): steer with the mask of the first pass's predicted emotion."""

    routing = "predicted"


@INTERVENTIONS.register("mix")
class Mix(Steer):
    """Label-agnostic: steer with sum_e w_e m_e, w = softmax(first-pass option scores / temperature)."""

    routing = "softmax"


@INTERVENTIONS.register("union")
class Union(Steer):
    """Label-agnostic: steer the union (OR) of all emotions' masks."""

    routing = "union"


# ---------------------------------------------------------------------------------------------- helpers
def other_emotion_means(M: np.ndarray) -> np.ndarray:
    """Mbar[e] = mean over e' != e of M[e'] (M [E, L, N] mean activations per emotion), the erasure target."""
    M = np.asarray(M, dtype=np.float64)
    if M.shape[0] < 2:
        raise ValueError("erase needs at least two emotions (the mean over the other emotions)")
    return ((M.sum(0, keepdims=True) - M) / (M.shape[0] - 1)).astype(np.float32)


def softmax_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """w = softmax(s / tau) per row of scores [B, E] (stable; what `mix` steers with)."""
    s = np.asarray(scores, dtype=np.float64) / float(temperature)
    s = s - s.max(axis=1, keepdims=True)
    w = np.exp(s)
    return w / w.sum(axis=1, keepdims=True)


def injection_weights(routing: str, scores: np.ndarray, predicted: Sequence[int], temperature: float) -> np.ndarray:
    """Per-row weights [B, E] over the mask emotions for a label-agnostic injection."""
    scores = np.asarray(scores, dtype=np.float64)
    b, e = scores.shape
    if routing == "predicted":
        w = np.zeros((b, e))
        w[np.arange(b), np.asarray(predicted, dtype=int)] = 1.0
        return w
    if routing == "softmax":
        return softmax_weights(scores, temperature)
    if routing == "union":
        return np.ones((b, e))
    raise ValueError(f"routing {routing!r} is not label-agnostic")


def weighted_masks(bank: torch.Tensor, weights: np.ndarray | torch.Tensor) -> torch.Tensor:
    """m_row = min(1, sum_e w_e m_e) [B, L, N] float from the mask bank [E, L, N] and weights [B, E]:
    one-hot weights give the emotion's mask, all-ones the union (OR), softmax weights the `mix` mask."""
    import torch

    w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    return torch.einsum("be,eln->bln", w, bank.float()).clamp_(max=1.0)


def check_config(eval_cfg: dict[str, Any], capture_cfg: dict[str, Any]) -> None:
    """Start-up check (Snakefile): every `evaluate.interventions` name is registered, and `erase` has the
    activation sums it needs from stage 1."""
    names = list(eval_cfg.get("interventions") or [])
    unknown = [n for n in names if n not in INTERVENTIONS]
    if unknown:
        raise ValueError(
            f"evaluate.interventions: {unknown} not registered; registered: {', '.join(INTERVENTIONS.names())}"
        )
    needy = [n for n in names if INTERVENTIONS[n].needs_means]
    if needy and (capture_cfg or {}).get("act_sums", "none") == "none":
        raise ValueError(
            f"evaluate.interventions {needy} need the mean activation M, but capture.act_sums is 'none'; "
            "set capture.act_sums: float16 (or float32) so stage 1 records activation sums"
        )
