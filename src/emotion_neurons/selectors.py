"""Emotion-sensitive neuron selectors (METHOD.md section 3, stage 4) and mask files.

Every selector turns the activation probability `P[e, l, n]` into one boolean mask per emotion of a fixed
budget, so that selectors, sparsities `r` and scopes can be compared at equal mask size. Numpy only: masks
are chosen on the CPU from the mergeable statistics of stage 1, no model needed.

Ranking is deterministic: a stable sort by score (descending), ties broken by the flat index (ascending)
of the neuron inside the ranked set (`l * N + n` for the global scope, `n` for the per-layer scope).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METHODS: tuple[str, ...] = ("lap", "lape", "mad", "cas", "random")
SCOPES: tuple[str, ...] = ("global", "per_layer")

#: Seeds of the random baseline mask; METHOD.md reports random as the mean over 5 seeds, so callers run
#: `select(P, "random", r, seed=s)` for each of these and average the evaluations (`metrics.average_random`).
RANDOM_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)

MASK_TENSOR = "mask"
_META_KEY = "meta_json"


# --------------------------------------------------------------------------------------------- budget


def budget(r: float, size: int) -> int:
    """Number of neurons kept out of `size` for a fraction `r`: round half up, at least 1 when r > 0.

    Python's `round` rounds half to even, which would make `r * size = 2.5` and `3.5` behave differently;
    half-up keeps the budget monotone and predictable.
    """
    k = int(np.floor(r * size + 0.5))
    if r > 0:
        k = max(k, 1)
    return min(k, size)


# ---------------------------------------------------------------------------------------- validation


def _validate(
    P: np.ndarray,
    method: str,
    r: float,
    scope: str,
    M: np.ndarray | None,
    lape_quantile: float | None,
) -> np.ndarray:
    if method not in METHODS:
        raise ValueError(f"unknown selector method {method!r}; valid methods: {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
    if isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating)):
        raise ValueError(f"r must be a number in (0, 1], got {r!r}")
    if not (0.0 < float(r) <= 1.0):
        raise ValueError(f"r must lie in (0, 1], got {r}")
    P = np.asarray(P)
    if P.ndim != 3:
        raise ValueError(f"P must be 3-D [emotions, layers, neurons], got shape {P.shape}")
    if not (np.issubdtype(P.dtype, np.floating) or np.issubdtype(P.dtype, np.integer)):
        raise ValueError(f"P must be numeric, got dtype {P.dtype}")
    E, L, N = P.shape
    if E < 2:
        raise ValueError(f"P must hold at least 2 emotions to contrast, got E={E}")
    if L < 1 or N < 1:
        raise ValueError(f"P has an empty layer or neuron axis: shape {P.shape}")
    P = P.astype(np.float64, copy=False)
    if np.isnan(P).any():
        raise ValueError(f"P contains {int(np.isnan(P).sum())} NaN values (empty emotion group?)")
    if np.isinf(P).any():
        raise ValueError("P contains infinite values")
    if M is not None and np.shape(M) != P.shape:
        raise ValueError(f"M must have the shape of P {P.shape}, got {np.shape(M)}")
    if lape_quantile is not None:
        if method != "lape":
            raise ValueError(f"lape_quantile only applies to method 'lape', not {method!r}")
        if not (0.0 <= float(lape_quantile) <= 1.0):
            raise ValueError(f"lape_quantile must lie in [0, 1], got {lape_quantile}")
    return P


# ---------------------------------------------------------------------------------------- scores


def _scores(
    P: np.ndarray, method: str, mad_signed: bool, lape_quantile: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Score [E, L, N] (higher = more specific) and eligibility [E, L, N] for a non-random method."""
    E = P.shape[0]
    if method == "lap":
        return P, np.ones(P.shape, dtype=bool)
    if method == "mad":
        dev = P - P.mean(axis=0, keepdims=True)
        return (dev if mad_signed else np.abs(dev)), np.ones(P.shape, dtype=bool)
    if method == "cas":
        # Top two emotions per neuron; stable argsort on -P puts the lowest emotion index first on ties.
        order = np.argsort(-P, axis=0, kind="stable")
        e1 = order[0]
        p_sorted = np.take_along_axis(P, order[:2], axis=0)
        gap = p_sorted[0] - p_sorted[1]
        is_top = np.arange(E)[:, None, None] == e1[None]
        score = np.where(is_top, gap[None], 0.0)
        return score, score > 0
    if method == "lape":
        total = P.sum(axis=0)
        fires = total > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            pt = np.where(fires[None], P / np.where(fires, total, 1.0)[None], 0.0)
            plogp = np.where(pt > 0, pt * np.log(np.where(pt > 0, pt, 1.0)), 0.0)
        H = -plogp.sum(axis=0)
        pmax = P.max(axis=0)
        keep = fires
        if lape_quantile is not None:
            keep = keep & (pmax >= np.quantile(pmax, float(lape_quantile)))
        owner = np.argmax(P, axis=0)  # first emotion on ties
        mine = np.arange(E)[:, None, None] == owner[None]
        score = np.broadcast_to(-H, P.shape)
        return score, mine & keep[None]
    raise AssertionError(method)  # unreachable: validated


def _top_k(score: np.ndarray, eligible: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best eligible entries of 1-D arrays: score desc, then index asc."""
    idx = np.flatnonzero(eligible)
    if idx.size == 0:
        return idx
    order = np.lexsort((idx, -score[idx]))  # last key is primary
    return idx[order[:k]]


def _flat_mask(idx: np.ndarray, L: int, N: int) -> np.ndarray:
    flat = np.zeros(L * N, dtype=bool)
    flat[idx] = True
    return flat.reshape(L, N)


# ---------------------------------------------------------------------------------------- select


def select(
    P: np.ndarray,
    method: str,
    r: float,
    scope: str = "global",
    seed: int = 0,
    *,
    M: np.ndarray | None = None,
    lape_quantile: float | None = None,
    mad_signed: bool = False,
) -> np.ndarray:
    """Boolean mask [E, L, N] of the neurons `method` finds most specific to each emotion.

    `P` is the activation probability [E, L, N]. Budget per emotion: `budget(r, L * N)` ranked over all
    layers jointly (`scope="global"`), or `budget(r, N)` in every layer (`scope="per_layer"`). `cas` and
    `lape` may return fewer neurons than the budget (only strictly positive contrasts / neurons owned by
    the emotion are eligible). `seed` is used by `random` only. `M` (mean activation) is accepted for
    interface stability and shape-checked; no selector of METHOD.md uses it.
    """
    P = _validate(P, method, r, scope, M, lape_quantile)
    E, L, N = P.shape
    mask = np.zeros((E, L, N), dtype=bool)

    if method == "random":
        for e in range(E):
            # One independent stream per emotion (and seed), so masks do not depend on E or on the order.
            rng = np.random.default_rng([int(seed), e])
            if scope == "global":
                k = budget(r, L * N)
                mask[e] = _flat_mask(rng.choice(L * N, size=k, replace=False), L, N)
            else:
                k = budget(r, N)
                for layer in range(L):
                    mask[e, layer, rng.choice(N, size=k, replace=False)] = True
        return mask

    score, eligible = _scores(P, method, mad_signed, lape_quantile)
    for e in range(E):
        if scope == "global":
            k = budget(r, L * N)
            mask[e] = _flat_mask(_top_k(score[e].reshape(-1), eligible[e].reshape(-1), k), L, N)
        else:
            k = budget(r, N)
            for layer in range(L):
                mask[e, layer, _top_k(score[e, layer], eligible[e, layer], k)] = True
    return mask


# ---------------------------------------------------------------------------------------- analysis


def layer_distribution(mask: np.ndarray) -> np.ndarray:
    """Selected neurons per emotion and layer [E, L] (Paper B's layer-wise distribution of ESNs)."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D [emotions, layers, neurons], got shape {mask.shape}")
    return mask.astype(bool).sum(axis=-1).astype(np.int64)


def overlap(mask: np.ndarray) -> np.ndarray:
    """Jaccard index [E, E] between emotions' masks (0 where both masks are empty)."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D [emotions, layers, neurons], got shape {mask.shape}")
    X = mask.reshape(mask.shape[0], -1).astype(bool)
    Xf = X.astype(np.float64)
    inter = Xf @ Xf.T
    sizes = X.sum(axis=1).astype(np.float64)
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# ---------------------------------------------------------------------------------------- files


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"provenance value of type {type(o).__name__} is not JSON-serialisable")


def meta_path(path: str | os.PathLike[str]) -> Path:
    """Provenance sidecar of a mask file: `<path minus .safetensors>.json`."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p.with_suffix(".json")
    return p.with_name(p.name + ".json")


def _atomic_write(target: Path, write: Any) -> None:
    """Call `write(tmp_path)` on a temp file beside `target`, then rename it over `target`."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_mask(
    path: str | os.PathLike[str],
    mask: np.ndarray,
    emotions: Sequence[str],
    provenance: dict[str, Any],
) -> None:
    """Write mask [E, L, N] (uint8 tensor "mask") and its JSON provenance, each atomically.

    The JSON carries emotions, selector, r, scope, seed (from `provenance`, None if absent), the counts per
    emotion and per layer, and every other key of `provenance`; the same JSON is embedded in the
    safetensors header so the mask file stays self-describing if the sidecar is lost.
    """
    from safetensors.numpy import save_file

    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D [emotions, layers, neurons], got shape {mask.shape}")
    emotions = [str(e) for e in emotions]
    if len(emotions) != mask.shape[0]:
        raise ValueError(f"{len(emotions)} emotion names for a mask of {mask.shape[0]} emotions")
    if len(set(emotions)) != len(emotions):
        raise ValueError(f"duplicate emotion names: {emotions}")
    mask = mask.astype(bool)
    dist = layer_distribution(mask)
    meta: dict[str, Any] = {
        "emotions": emotions,
        "shape": list(mask.shape),
        "selector": provenance.get("selector"),
        "r": provenance.get("r"),
        "scope": provenance.get("scope"),
        "seed": provenance.get("seed"),
        "counts": {e: int(dist[i].sum()) for i, e in enumerate(emotions)},
        "counts_per_layer": {e: dist[i].tolist() for i, e in enumerate(emotions)},
    }
    for key, value in provenance.items():
        if key not in ("emotions", "shape", "counts", "counts_per_layer"):
            meta[key] = value
    text = json.dumps(meta, indent=2, sort_keys=False, default=_json_default)

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = {MASK_TENSOR: np.ascontiguousarray(mask.astype(np.uint8))}
    _atomic_write(target, lambda tmp: save_file(data, tmp, metadata={_META_KEY: text}))

    def _write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")

    _atomic_write(meta_path(target), _write_json)


def load_mask(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a mask written by `save_mask`: (bool mask [E, L, N], provenance dict)."""
    from safetensors import safe_open

    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"mask file not found: {target}")
    with safe_open(str(target), framework="numpy") as fh:
        if MASK_TENSOR not in fh.keys():
            raise ValueError(f"{target} has no tensor {MASK_TENSOR!r} (tensors: {list(fh.keys())})")
        mask = fh.get_tensor(MASK_TENSOR).astype(bool)
        header = fh.metadata() or {}
    side = meta_path(target)
    if side.exists():
        meta = json.loads(side.read_text(encoding="utf-8"))
    elif _META_KEY in header:
        meta = json.loads(header[_META_KEY])
    else:
        meta = {}
    return mask, meta
