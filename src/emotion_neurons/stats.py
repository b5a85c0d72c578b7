"""Zarr v3 stores of per-instance neuron statistics (stage 1) and per-emotion aggregates (stage 3).

Stage-1 store (layout 2), one per shard, one chunk per (instance, span), Blosc-lz4 with bit shuffle:
  pos_count [I, S, L, N] uint16   count of positions with g > 0 (exact; a count above 65535 is refused)
  act_sum   [I, S, L, N] float16 | float32   sum of g (only when `capture.act_sums` is not "none")
  act_sqsum [I, S, L, N] same dtype          sum of g^2 (only when `capture.sum_squares`)
  tokens    [I, S]       int64    number of valid positions
with S = len(SPANS) in SPANS order and attributes naming the instances, model, hook site and code version.
Counts are all P = K/T needs and compress about 2.5x with a shuffle filter; activation sums are near-random
bits (about 1.1x), so they are optional: at full size (28 x 18944 x 4 spans) an instance costs about 1.6 MB
without sums and about 5.8 MB with float16 sums (bench/RESULTS-cpu-scale.md). Layout-1 stores (int32 counts, float32 sums,
one chunk per instance) are still read. These sums are mergeable, so any subset of instances can be
aggregated later without re-running the model.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from . import SPANS
from .io import atomic_dir

LAYOUT_VERSION = 2
STAT_ARRAYS = ("pos_count", "act_sum", "act_sqsum")
#: `capture.act_sums` values and the dtype each stores.
SUM_DTYPES: dict[str, str | None] = {"none": None, "float16": "float16", "float32": "float32"}
COUNT_MAX = np.iinfo(np.uint16).max

warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")


def _codec(typesize: int) -> BloscCodec:
    # lz4 + bit shuffle: counts are ~1.2x larger than with zstd but decode 2-4x faster (bench/cpu_scale.py),
    # and aggregation of thousands of instances is bound by decoding
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=typesize)


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
        act_sums: str = "float16",
    ) -> None:
        dups = [i for i, n in Counter(instance_ids).items() if n > 1]
        if dups:
            raise ValueError(f"instance ids of a shard must be unique; {dups[0]!r} appears more than once")
        if act_sums not in SUM_DTYPES:
            raise ValueError(f"capture.act_sums must be one of {list(SUM_DTYPES)}, got {act_sums!r}")
        sum_dtype = SUM_DTYPES[act_sums]
        if sum_squares and sum_dtype is None:
            raise ValueError("capture.sum_squares needs capture.act_sums (float16 or float32), not 'none'")
        self.final = Path(path)
        self._ctx = atomic_dir(self.final)
        tmp = self._ctx.__enter__()
        self.ids = list(instance_ids)
        self.row = {iid: i for i, iid in enumerate(self.ids)}
        n, s = len(self.ids), len(SPANS)
        self.group = zarr.open_group(tmp, mode="w", zarr_format=3)
        shape, chunks = (n, s, n_layers, n_neurons), (1, 1, n_layers, n_neurons)
        self.arrays: dict[str, Any] = {
            "pos_count": self.group.create_array(
                "pos_count", shape=shape, chunks=chunks, dtype="uint16", fill_value=0, compressors=_codec(2)
            )
        }
        if sum_dtype is not None:
            size = np.dtype(sum_dtype).itemsize
            names = ["act_sum", *(["act_sqsum"] if sum_squares else [])]
            for name in names:
                self.arrays[name] = self.group.create_array(
                    name, shape=shape, chunks=chunks, dtype=sum_dtype, fill_value=0.0, compressors=_codec(size)
                )
        self.group.create_array("tokens", shape=(n, s), chunks=(max(n, 1), s), dtype="int64", fill_value=0)
        self.written = np.zeros(n, dtype=bool)
        self.group.attrs.update(
            {
                **attrs,
                "layout": LAYOUT_VERSION,
                "act_sums": act_sums,
                "instance_ids": self.ids,
                "spans": list(SPANS),
                "n_layers": n_layers,
                "n_neurons": n_neurons,
            }
        )
        self._tokens = np.zeros((n, s), dtype=np.int64)

    def write(self, ids: list[str], stats: dict[str, np.ndarray]) -> None:
        rows = [self.row[i] for i in ids]
        counts = np.asarray(stats["pos_count"])
        if counts.size and (counts.max() > COUNT_MAX or counts.min() < 0):
            j = int(np.unravel_index(np.argmax(counts), counts.shape)[0])
            raise ValueError(
                f"instance {ids[j]!r}: a positive count of {int(counts.max())} does not fit the store's uint16 "
                "counts (more than 65535 valid positions in one span)"
            )
        for name, arr in self.arrays.items():
            data = np.asarray(stats[name]).astype(arr.dtype, copy=False)
            for j, r in enumerate(rows):
                arr[r] = data[j]
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
    g = zarr.open_group(path, mode="r")
    layout = int(g.attrs.get("layout", 1))
    if layout > LAYOUT_VERSION:
        raise ValueError(
            f"statistics store {path} has layout {layout}, newer than this code reads ({LAYOUT_VERSION}); "
            "update emotion-neurons or regenerate the store"
        )
    return g


READ_ROWS = 16  # instances per read: bounds the memory of one worker to 16 chunks per span


def _direct_chunks(arr: Any) -> Any:
    """A factory of readers of one (row, span) chunk straight from its file, for arrays laid out as this module writes
    them (local zarr v3, one chunk per instance and span, little-endian bytes + Blosc, "/" chunk keys, fill 0),
    or None for anything else (read through zarr then).

    Why: zarr's per-chunk machinery cost about 1.4 ms of CPU per chunk against 0.9 ms for the Blosc decode
    itself, and mostly under the GIL, so aggregating 10,000 instances (30,000 chunks) was bound by it
    (bench/cpu_scale.py). A chunk file that does not exist holds only the fill value (zarr does not write
    empty chunks): the reader returns None for it. A reader reuses one buffer: one reader per thread.
    """
    try:
        from numcodecs import blosc
        from zarr.codecs import BloscCodec, BytesCodec
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
        from zarr.storage import LocalStore

        md = arr.metadata
        codecs = tuple(md.codecs)
        ok = (
            md.zarr_format == 3
            and isinstance(arr.store, LocalStore)
            and len(codecs) == 2
            and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == "little")
            and isinstance(codecs[1], BloscCodec)
            and isinstance(md.chunk_key_encoding, DefaultChunkKeyEncoding)
            and md.chunk_key_encoding.separator == "/"
            and tuple(md.chunk_grid.chunk_shape) == (1, 1, *arr.shape[2:])
            and md.fill_value == 0
        )
    except (ImportError, AttributeError):
        return None
    if not ok:
        return None
    root = str(Path(arr.store.root) / arr.path / "c")
    dtype, shape = np.dtype(arr.dtype).newbyteorder("<"), tuple(arr.shape[2:])
    tail = "/".join(["0"] * len(shape))

    def reader() -> Any:
        out = np.empty(shape, dtype=dtype)  # one buffer per reader: no 1-MB allocation (page faults) per chunk

        def read(row: int, span: int) -> np.ndarray | None:
            try:
                with open(os.path.join(root, str(row), str(span), tail), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
            blosc.decompress(raw, out)
            return out

        return read

    return reader


def _read_rows(arr: Any, rows: np.ndarray, span_idx: list[int], direct: bool = True) -> np.ndarray:
    """Sum over `rows` and `span_idx` of one stage-1 array, reading only those chunks."""
    integer = np.issubdtype(arr.dtype, np.integer)
    acc_dtype = np.int64 if integer else np.float64
    # a block of READ_ROWS uint16 counts sums exactly in uint32, which is 3x faster than summing into int64
    block_dtype = np.uint32 if arr.dtype == np.uint16 else acc_dtype
    acc = np.zeros(arr.shape[2:], dtype=acc_dtype)
    rows = np.sort(rows)
    make_reader = _direct_chunks(arr) if direct else None
    if make_reader is not None:
        reader = make_reader()
        # up to 65,537 uint16 chunks sum exactly in uint32; flushed into the int64 total well before that
        block = np.zeros(arr.shape[2:], dtype=block_dtype)
        n = 0
        for r in rows:
            for s in span_idx:
                chunk = reader(int(r), s)
                if chunk is None:
                    continue
                np.add(block, chunk, out=block)
                n += 1
                if n == 60_000:
                    acc += block
                    block[:] = 0
                    n = 0
        acc += block
        return acc
    # contiguous runs of rows are read as one slice: one request per run and span, decoded in zarr's thread pool
    starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
    runs = np.split(rows, starts[1:]) if rows.size else []
    for run in runs:
        for s in span_idx:
            for lo in range(int(run[0]), int(run[-1]) + 1, READ_ROWS):
                hi = min(lo + READ_ROWS, int(run[-1]) + 1)
                acc += arr[lo:hi, s].sum(axis=0, dtype=block_dtype)
    return acc


def aggregate(
    stores: Iterable[str | Path],
    groups: dict[str, list[str]],
    spans: list[str],
    out: str | Path,
    attrs: dict[str, Any] | None = None,
    workers: int | None = None,
    direct: bool = True,
) -> None:
    """Sum the statistics of each emotion's kept instances into K, T, P = K/T and (with sums) M = sum/T.

    `groups` maps emotion -> instance ids (each must exist in exactly one store). Stores are read in
    parallel (`workers` threads; the Blosc decoder and numpy release the GIL), each array opened once, so
    memory holds the accumulators plus one slice per worker, independent of the number of instances.
    `direct`: read and decode the chunk files of stores laid out as this module writes them without zarr's
    per-chunk machinery (`_direct_chunks`); False reads everything through zarr (same sums).
    """
    unknown = [s for s in spans if s not in SPANS]
    if unknown:
        raise ValueError(f"tasks.<task>.spans has unknown spans {unknown}; expected a subset of {list(SPANS)}")
    stores = list(stores)
    if not stores:
        raise ValueError("no statistics stores given")
    opened = [open_store(p) for p in stores]
    where: dict[str, tuple[int, int]] = {}
    for si, g in enumerate(opened):
        for row, iid in enumerate(g.attrs["instance_ids"]):
            if iid in where:
                raise ValueError(
                    f"instance {iid} appears in more than one statistics store ({stores[where[iid][0]]}, {stores[si]})"
                )
            where[iid] = (si, row)
    ref = opened[0].attrs
    for g in opened[1:]:
        for key in ("n_layers", "n_neurons", "hook_site", "model_id", "component"):
            if g.attrs.get(key) != ref.get(key):
                raise ValueError(f"stores disagree on {key}: {g.attrs.get(key)!r} vs {ref.get(key)!r}")
    for si, g in enumerate(opened):
        store_spans = list(g.attrs.get("spans", SPANS))
        if store_spans != list(SPANS):
            raise ValueError(f"store {stores[si]} records spans {store_spans}, this code expects {list(SPANS)}")
    has_sums = all("act_sum" in g for g in opened)
    L, N = int(ref["n_layers"]), int(ref["n_neurons"])
    span_idx = [SPANS.index(s) for s in spans]
    emotions = list(groups)
    E = len(emotions)
    T = np.zeros(E, dtype=np.int64)
    tokens = [g["tokens"][:] for g in opened]
    jobs: list[tuple[int, int, str, np.ndarray]] = []  # (emotion, store, array name, rows)
    for e, emo in enumerate(emotions):
        per_store: dict[int, list[int]] = {}
        for iid in groups[emo]:
            if iid not in where:
                raise KeyError(f"kept instance {iid} ({emo}) has no statistics in the given stores")
            si, row = where[iid]
            per_store.setdefault(si, []).append(row)
            T[e] += tokens[si][row][span_idx].sum()
        for si, rows in per_store.items():
            for name in ("pos_count", *(["act_sum"] if has_sums else [])):
                jobs.append((e, si, name, np.asarray(rows, dtype=np.int64)))
    if (T == 0).any():
        empty = [emotions[i] for i in np.flatnonzero(T == 0)]
        raise ValueError(f"no valid tokens for emotions {empty}; check the filter and tasks.<task>.spans")
    arrays = {(si, name): opened[si][name] for _, si, name, _ in jobs}  # one open per array
    K = np.zeros((E, L, N), dtype=np.int64)
    S = np.zeros((E, L, N), dtype=np.float64) if has_sums else None
    n_workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = [(e, name, pool.submit(_read_rows, arrays[(si, name)], rows, span_idx, direct)) for e, si, name, rows in jobs]
        for e, name, fut in futures:
            if name == "pos_count":
                K[e] += fut.result()
            else:
                S[e] += fut.result()  # type: ignore[index]
    P = (K / T[:, None, None]).astype(np.float32)
    with atomic_dir(out) as tmp:
        g = zarr.open_group(tmp, mode="w", zarr_format=3)
        results = [("K", K), ("P", P)]
        if S is not None:
            results.append(("M", (S / T[:, None, None]).astype(np.float32)))
        for name, arr in results:
            g.create_array(name, shape=arr.shape, chunks=(1, L, N), dtype=arr.dtype)[:] = arr
        g.create_array("T", shape=T.shape, dtype=T.dtype)[:] = T
        g.attrs.update(
            {
                **{k: ref.get(k) for k in ("model_id", "revision", "component", "hook_site", "code_version")},
                **(attrs or {}),
                "emotions": emotions,
                "spans": spans,
                "has_mean_activation": S is not None,
                "n_instances": {e: len(groups[e]) for e in emotions},
                "n_layers": L,
                "n_neurons": N,
            }
        )


def load_aggregate(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """K, T, P and, when stage 1 stored activation sums, M (absent otherwise)."""
    g = open_store(path)
    arrays = {k: g[k][:] for k in ("K", "T", "P", "M") if k in g}
    return arrays, dict(g.attrs)
