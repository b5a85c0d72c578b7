"""Selectors recover planted emotion-specific neurons; masks round-trip through files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emotion_neurons.selectors import (
    METHODS,
    RANDOM_SEEDS,
    budget,
    layer_distribution,
    load_mask,
    meta_path,
    overlap,
    save_mask,
    select,
)

E, L, N = 4, 3, 200
PLANT = 6  # specific neurons per emotion (2 per layer)
R = PLANT / (L * N)  # budget k == PLANT


def _planted(seed: int = 0) -> tuple[np.ndarray, list[set[int]], set[int]]:
    """P [E, L, N]: background shared across emotions, 6 specific neurons per emotion, 6 general ones.

    Returns P, the planted flat indices (l * N + n) per emotion, and the generally active ones.
    """
    rng = np.random.default_rng(seed)
    back = rng.uniform(0.2, 0.4, size=(L, N))
    P = back[None] + rng.normal(0.0, 0.005, size=(E, L, N))
    specific: list[set[int]] = [set() for _ in range(E)]
    general: set[int] = set()
    for layer in range(L):  # 2 per layer and emotion, so the per-layer scope can recover them too
        perm = rng.permutation(N)
        for e in range(E):
            for n in perm[2 * e : 2 * e + 2]:
                P[:, layer, n] = 0.1
                P[e, layer, n] = 0.9
                specific[e].add(int(layer * N + n))
        for n in perm[2 * E : 2 * E + 2]:
            P[:, layer, n] = 0.95 + rng.normal(0.0, 0.005, size=E)
            general.add(int(layer * N + n))
    return np.clip(P, 0.0, 1.0), specific, general


def _sets(mask: np.ndarray) -> list[set[int]]:
    return [set(np.flatnonzero(mask[e].reshape(-1)).tolist()) for e in range(mask.shape[0])]


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, list[set[int]], set[int]]:
    return _planted()


def test_budget_rounds_half_up_and_keeps_one() -> None:
    assert budget(0.005, 600) == 3
    assert budget(0.0025, 1000) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert budget(1e-9, 100) == 1
    assert budget(1.0, 37) == 37


@pytest.mark.parametrize("method", ["cas", "mad", "lape"])
def test_specific_selectors_recover_planted(planted, method: str) -> None:
    P, specific, general = planted
    mask = select(P, method, R)
    assert mask.dtype == bool and mask.shape == (E, L, N)
    assert _sets(mask) == specific
    assert not (set().union(*_sets(mask)) & general)


def test_mad_signed_recovers_planted(planted) -> None:
    P, specific, _ = planted
    assert _sets(select(P, "mad", R, mad_signed=True)) == specific


def test_lap_picks_generally_active(planted) -> None:
    P, _, general = planted
    assert _sets(select(P, "lap", R)) == [general] * E


def test_lape_quantile_prefilter_drops_rarely_active(planted) -> None:
    P, specific, _ = planted
    P = P.copy()
    # A neuron that fires only for emotion 0, but rarely: entropy 0, so lape ranks it first ...
    rare = next(i for i in range(L * N) if i not in set().union(*specific) and P[0].reshape(-1)[i] < 0.4)
    P.reshape(E, -1)[:, rare] = 0.0
    P.reshape(E, -1)[0, rare] = 0.01
    assert rare in _sets(select(P, "lape", R))[0]
    # ... unless the pre-filter keeps only neurons whose max P reaches the median.
    filtered = select(P, "lape", R, lape_quantile=0.5)
    assert _sets(filtered) == specific


def test_per_layer_scope_gives_k_per_layer(planted) -> None:
    P, specific, _ = planted
    for method in METHODS:
        mask = select(P, method, 0.02, scope="per_layer")  # k = 4 of 200 per layer
        assert (layer_distribution(mask) == 4).all(), method
    cas = select(P, "cas", 2 / N, scope="per_layer")
    assert _sets(cas) == specific


def test_random_is_chance_reproducible_and_seeded(planted) -> None:
    P, specific, _ = planted
    a = select(P, "random", R, seed=3)
    assert np.array_equal(a, select(P, "random", R, seed=3))
    assert not np.array_equal(a, select(P, "random", R, seed=4))
    assert (a.reshape(E, -1).sum(1) == PLANT).all()
    assert len({frozenset(s) for s in _sets(a)}) == E  # independent per emotion
    hits = [
        len(s & specific[e]) / PLANT
        for seed in range(60)
        for e, s in enumerate(_sets(select(P, "random", R, seed=seed)))
    ]
    assert np.mean(hits) < 0.05  # chance is PLANT / (L * N) = 0.01; selectors above get 1.0
    assert RANDOM_SEEDS == (0, 1, 2, 3, 4)


def test_ties_break_by_flat_index() -> None:
    P = np.full((2, 2, 5), 0.5)
    mask = select(P, "lap", 0.3)  # k = 3 of 10
    assert _sets(mask) == [{0, 1, 2}, {0, 1, 2}]
    assert not select(P, "cas", 0.3).any()  # no strictly positive contrast anywhere


def test_cas_only_positive_scores() -> None:
    P = np.full((2, 1, 4), 0.3)
    P[0, 0, 1] = 0.5
    mask = select(P, "cas", 1.0)  # budget 4 but only one neuron has a positive contrast
    assert _sets(mask) == [{1}, set()]


def test_lape_assigns_to_argmax_only(planted) -> None:
    P, _, _ = planted
    mask = select(P, "lape", 0.2)
    assert not (mask.sum(axis=0) > 1).any()
    owner = P.argmax(axis=0)
    for e in range(E):
        assert (owner[mask[e]] == e).all()


def test_layer_distribution_and_overlap() -> None:
    m = np.zeros((3, 2, 4), bool)
    m[0, 0, [0, 1]] = True
    m[1, 0, [1, 2]] = True
    m[1, 1, 3] = True
    np.testing.assert_array_equal(layer_distribution(m), [[2, 0], [2, 1], [0, 0]])
    J = overlap(m)
    np.testing.assert_allclose(J, [[1, 1 / 4, 0], [1 / 4, 1, 0], [0, 0, 0]])


def test_save_load_round_trip(tmp_path, planted) -> None:
    P, _, _ = planted
    mask = select(P, "cas", R, scope="global")
    path = tmp_path / "masks" / "cas-r0.01.safetensors"
    emotions = ["angry", "happy", "sad", "surprise"]
    save_mask(
        path, mask, emotions, {"selector": "cas", "r": R, "scope": "global", "seed": 0, "c": np.int64(50)}
    )
    got, meta = load_mask(path)
    assert got.dtype == bool and np.array_equal(got, mask)
    assert meta["emotions"] == emotions
    assert meta["selector"] == "cas" and meta["scope"] == "global" and meta["seed"] == 0 and meta["c"] == 50
    assert meta["counts"] == {e: PLANT for e in emotions}
    assert meta["counts_per_layer"]["angry"] == [2, 2, 2]
    assert sorted(p.name for p in path.parent.iterdir()) == ["cas-r0.01.json", "cas-r0.01.safetensors"]
    assert json.loads(meta_path(path).read_text())["r"] == R
    # Overwrite atomically; still no temp files; metadata embedded in the header survives a lost sidecar.
    save_mask(path, ~mask, emotions, {"selector": "x"})
    meta_path(path).unlink()
    got, meta = load_mask(path)
    assert np.array_equal(got, ~mask) and meta["selector"] == "x"
    assert [p.name for p in path.parent.iterdir()] == ["cas-r0.01.safetensors"]


def test_save_rejects_mismatched_emotions(tmp_path) -> None:
    with pytest.raises(ValueError, match="emotion names"):
        save_mask(tmp_path / "m.safetensors", np.zeros((2, 1, 3), bool), ["a"], {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(method="bogus"),
            r"unknown selector method 'bogus'; valid methods: lap, lape, mad, cas, random",
        ),
        (dict(r=0.0), r"r must lie in \(0, 1\]"),
        (dict(r=1.5), r"r must lie in \(0, 1\]"),
        (dict(P=np.zeros((2, 3))), r"P must be 3-D"),
        (dict(P=np.zeros((1, 2, 3))), r"at least 2 emotions"),
        (dict(P=np.array([[[np.nan]], [[0.1]]])), r"NaN"),
        (dict(scope="layer"), r"unknown scope 'layer'"),
        (dict(M=np.zeros((1, 1, 1))), r"M must have the shape of P"),
        (dict(lape_quantile=0.5), r"lape_quantile only applies to method 'lape'"),
        (dict(method="lape", lape_quantile=2.0), r"lape_quantile must lie in \[0, 1\]"),
    ],
)
def test_invalid_inputs(kwargs: dict, match: str) -> None:
    args = dict(P=np.full((2, 2, 3), 0.5), method="lap", r=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select(args.pop("P"), args.pop("method"), args.pop("r"), **args)
