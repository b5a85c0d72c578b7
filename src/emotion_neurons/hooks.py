"""Capture and intervention hooks on decoder-MLP sites, always removed by context managers.

Design (see METHOD.md sections 2 and 4):
- A `SpanTracker` puts a forward pre-hook on the component's decoder root. From the `input_ids` of each call it
  derives, on the device, the span code of every position of that call: the first call of a generation is
  the prefill (codes given by the adapter: audio / text / padding), each later call is one decode step whose
  single position is `generated` until the row has produced a stop token. No host synchronisation happens.
- A `StatsRecorder` adds, per layer, positive counts and activation sums per (row, span) into device
  accumulators with one batched matmul per statistic, so nothing per-token is stored.
- An `Intervention` edits the same site before it is used: g <- g * (1 - m) (deactivate) or
  g <- g * (1 + alpha * m) (steer), with a per-row mask, at every position or only at generated ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import SPANS
from .models.base import LayerSite

GENERATED = SPANS.index("generated")


def first_tensor_arg(args: tuple, kwargs: dict, name: str) -> torch.Tensor | None:
    value = kwargs.get(name)
    if value is None and args and isinstance(args[0], torch.Tensor):
        value = args[0]
    return value


class SpanTracker:
    """Knows the span code of every position of the current forward call of one component."""

    def __init__(self, stop_token_ids: Sequence[int]) -> None:
        self.stop_ids = list(stop_token_ids)
        self.codes: torch.Tensor | None = None  # [B, T] codes of the current call
        self._prefill: torch.Tensor | None = None
        self._alive: torch.Tensor | None = None
        self._stop: torch.Tensor | None = None
        self.calls = 0

    def start(self, prefill_codes: torch.Tensor) -> None:
        """Arm for one `generate` call with the adapter's prompt span codes [B, T]."""
        self._prefill = prefill_codes.long()
        self._alive = None
        self.codes = None
        self.calls = 0

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = first_tensor_arg(args, kwargs, "input_ids")
        if self._prefill is None:
            raise RuntimeError("SpanTracker.start() was not called before the forward pass")
        if self.calls == 0:
            if ids is not None and ids.shape[-1] != self._prefill.shape[-1]:
                raise RuntimeError(
                    f"prefill call has {ids.shape[-1]} positions but span codes have {self._prefill.shape[-1]}"
                )
            self.codes = self._prefill
            self._alive = torch.ones(self._prefill.shape[0], dtype=torch.bool, device=self._prefill.device)
        else:
            if ids is None:
                raise RuntimeError("decode step without input_ids: this adapter needs its own span tracking")
            if ids.shape[-1] != 1:
                raise RuntimeError(f"decode call with {ids.shape[-1]} positions; expected 1")
            tok = ids[:, -1].to(self._alive.device)
            if self._stop is None or self._stop.device != tok.device:
                self._stop = torch.tensor(self.stop_ids, device=tok.device, dtype=tok.dtype)
            valid = self._alive & ~torch.isin(tok, self._stop)
            self._alive = valid
            self.codes = torch.where(valid, GENERATED, -1).unsqueeze(1)
        self.calls += 1

    @contextlib.contextmanager
    def attached(self, root: torch.nn.Module) -> Iterator[SpanTracker]:
        handle = root.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


def _site_tensor(site: LayerSite, args: tuple, output: torch.Tensor | None) -> torch.Tensor:
    return args[0] if site.kind == "pre" else output


class StatsRecorder:
    """Per-row, per-span, per-layer sums of 1[g > 0], g (and optionally g^2), kept on the model's device."""

    def __init__(self, sites: list[LayerSite], tracker: SpanTracker, sum_squares: bool = False) -> None:
        self.sites = sites
        self.tracker = tracker
        self.sum_squares = sum_squares
        self.n_layers = len(sites)
        self.pos: dict[int, torch.Tensor] = {}
        self.sum: dict[int, torch.Tensor] = {}
        self.sq: dict[int, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None  # [B, S]
        self.batch = 0

    def reset(self, batch: int) -> None:
        self.batch = batch
        self.pos.clear()
        self.sum.clear()
        self.sq.clear()
        self.tokens = None

    def _onehot(self, codes: torch.Tensor, device: torch.device) -> torch.Tensor:
        codes = codes.to(device)
        return (codes.unsqueeze(-1) == torch.arange(len(SPANS), device=device)).float()  # [B, T, S]

    def _record(self, layer: int, g: torch.Tensor) -> None:
        codes = self.tracker.codes
        if codes is None:
            raise RuntimeError("capture hook ran outside a tracked generation")
        oh = self._onehot(codes, g.device)
        gf = g.float()
        pos = torch.einsum("bts,btn->bsn", oh, (gf > 0).float())
        act = torch.einsum("bts,btn->bsn", oh, gf)
        if layer in self.pos:
            self.pos[layer] += pos
            self.sum[layer] += act
        else:
            self.pos[layer], self.sum[layer] = pos, act
        if self.sum_squares:
            sq = torch.einsum("bts,btn->bsn", oh, gf * gf)
            self.sq[layer] = self.sq[layer] + sq if layer in self.sq else sq
        if layer == self.sites[0].layer:
            tok = oh.sum(1)
            self.tokens = tok if self.tokens is None else self.tokens + tok

    def _make_hook(self, site: LayerSite):
        if site.kind == "pre":

            def pre_hook(module, args):
                self._record(site.layer, args[0])

            return pre_hook, True

        def fwd_hook(module, args, output):
            self._record(site.layer, output)

        return fwd_hook, False

    @contextlib.contextmanager
    def attached(self) -> Iterator[StatsRecorder]:
        handles = []
        try:
            for site in self.sites:
                fn, pre = self._make_hook(site)
                handles.append(site.module.register_forward_pre_hook(fn) if pre else site.module.register_forward_hook(fn))
            yield self
        finally:
            for h in handles:
                h.remove()

    def result(self) -> dict[str, np.ndarray]:
        """Move the accumulators to host once per batch: arrays [B, S, L, N] and tokens [B, S]."""
        if self.tokens is None:
            raise RuntimeError("no forward pass was recorded")
        layers = [s.layer for s in self.sites]
        missing = [i for i in layers if i not in self.pos]
        if missing:
            raise RuntimeError(f"layers {missing} were never called; is the model split oddly?")
        out = {
            "pos_count": torch.stack([self.pos[i].cpu() for i in layers], dim=2).round().to(torch.int32).numpy(),
            "act_sum": torch.stack([self.sum[i].cpu() for i in layers], dim=2).numpy(),
            "tokens": self.tokens.cpu().round().to(torch.int64).numpy(),
        }
        if self.sum_squares:
            out["act_sqsum"] = torch.stack([self.sq[i].cpu() for i in layers], dim=2).numpy()
        return out


@dataclass
class InterventionSpec:
    """Serialisable description of one intervention (pyvene-style config, no tensors)."""

    kind: str  # "none" | "deactivate" | "steer"
    alpha: float = 0.0
    positions: str = "all"  # "all" | "generated"

    def __post_init__(self) -> None:
        if self.kind not in ("none", "deactivate", "steer"):
            raise ValueError(f"intervention {self.kind!r} unknown; expected none, deactivate or steer")
        if self.positions not in ("all", "generated"):
            raise ValueError(f"positions {self.positions!r} unknown; expected all or generated")


class Intervention:
    """Edits the hook site with a per-row mask [B, L, N] (bool) before the model uses it."""

    def __init__(self, sites: list[LayerSite], tracker: SpanTracker, spec: InterventionSpec) -> None:
        self.sites = sites
        self.tracker = tracker
        self.spec = spec
        self.masks: torch.Tensor | None = None

    def set_masks(self, masks: torch.Tensor) -> None:
        if masks.ndim != 3 or masks.shape[1] != len(self.sites):
            raise ValueError(f"masks must be [B, {len(self.sites)}, N]; got {tuple(masks.shape)}")
        self.masks = masks.bool()

    def _edit(self, layer_pos: int, g: torch.Tensor) -> torch.Tensor:
        if self.masks is None:
            raise RuntimeError("Intervention.set_masks() was not called")
        m = self.masks[:, layer_pos].to(device=g.device, dtype=g.dtype).unsqueeze(1)  # [B, 1, N]
        if self.spec.positions == "generated":
            codes = self.tracker.codes
            m = m * (codes.to(g.device) == GENERATED).to(g.dtype).unsqueeze(-1)
        if self.spec.kind == "deactivate":
            return g * (1 - m)
        return g * (1 + self.spec.alpha * m)

    @contextlib.contextmanager
    def attached(self) -> Iterator[Intervention]:
        handles = []
        try:
            if self.spec.kind != "none":
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
