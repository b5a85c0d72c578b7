"""Capture and intervention hooks on decoder-MLP sites, always removed by context managers.

Design (see METHOD.md sections 2 and 4):
- A `SpanTracker` wraps the `forward` of the component's decoder root. From the `input_ids` of each call it
  derives, on the device, the span code of every position of that call: the first call of a generation is
  the prefill (codes given by the adapter: audio / text / padding), each later call is one decode step whose
  single position is `generated` until the row has produced a stop token. No host synchronisation happens.
- A `StatsRecorder` adds, per layer, positive counts and activation sums per (row, span) into device
  accumulators, so nothing per-token is stored: one batched matmul per statistic at the prefill, and at a
  decode step (one position, one span) a masked add into the `generated` row, with no one-hot at all.
- An `Intervention` (`emotion_neurons.interventions`, one registered class each, re-exported here) edits the
  same site before it is used, e.g. g <- g * (1 - m) (deactivate) or g <- g * (1 + alpha * m) (steer), with a
  per-row mask, at every position or only at generated ones. The factor is precomputed per batch as one dense
  row per layer, so the edit is one multiply; alpha 0 (and `none`) attach no hook, so the outputs are plain.

Fast path (static KV cache, decode step compiled or captured as a CUDA graph, `model.compile`): every decode
step hook is pure in-place tensor work on buffers that keep their address across batches of one size (span
state, accumulators, factors; marked static for `torch.compile`'s CUDA graphs) and reads no Python state that
changes from step to step, so the hooks are traced into the graph once instead of breaking it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from . import SPANS
from .interventions import INTERVENTIONS, Intervention, InterventionSpec, _static  # noqa: F401 (re-exported)
from .models.base import LayerSite

GENERATED = SPANS.index("generated")


def first_tensor_arg(args: tuple, kwargs: dict, name: str) -> torch.Tensor | None:
    value = kwargs.get(name)
    if value is None and args and isinstance(args[0], torch.Tensor):
        value = args[0]
    return value


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


class SpanTracker:
    """Knows the span code of every position of the current forward call of one component."""

    def __init__(self, stop_token_ids: Sequence[int]) -> None:
        self.stop_ids = list(stop_token_ids)
        self.codes: torch.Tensor | None = None  # [B, T] codes of the current call
        #: True while the current call is a decode step (one position per row, span `generated` or -1)
        self.decoding = False
        self._prefill: torch.Tensor | None = None
        self._prefilled = False
        self._alive: torch.Tensor | None = None  # [B] bool, reused across batches of one size
        self._step_codes: torch.Tensor | None = None  # [B, 1] codes of a decode step, reused likewise
        self._stop: torch.Tensor | None = None
        self.calls = 0  # eager calls only: a compiled step must not read a counter that changes every step

    def start(self, prefill_codes: torch.Tensor) -> None:
        """Arm for one `generate` call with the adapter's prompt span codes [B, T]."""
        self._prefill = prefill_codes.long()
        self._prefilled = False
        self.decoding = False
        self.codes = None
        self.calls = 0
        b, dev = self._prefill.shape[0], self._prefill.device
        if self._alive is None or self._alive.shape[0] != b or self._alive.device != dev:
            self._alive = _static(torch.ones(b, dtype=torch.bool, device=dev))
            self._step_codes = _static(torch.full((b, 1), GENERATED, dtype=torch.long, device=dev))
        else:
            with torch.inference_mode():  # see StatsRecorder.reset
                self._alive.fill_(True)
                self._step_codes.fill_(GENERATED)

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = first_tensor_arg(args, kwargs, "input_ids")
        # a decode step reads neither `_prefill` nor its shape, so a compiled step is not re-specialised per prompt
        if not self._prefilled:
            if self._prefill is None:
                raise RuntimeError("SpanTracker.start() was not called before the forward pass")
            if ids is not None and ids.shape[-1] != self._prefill.shape[-1]:
                raise RuntimeError(
                    f"prefill call has {ids.shape[-1]} positions but span codes have {self._prefill.shape[-1]}"
                )
            ref = ids if ids is not None else self._prefill
            if self._stop is None or self._stop.device != ref.device or self._stop.dtype != ref.dtype:
                self._stop = torch.tensor(self.stop_ids, device=ref.device, dtype=ref.dtype)
            self.codes = self._prefill
            self.decoding = False
            self._prefilled = True
        else:
            if ids is None:
                raise RuntimeError("decode step without input_ids: this adapter needs its own span tracking")
            if ids.shape[-1] != 1:
                raise RuntimeError(f"decode call with {ids.shape[-1]} positions; expected 1")
            tok = ids[:, -1]
            self._alive.logical_and_(~torch.isin(tok, self._stop).to(self._alive.device))
            self._step_codes.copy_(torch.where(self._alive, GENERATED, -1).unsqueeze(1))
            self.codes = self._step_codes
            self.decoding = True
        if not _compiling():
            self.calls += 1

    @contextlib.contextmanager
    def attached(self, root: torch.nn.Module) -> Iterator[SpanTracker]:
        """Run the tracker at the start of `root.forward` (a wrapper, not a forward pre-hook).

        Why not a pre-hook: `torch.compile` of the decode step traces a module's pre-hooks as a frame of their
        own, i.e. one more graph (one more CUDA-graph replay and guard check) per step; a wrapped `forward` is
        traced into the same graph as the model.
        """
        had_own = "forward" in vars(root)
        previous = vars(root).get("forward")
        inner = root.forward

        @functools.wraps(inner)  # generate() reads the signature of `forward` to validate its kwargs
        def forward(*args, **kwargs):
            self._pre_hook(root, args, kwargs)
            return inner(*args, **kwargs)

        root.forward = forward
        attached = vars(root).setdefault(_TRACKERS_ATTR, [])
        attached.append(self)
        try:
            yield self
        finally:
            attached.remove(self)
            if had_own:
                root.forward = previous
            else:
                del root.forward


_TRACKERS_ATTR = "_emotion_neurons_span_trackers"


def attached_trackers(root: torch.nn.Module) -> list[SpanTracker]:
    """The span trackers attached to `root` now (adapters whose root is a relay re-arm them per call)."""
    return list(vars(root).get(_TRACKERS_ATTR, []))


def _site_tensor(site: LayerSite, args: tuple, output: torch.Tensor | None) -> torch.Tensor:
    return args[0] if site.kind == "pre" else output


class StatsRecorder:
    """Per-row, per-span, per-layer sums of 1[g > 0], g (and optionally g^2), kept on the model's device.

    The accumulators [B, S, N] (counts int32, exact; sums float32) are allocated once per batch size and zeroed
    in place by `reset`; `result` copies them to pinned host memory, one copy per statistic and one wait.
    """

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
        self._first = sites[0].layer if sites else -1
        self._called: set[int] = set()
        self._recorded = False
        #: one [L, B, S, N] tensor per statistic while every layer sits on one device (self.pos etc. hold its
        #: views): a compiled decode step then reads 2-3 tensors instead of 2-3 per layer (fewer guards per step)
        self._base: dict[str, torch.Tensor] | None = None
        #: decode steps (one device): each layer copies its last position into its own [B, N] stage tensor (one
        #: copy per layer) and the last layer adds all of them at once into `_gen`, the `generated` rows as whole
        #: [L, B, N] tensors (tokens [B]), folded into `_base` by `result`. Why whole tensors: a compiled step
        #: functionalises an in-place write into a view of a graph input as a scatter into a full copy of the
        #: input, so per-step writes into `_base[:, :, generated]` (or into rows of one stacked stage) copied the
        #: whole [L, B, S, N] accumulators every step (on an H200 at bs 32, +2.4 ms of GPU time per step)
        self._stage: list[torch.Tensor] | None = None
        self._gen: dict[str, torch.Tensor] | None = None
        self._index = {s.layer: i for i, s in enumerate(sites)}
        self._last = max((s.layer for s in sites), default=-1)  # decoder layers run in index order

    def reset(self, batch: int) -> None:
        self.batch = batch
        self._called = set()
        self._recorded = False
        same = self.tokens is not None and self.tokens.shape[0] == batch
        if not same:
            self.pos.clear()
            self.sum.clear()
            self.sq.clear()
            self.tokens = None
            self._base = None
            self._stage = None
            self._gen = None
            return
        with torch.inference_mode():  # the buffers may have been made under the caller's inference mode
            if self._base is not None:
                for t in self._base.values():
                    t.zero_()
                for t in (self._gen or {}).values():
                    t.zero_()
            else:
                for acc in (self.pos, self.sum, self.sq):
                    for t in acc.values():
                        t.zero_()
            self.tokens.zero_()

    def _buffers(self, layer: int, g: torch.Tensor) -> None:
        """Allocate (prefill, eager) the accumulators of `layer` on the site's device."""
        b, n = g.shape[0], g.shape[-1]
        shape = (b, len(SPANS), n)
        cur = self.pos.get(layer)
        if cur is not None and cur.shape == shape and cur.device == g.device:
            return
        if layer == self._first:
            # stacked per statistic; a later layer on another device (split model) falls back to its own tensors
            lshape = (len(self.sites), *shape)
            base = {"pos": torch.zeros(lshape, dtype=torch.int32, device=g.device),
                    "sum": torch.zeros(lshape, dtype=torch.float32, device=g.device)}  # fmt: skip
            if self.sum_squares:
                base["sq"] = torch.zeros(lshape, dtype=torch.float32, device=g.device)
            self._base = {k: _static(v) for k, v in base.items()}
            for site, i in self._index.items():
                self.pos[site], self.sum[site] = base["pos"][i], base["sum"][i]
                if self.sum_squares:
                    self.sq[site] = base["sq"][i]
            self.tokens = _static(torch.zeros((b, len(SPANS)), dtype=torch.float32, device=g.device))
            self._stage = [_static(torch.zeros((b, n), dtype=g.dtype, device=g.device)) for _ in self.sites]
            gen = {k: torch.zeros((len(self.sites), b, n), dtype=v.dtype, device=g.device) for k, v in base.items()}
            gen["tokens"] = torch.zeros(b, dtype=torch.float32, device=g.device)
            self._gen = {k: _static(v) for k, v in gen.items()}
            return
        self._fold_generated()  # a layer on another device: the earlier layers' prefill rows go back into `_base`
        self._base = None
        self._stage = None
        self._gen = None
        self.pos[layer] = _static(torch.zeros(shape, dtype=torch.int32, device=g.device))
        self.sum[layer] = _static(torch.zeros(shape, dtype=torch.float32, device=g.device))
        if self.sum_squares:
            self.sq[layer] = _static(torch.zeros(shape, dtype=torch.float32, device=g.device))

    def _record(self, layer: int, g: torch.Tensor) -> None:
        codes = self.tracker.codes
        if codes is None:
            raise RuntimeError("capture hook ran outside a tracked generation")
        if self.tracker.decoding:
            # one position, one span: add into the `generated` row of rows still alive
            if self._stage is not None:
                self._stage[self._index[layer]].copy_(g[:, -1])
                if layer == self._last:
                    self._flush_stage(codes)
                return
            alive = (codes[:, -1] == GENERATED).to(g.device).unsqueeze(-1)  # [B, 1]
            last = g[:, -1]
            gf = last.float()  # [B, N]
            if self._base is not None:
                i = self._index[layer]
                pos, sm = self._base["pos"][i], self._base["sum"][i]
                sq = self._base["sq"][i] if self.sum_squares else None
            else:
                pos, sm, sq = self.pos[layer], self.sum[layer], self.sq.get(layer)
            pos[:, GENERATED].add_((last > 0) & alive)  # sign test in the site's dtype: same bits
            sm[:, GENERATED].add_(torch.where(alive, gf, 0.0))
            if sq is not None:
                sq[:, GENERATED].add_(torch.where(alive, gf * gf, 0.0))
            if layer == self._first:
                self.tokens[:, GENERATED].add_(alive[:, 0])
            return
        self._buffers(layer, g)
        if self._stage is not None and (self._base is None or self._stage[0].dtype != g.dtype):
            self._stage = None  # split model or mixed dtypes: the decode steps take the per-layer path
        self._called.add(layer)
        self._recorded = True
        codes = codes.to(g.device)
        oh = (codes.unsqueeze(-1) == torch.arange(len(SPANS), device=g.device)).float()  # [B, T, S]
        gf = g.float()
        # counts <= T are exact in float32 (and TF32: 0/1 inputs); the int32 add is exact
        self.pos[layer].add_(torch.einsum("bts,btn->bsn", oh, (g > 0).float()).to(torch.int32))
        self.sum[layer].add_(torch.einsum("bts,btn->bsn", oh, gf))
        if self.sum_squares:
            self.sq[layer].add_(torch.einsum("bts,btn->bsn", oh, gf * gf))
        if layer == self._first:
            self.tokens.add_(oh.sum(1))
        if self._stage is not None:
            # the prefill's `generated` rows (the talker's prefill has one) start the decode-step sums, so each
            # element adds the same values in the same order as the per-layer path
            i = self._index[layer]
            for k in self._base:
                row = self._base[k][i][:, GENERATED]
                self._gen[k][i].add_(row)
                row.zero_()
            if layer == self._first:
                self._gen["tokens"].add_(self.tokens[:, GENERATED])
                self.tokens[:, GENERATED] = 0

    def _flush_stage(self, codes: torch.Tensor) -> None:
        """Add one decode step of every layer (staged in `_stage`) into `_gen`, all layers at once: the same
        values added in the same order per element as the per-layer path, so the same bits."""
        st = torch.stack(self._stage)  # [L, B, N]
        alive = (codes[:, -1] == GENERATED).to(st.device).unsqueeze(-1)  # [B, 1], broadcast over [L, B, N]
        gf = st.float()
        self._gen["pos"].add_((st > 0) & alive)  # sign test in the site's dtype
        self._gen["sum"].add_(torch.where(alive, gf, 0.0))
        if self.sum_squares:
            self._gen["sq"].add_(torch.where(alive, gf * gf, 0.0))
        self._gen["tokens"].add_(alive[:, 0])

    def _fold_generated(self) -> None:
        """Add the decode steps' `_gen` into the `generated` rows of `_base` (zero there since the prefill: the
        sums come out bit for bit), once per batch; `_gen` is zeroed so a second `result` adds nothing."""
        if self._stage is None or self._gen is None:
            return
        with torch.inference_mode():  # the buffers were made under generate's inference mode
            for k in self._base:
                self._base[k][:, :, GENERATED].add_(self._gen[k])
                self._gen[k].zero_()
            self.tokens[:, GENERATED].add_(self._gen["tokens"])
            self._gen["tokens"].zero_()

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
        """Move the accumulators to host once per batch: arrays [B, S, L, N] and tokens [B, S].

        On CUDA each statistic is copied asynchronously into pinned host memory, with one wait at the end, and
        handed out as numpy views of it (no host copy: at bs 32 two 272 MB copies per batch, page faults
        included, were part of capture's cost). The pinned blocks come from torch's caching host allocator
        (`pin_memory=True`): a block returns to it when the caller drops the arrays, so steady state
        allocates no pinned memory (allocating it fresh per batch cost ~10 ms a statistic on an H200).
        """
        if self.tokens is None or not self._recorded:
            raise RuntimeError("no forward pass was recorded")
        layers = [s.layer for s in self.sites]
        missing = [i for i in layers if i not in self._called]
        if missing:
            raise RuntimeError(f"layers {missing} were never called; is the model split oddly?")
        one_device = len({self.pos[i].device for i in layers}) == 1
        self._fold_generated()
        copies: list[torch.Tensor] = []

        def to_host(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "cuda":
                return t.cpu()
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t, non_blocking=True)
            copies.append(t)  # keep the device source alive until the wait below
            return buf

        def stacked(acc: dict[int, torch.Tensor], name: str) -> torch.Tensor:
            # one device-to-host copy per statistic when every layer sits on one device
            if self._base is not None and one_device:
                # [L, B, S, N] -> [B, S, L, N]; clone: never a view of the accumulator (reset zeroes it)
                return to_host(self._base[name].permute(1, 2, 0, 3).clone(memory_format=torch.contiguous_format))
            if one_device:
                return to_host(torch.stack([acc[i] for i in layers], dim=2))
            return torch.stack([acc[i].cpu() for i in layers], dim=2)

        host = {
            "pos_count": stacked(self.pos, "pos"),
            "act_sum": stacked(self.sum, "sum"),
            "tokens": to_host(self.tokens.round().to(torch.int64)),
        }
        if self.sum_squares:
            host["act_sqsum"] = stacked(self.sq, "sq")
        for dev in {t.device for t in copies}:
            torch.cuda.synchronize(dev)
        # fresh tensors each batch (never the accumulators themselves, which the next batch zeroes)
        return {k: v.numpy() for k, v in host.items()}
