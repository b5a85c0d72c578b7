"""Emotion-sensitive neuron selectors (METHOD.md section 3, stage 4) and mask files.

Every selector turns the activation probability `P[e, l, n]` into one boolean mask per emotion. `lap`,
`mad`, `cas` and `lape` (variant `argmax`) rank neurons per emotion and keep a budget `budget(r, size)`;
`lape` (variant `tang`, the default) reproduces Tang et al. (2024): one shared low-entropy pool whose
neurons belong to every emotion they fire strongly for, so masks differ in size. The `random` control is
not a selector of P: `random_control` draws, for a given selector mask, random neurons of the same realised
size per emotion (and, by default, the same count in every layer). Numpy only: masks are chosen on the CPU
from the mergeable statistics of stage 1, no model needed.

Ties: P = K/T is quantised, so equal scores at the cut-off are common. They are broken by a seeded random
permutation of the neurons (never by index, which would favour layer 0); scores are compared after rounding
to 1e-12 so that values equal up to float rounding tie too. `select_with_info` reports, per emotion, how many
neurons shared the score at the cut-off (`tied`) and how many of them were taken (`taken`).
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .registry import Registry
from .sites import HOOK_SITES, aliases

#: A selector turns P [E, L, N] into a mask [E, L, N] and an info dict (`ties` per emotion, extras under its
#: name): `fn(P, r, scope, seed, **params)`. Add one with `@selector` (full control) or `@ranking` (a
#: per-emotion score, ranked here); its keyword parameters are config `select.<name>`.
SELECTORS: Registry[Selector] = Registry("selector")
#: The matched control of another selector's mask (not a selector of P; see `random_control`).
RANDOM = "random"
SCOPES: tuple[str, ...] = ("global", "per_layer")
LAPE_VARIANTS: tuple[str, ...] = ("tang", "argmax")
RANDOM_MATCH: tuple[str, ...] = ("layers", "size")

#: Default seeds of the random control; METHOD.md reports random as the mean over 5 seeds.
RANDOM_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)

MASK_TENSOR = "mask"
_META_KEY = "meta_json"
_SCORE_DECIMALS = 12


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


def order_statistic(values: np.ndarray, rate: float) -> float:
    """The `round(size * rate)`-th smallest value (1-based, at least the 1st), as `torch.kthvalue` in Tang et al."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    k = min(max(int(round(flat.size * float(rate))), 1), flat.size)
    return float(np.partition(flat, k - 1)[k - 1])


# ---------------------------------------------------------------------------------------- validation


def _check_rate(name: str, value: float | None, allow_none: bool) -> None:
    if value is None:
        if not allow_none:
            raise ValueError(f"{name} must be a number in (0, 1], got None")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {value}")


def _validate(P: np.ndarray, method: str, r: float, scope: str, M: np.ndarray | None) -> np.ndarray:
    if method == RANDOM:
        raise ValueError("'random' is a control of another selector's mask: use random_control(mask, seed, match)")
    if method not in SELECTORS:
        raise ValueError(f"unknown selector method {method!r}; valid methods: {', '.join(SELECTORS.names())}")
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
    return P


# ---------------------------------------------------------------------------------------- scores


def entropy(P: np.ndarray) -> np.ndarray:
    """LAPE entropy [L, N] of each neuron's activation probabilities normalised over emotions (0 if it never fires)."""
    total = P.sum(axis=0)
    fires = total > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        pt = np.where(fires[None], P / np.where(fires, total, 1.0)[None], 0.0)
        plogp = np.where(pt > 0, pt * np.log(np.where(pt > 0, pt, 1.0)), 0.0)
    return -plogp.sum(axis=0)


def _lape_eligible(P: np.ndarray, filter_rate: float | None) -> np.ndarray:
    """[L, N]: fires at all and, with a filter, some P_e strictly above the filter_rate order statistic of all P."""
    keep = P.sum(axis=0) > 0
    if filter_rate is not None:
        keep &= (P > order_statistic(P, filter_rate)).any(axis=0)
    return keep


def _top_k(score: np.ndarray, eligible: np.ndarray, k: int, keys: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Indices of the k best eligible entries of 1-D arrays (score desc, ties by the random `keys`) and tie counts.

    `tied` counts the eligible entries whose (rounded) score equals the k-th best, `taken` how many of those
    were kept; tied > taken means the permutation decided. No cut-off when all eligible entries fit.
    """
    idx = np.flatnonzero(eligible)
    if idx.size <= k:
        return idx, {"cutoff": None, "tied": 0, "taken": 0, "eligible": int(idx.size)}
    s = np.round(score[idx], _SCORE_DECIMALS)
    order = np.lexsort((keys[idx], -s))  # last key is primary
    chosen = order[:k]
    cut = s[order[k - 1]]
    tie = {
        "cutoff": float(cut),
        "tied": int((s == cut).sum()),
        "taken": int((s[chosen] == cut).sum()),
        "eligible": int(idx.size),
    }
    return idx[chosen], tie


def _merge_ties(ties: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer tie counts summed (scope per_layer): one cut-off per layer."""
    return {
        "cutoff": None,
        "tied": int(sum(t["tied"] for t in ties)),
        "taken": int(sum(t["taken"] for t in ties)),
        "eligible": int(sum(t["eligible"] for t in ties)),
    }


def _ranked(
    score: np.ndarray, eligible: np.ndarray, fraction: float, scope: str, keys: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """Boolean [L, N] of the best `fraction` eligible neurons, globally or in every layer, and the tie counts."""
    L, N = score.shape
    out = np.zeros(L * N, dtype=bool)
    if scope == "global":
        idx, tie = _top_k(score.reshape(-1), eligible.reshape(-1), budget(fraction, L * N), keys)
        out[idx] = True
        return out.reshape(L, N), tie
    out2 = out.reshape(L, N)
    k = budget(fraction, N)
    ties = []
    for layer in range(L):
        idx, tie = _top_k(score[layer], eligible[layer], k, keys.reshape(L, N)[layer])
        out2[layer, idx] = True
        ties.append(tie)
    return out2, _merge_ties(ties)


def _tie_keys(seed: int, size: int, stream: int) -> np.ndarray:
    """A seeded random permutation used as the secondary sort key (rank of each neuron among equals)."""
    return np.random.default_rng([int(seed), int(stream)]).permutation(size)


# ---------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Selector:
    """A registered selector: `fn(P, r, scope, seed, **params) -> (mask, info)` and its parameters.

    `params` maps each keyword parameter of `fn` to the JSON-schema of its config value under
    `select.<name>`; defaults come from `fn`'s signature, so they are written once.
    """

    name: str
    fn: Callable[..., tuple[np.ndarray, dict[str, Any]]]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        sig = inspect.signature(self.fn).parameters
        return {k: sig[k].default for k in self.params}

    def schema(self) -> dict[str, Any]:
        """JSON-schema of `select.<name>` (injected into the config schema at start-up)."""
        d = self.defaults()
        props = {k: {**s, "default": d[k]} for k, s in self.params.items()}
        return {"type": "object", "additionalProperties": False, "default": {}, "properties": props}

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The defaults updated by `params`; an unknown parameter is an error naming the selector."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(
                f"selector {self.name!r} has no parameter(s) {unknown} (config select.{self.name}); "
                f"it takes: {', '.join(self.params) or 'none'}"
            )
        return {**self.defaults(), **params}


def _check_declared(name: str, fn: Callable[..., Any], params: dict[str, dict[str, Any]], skip: int) -> None:
    sig = list(inspect.signature(fn).parameters.values())[skip:]
    kw = {p.name for p in sig if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if kw != set(params) or any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in sig):
        raise TypeError(
            f"selector {name!r}: after {skip} positional argument(s) take exactly the declared parameters "
            f"{sorted(params)} as keyword-only arguments with defaults, got {[p.name for p in sig]}"
        )
    if any(p.default is inspect.Parameter.empty for p in sig):
        raise TypeError(f"selector {name!r}: every parameter needs a default")


def selector(name: str, params: dict[str, dict[str, Any]] | None = None) -> Callable[[Any], Any]:
    """Register `fn(P, r, scope, seed, *, <params>) -> (mask [E, L, N], info)`; `info["ties"]` per emotion."""

    def add(fn: Callable[..., tuple[np.ndarray, dict[str, Any]]]) -> Callable[..., Any]:
        _check_declared(name, fn, dict(params or {}), 4)
        SELECTORS.register(name, Selector(name, fn, dict(params or {})))
        return fn

    return add


def ranking(name: str, params: dict[str, dict[str, Any]] | None = None) -> Callable[[Any], Any]:
    """Register a per-emotion ranking: `score(P, *, <params>) -> (score, eligible)`, both [E, L, N].

    Each emotion keeps its `budget(r, size)` best eligible neurons (higher score first; ties broken by a
    seeded permutation), over all layers (`scope="global"`) or in every layer (`"per_layer"`).
    """

    def add(score_fn: Callable[..., tuple[np.ndarray, np.ndarray]]) -> Callable[..., Any]:
        _check_declared(name, score_fn, dict(params or {}), 1)

        def fn(P: np.ndarray, r: float, scope: str, seed: int, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
            score, eligible = score_fn(P, **kw)
            return rank_per_emotion(score, eligible, r, scope, seed)

        fn.__signature__ = inspect.signature(score_fn).replace(  # type: ignore[attr-defined]
            parameters=[
                *(inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in ("P", "r", "scope", "seed")),
                *list(inspect.signature(score_fn).parameters.values())[1:],
            ]
        )
        SELECTORS.register(name, Selector(name, fn, dict(params or {})))
        return score_fn

    return add


def rank_per_emotion(
    score: np.ndarray, eligible: np.ndarray, r: float, scope: str, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Mask [E, L, N] of each emotion's best `r` eligible neurons, and the tie counts per emotion."""
    E, L, N = score.shape
    mask = np.zeros((E, L, N), dtype=bool)
    info: dict[str, Any] = {"tie_seed": int(seed), "ties": []}
    for e in range(E):
        mask[e], tie = _ranked(score[e], eligible[e], float(r), scope, _tie_keys(seed, L * N, e))
        info["ties"].append(tie)
    return mask, info


_RATE = {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1}


@ranking("lap")
def lap(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Highest activation probability per emotion."""
    return P, np.ones(P.shape, dtype=bool)


@ranking("mad", params={"signed": {"type": "boolean"}})
def mad(P: np.ndarray, *, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Largest deviation of P_e from the mean over emotions (|.| unless `signed`)."""
    dev = P - P.mean(axis=0, keepdims=True)
    return (dev if signed else np.abs(dev)), np.ones(P.shape, dtype=bool)


@ranking("cas")
def cas(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gap between the top two emotions, owned by the top one; a tie for the top gives gap 0 (no owner)."""
    E = P.shape[0]
    order = np.argsort(-P, axis=0, kind="stable")
    e1 = order[0]
    p_sorted = np.take_along_axis(P, order[:2], axis=0)
    gap = p_sorted[0] - p_sorted[1]
    is_top = np.arange(E)[:, None, None] == e1[None]
    score = np.where(is_top, gap[None], 0.0)
    return score, score > 0


@selector(
    "lape",
    params={
        "variant": {"enum": list(LAPE_VARIANTS)},
        "filter_rate": _RATE,
        "top_rate": _RATE,
        "activation_bar_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    },
)
def lape(
    P: np.ndarray,
    r: float,
    scope: str,
    seed: int,
    *,
    variant: str = "tang",
    filter_rate: float | None = 0.95,
    top_rate: float | None = None,
    activation_bar_ratio: float = 0.95,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Language-activation-probability entropy (Tang et al. 2024): `tang` (shared pool) or `argmax`."""
    if variant not in LAPE_VARIANTS:
        raise ValueError(f"unknown lape variant {variant!r}; valid variants: {', '.join(LAPE_VARIANTS)}")
    _check_rate("lape filter_rate", filter_rate, allow_none=True)
    _check_rate("lape top_rate", top_rate, allow_none=True)
    _check_rate("lape activation_bar_ratio", activation_bar_ratio, allow_none=variant != "tang")
    E, L, N = P.shape
    if variant == "tang":
        eligible = _lape_eligible(P, filter_rate)
        keys = _tie_keys(seed, L * N, 1 << 20)  # the shared pool: its own stream
        pool, tie = _ranked(-entropy(P), eligible, float(top_rate if top_rate is not None else r), scope, keys)
        bar = order_statistic(P, activation_bar_ratio)
        mask = np.zeros((E, L, N), dtype=bool)
        mask[:] = pool[None] & (P > bar)
        info: dict[str, Any] = {"tie_seed": int(seed), "ties": [dict(tie) for _ in range(E)]}  # one pool, one cut-off
        info["lape"] = {
            "variant": "tang",
            "filter_bar": order_statistic(P, filter_rate) if filter_rate is not None else None,
            "activation_bar": bar,
            "n_eligible": int(eligible.sum()),
            "pool_size": int(pool.sum()),
            "unassigned": int((pool & ~mask.any(axis=0)).sum()),
        }
        return mask, info
    # argmax: budget r per emotion, lowest entropy first, among eligible neurons whose unique argmax is e
    H = entropy(P)
    keep = _lape_eligible(P, filter_rate)
    top2 = np.sort(P, axis=0)[-2:]
    unique_max = top2[1] > top2[0]  # a maximum shared by two emotions has no owner
    owner = np.argmax(P, axis=0)
    mine = np.arange(E)[:, None, None] == owner[None]
    mask, info = rank_per_emotion(np.broadcast_to(-H, P.shape), mine & (keep & unique_max)[None], r, scope, seed)
    info["lape"] = {"variant": "argmax", "filter_bar": order_statistic(P, filter_rate) if filter_rate else None}
    return mask, info


# ---------------------------------------------------------------------------------------- select


def select_with_info(
    P: np.ndarray,
    method: str,
    r: float,
    scope: str = "global",
    seed: int = 0,
    *,
    M: np.ndarray | None = None,
    **params: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Boolean mask [E, L, N] of the neurons `method` finds most specific to each emotion, and its provenance.

    `P` is the activation probability [E, L, N]; `method` a name in `SELECTORS`, `params` its parameters
    (config `select.<method>`, defaults from its signature). Ranking selectors keep `budget(r, L * N)`
    neurons per emotion ranked over all layers jointly (`scope="global"`) or `budget(r, N)` in every layer
    (`"per_layer"`); `cas` and `lape` may keep fewer (only strictly positive contrasts / eligible, owned
    neurons count). `seed` seeds the tie-breaking permutation. `lape` variant `tang`: neurons with some P_e
    strictly above the `filter_rate` order statistic of all P are eligible; the `top_rate` (default `r`)
    fraction of all neurons with the lowest entropy forms one pool; a pooled neuron belongs to every emotion
    whose P_e is strictly above the `activation_bar_ratio` order statistic of all P. Variant `argmax`: budget
    `r` per emotion, lowest entropy first, among the eligible neurons whose unique argmax emotion is e
    (`filter_rate=None` turns the pre-filter off). `M` is shape-checked; no selector of METHOD.md uses it.
    The info dict holds `ties` (per emotion index: cutoff, tied, taken, eligible) and selector extras.
    """
    P = _validate(P, method, r, scope, M)
    sel = SELECTORS[method]
    mask, info = sel.fn(P, float(r), scope, int(seed), **sel.check_params(params))
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != P.shape or len(info.get("ties", ())) != P.shape[0]:
        raise ValueError(
            f"selector {method!r} returned a mask of shape {mask.shape} and {len(info.get('ties', ()))} tie "
            f"records; expected {P.shape} and one per emotion"
        )
    info.setdefault("tie_seed", int(seed))
    return mask, info


def select(P: np.ndarray, method: str, r: float, scope: str = "global", seed: int = 0, **kwargs: Any) -> np.ndarray:
    """The mask of `select_with_info` alone."""
    return select_with_info(P, method, r, scope, seed, **kwargs)[0]


def random_control(mask: np.ndarray, seed: int, match: str = "layers", stream: str = "") -> np.ndarray:
    """A random mask of the realised size of `mask` per emotion: the same count in every layer (`match="layers"`)
    or the same total drawn uniformly over all layers (`"size"`).

    One stream per (seed, `stream`, emotion): controls of different selectors (pass the selector name as
    `stream`) are independent, and an emotion's control does not depend on the other emotions.
    """
    if match not in RANDOM_MATCH:
        raise ValueError(f"unknown random match {match!r}; valid: {', '.join(RANDOM_MATCH)}")
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D [emotions, layers, neurons], got shape {mask.shape}")
    E, L, N = mask.shape
    out = np.zeros_like(mask)
    tag = zlib.crc32(str(stream).encode())
    for e in range(E):
        rng = np.random.default_rng([int(seed), tag, e])
        if match == "layers":
            for layer, k in enumerate(mask[e].sum(axis=1).tolist()):
                out[e, layer, rng.choice(N, size=int(k), replace=False)] = True
        else:
            flat = np.zeros(L * N, dtype=bool)
            flat[rng.choice(L * N, size=int(mask[e].sum()), replace=False)] = True
            out[e] = flat.reshape(L, N)
    return out


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


def export_path(path: str | os.PathLike[str]) -> Path:
    """Plain-JSON neuron list beside a mask file: `<path minus .safetensors>.neurons.json`."""
    p = Path(path)
    return p.with_suffix(".neurons.json") if p.suffix == ".safetensors" else p.with_name(p.name + ".neurons.json")


#: format tag of the neuron export (readable with `json` alone, no numpy, safetensors or this package)
EXPORT_FORMAT = "emotion-neurons/neuron-ids/v1"


def neuron_export(mask: np.ndarray, emotions: Sequence[str], meta: dict[str, Any]) -> dict[str, Any]:
    """`neurons[emotion][layer]`: sorted neuron indices of that layer's MLP, plus where to hook them.

    `hook_site_aliases.transformer_lens` is the TransformerLens hook name (`blocks.{layer}.mlp.hook_pre` for
    `pre_act`, `...hook_post` for `gated_product`; null for `gate`, which TransformerLens does not expose).
    """
    E, L, N = mask.shape
    return {
        "format": EXPORT_FORMAT,
        "emotions": list(emotions),
        "n_layers": int(L),
        "n_neurons": int(N),
        **{k: meta.get(k) for k in ("model_id", "revision", "component", "hook_site", "hook_site_aliases",
                                    "selector", "r", "control_of")},
        "neurons": {e: [np.flatnonzero(mask[i, layer]).tolist() for layer in range(L)] for i, e in enumerate(emotions)},
    }


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
    """Write mask [E, L, N] (uint8 tensor "mask"), its JSON provenance and the plain neuron export
    (`export_path`, see `neuron_export`), each atomically.

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
    if meta.get("hook_site") in HOOK_SITES:  # the site's names in TransformerLens / module paths
        meta["hook_site_aliases"] = aliases(meta["hook_site"])
    text = json.dumps(meta, indent=2, sort_keys=False, default=_json_default)

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = {MASK_TENSOR: np.ascontiguousarray(mask.astype(np.uint8))}
    _atomic_write(target, lambda tmp: save_file(data, tmp, metadata={_META_KEY: text}))

    def _write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")

    _atomic_write(meta_path(target), _write_json)
    export = json.dumps(neuron_export(mask, emotions, meta), default=_json_default)

    def _write_export(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(export + "\n")

    _atomic_write(export_path(target), _write_export)


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
