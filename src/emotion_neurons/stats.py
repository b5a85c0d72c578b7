"""Zarr v3 stores of per-instance neuron statistics (stage 1) and per-emotion aggregates (stage 3).

Stage-1 store, one per shard, chunked by instance, zstd-compressed:
  pos_count [I, S, L, N] int32   count of positions with g > 0
  act_sum   [I, S, L, N] float32 sum of g
  act_sqsum [I, S, L, N] float32 sum of g^2 (only when capture.sum_squares)
  tokens    [I, S]       int64   number of valid positions
with S = len(SPANS) in SPANS order and attributes naming the instances, model, hook site and code version.
These sums are mergeable, so any subset of instances can be aggregated later without re-running the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import SPANS
from .io import atomic_dir

STAT_ARRAYS = ("pos_count", "act_sum", "act_sqsum")

warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")


class InstanceStatsWriter:
    """Fills a shard store batch by batch; the store appears at its final path only on `close()`."""

    def __init__(
        self,
        path: str | Path,
        instance_ids: list[str],
        n_layers: int,
        n_neurons: int,
        attrs: dict[str, Any],
        sum_squares: bool = False,
    ) -> None:
        if len(set(instance_ids)) != len(instance_ids):
            raise ValueError("instance ids of a shard must be unique")
        self.final = Path(path)
        self._ctx = atomic_dir(self.final)
        tmp = self._ctx.__enter__()
        self.ids = list(instance_ids)
        self.row = {iid: i for i, iid in enumerate(self.ids)}
        n, s = len(self.ids), len(SPANS)
        self.group = zarr.open_group(tmp, mode="w", zarr_format=3)
        shape, chunks = (n, s, n_layers, n_neurons), (1, s, n_layers, n_neurons)
        self.group.create_array("pos_count", shape=shape, chunks=chunks, dtype="int32", fill_value=0)
        self.group.create_array("act_sum", shape=shape, chunks=chunks, dtype="float32", fill_value=0.0)
        if sum_squares:
            self.group.create_array("act_sqsum", shape=shape, chunks=chunks, dtype="float32", fill_value=0.0)
        self.group.create_array("tokens", shape=(n, s), chunks=(max(n, 1), s), dtype="int64", fill_value=0)
        self.written = np.zeros(n, dtype=bool)
        self.sum_squares = sum_squares
        self.group.attrs.update(
            {**attrs, "instance_ids": self.ids, "spans": list(SPANS), "n_layers": n_layers, "n_neurons": n_neurons}
        )
        self._tokens = np.zeros((n, s), dtype=np.int64)

    def write(self, ids: list[str], stats: dict[str, np.ndarray]) -> None:
        rows = [self.row[i] for i in ids]
        for name in STAT_ARRAYS:
            if name == "act_sqsum" and not self.sum_squares:
                continue
            arr = self.group[name]
            for j, r in enumerate(rows):
                arr[r] = stats[name][j]
        for j, r in enumerate(rows):
            self._tokens[r] = stats["tokens"][j]
            self.written[r] = True

    def close(self) -> None:
        if not self.written.all():
            missing = [self.ids[i] for i in np.flatnonzero(~self.written)[:5]]
            self.abort()
            raise RuntimeError(f"statistics missing for {int((~self.written).sum())} instances, e.g. {missing}")
        self.group["tokens"][:] = self._tokens
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def open_store(path: str | Path) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"statistics store {path} does not exist")
    return zarr.open_group(path, mode="r")


def aggregate(
    stores: Iterable[str | Path],
    groups: dict[str, list[str]],
    spans: list[str],
    out: str | Path,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Sum the statistics of each emotion's kept instances into K, T, P = K/T and M = sum/T.

    `groups` maps emotion -> instance ids (each must exist in exactly one store).
    """
    unknown = [s for s in spans if s not in SPANS]
    if unknown:
        raise ValueError(f"tasks.<task>.spans has unknown spans {unknown}; expected a subset of {list(SPANS)}")
    span_idx = [SPANS.index(s) for s in spans]
    opened = [open_store(p) for p in stores]
    where: dict[str, tuple[int, int]] = {}
    for si, g in enumerate(opened):
        for row, iid in enumerate(g.attrs["instance_ids"]):
            if iid in where:
                raise ValueError(f"instance {iid} appears in more than one statistics store")
            where[iid] = (si, row)
    if not opened:
        raise ValueError("no statistics stores given")
    ref = opened[0].attrs
    for g in opened[1:]:
        for key in ("n_layers", "n_neurons", "hook_site", "model_id", "component"):
            if g.attrs.get(key) != ref.get(key):
                raise ValueError(f"stores disagree on {key}: {g.attrs.get(key)!r} vs {ref.get(key)!r}")
    L, N = int(ref["n_layers"]), int(ref["n_neurons"])
    emotions = list(groups)
    E = len(emotions)
    K = np.zeros((E, L, N), dtype=np.int64)
    S = np.zeros((E, L, N), dtype=np.float64)
    T = np.zeros(E, dtype=np.int64)
    tokens = [g["tokens"][:] for g in opened]
    for e, emo in enumerate(emotions):
        for iid in groups[emo]:
            if iid not in where:
                raise KeyError(f"kept instance {iid} ({emo}) has no statistics in the given stores")
            si, row = where[iid]
            g = opened[si]
            K[e] += g["pos_count"][row][span_idx].sum(axis=0)
            S[e] += g["act_sum"][row][span_idx].sum(axis=0, dtype=np.float64)
            T[e] += tokens[si][row][span_idx].sum()
    if (T == 0).any():
        empty = [emotions[i] for i in np.flatnonzero(T == 0)]
        raise ValueError(f"no valid tokens for emotions {empty}; check filter and tasks.<task>.spans")
    P = (K / T[:, None, None]).astype(np.float32)
    M = (S / T[:, None, None]).astype(np.float32)
    with atomic_dir(out) as tmp:
        g = zarr.open_group(tmp, mode="w", zarr_format=3)
        for name, arr in (("K", K), ("P", P), ("M", M)):
            g.create_array(name, shape=arr.shape, chunks=(1, L, N), dtype=arr.dtype)[:] = arr
        g.create_array("T", shape=T.shape, dtype=T.dtype)[:] = T
        g.attrs.update(
            {
                **{k: ref.get(k) for k in ("model_id", "revision", "component", "hook_site", "code_version")},
                **(attrs or {}),
                "emotions": emotions,
                "spans": spans,
                "n_instances": {e: len(groups[e]) for e in emotions},
                "n_layers": L,
                "n_neurons": N,
            }
        )


def load_aggregate(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    g = open_store(path)
    arrays = {k: g[k][:] for k in ("K", "T", "P", "M")}
    return arrays, dict(g.attrs)
