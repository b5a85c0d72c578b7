"""Selectors recover planted emotion-specific neurons, break ties without a layer bias, LAPE matches Tang
et al.'s identify.py, random controls match the selector's mask; masks round-trip through files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import chisquare

from emotion_neurons.selectors import (
    RANDOM_SEEDS,
    budget,
    entropy,
    layer_distribution,
    load_mask,
    meta_path,
    order_statistic,
    overlap,
    random_control,
    save_mask,
    select,
    select_with_info,
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
    mask = select(P, method, R, **({"variant": "argmax"} if method == "lape" else {}))
    assert mask.dtype == bool and mask.shape == (E, L, N)
    assert _sets(mask) == specific
    assert not (set().union(*_sets(mask)) & general)


def test_mad_signed_recovers_planted(planted) -> None:
    P, specific, _ = planted
    assert _sets(select(P, "mad", R, signed=True)) == specific


def test_lap_picks_generally_active(planted) -> None:
    P, _, general = planted
    assert _sets(select(P, "lap", R)) == [general] * E


def test_lape_argmax_prefilter_drops_rarely_active(planted) -> None:
    P, specific, _ = planted
    P = P.copy()
    # A neuron that fires only for emotion 0, but rarely: entropy 0, so lape ranks it first ...
    rare = next(i for i in range(L * N) if i not in set().union(*specific) and P[0].reshape(-1)[i] < 0.4)
    P.reshape(E, -1)[:, rare] = 0.0
    P.reshape(E, -1)[0, rare] = 0.01
    assert rare in _sets(select(P, "lape", R, variant="argmax", filter_rate=None))[0]
    # ... unless the pre-filter (the default, 0.95 order statistic of all P) keeps it out.
    assert _sets(select(P, "lape", R, variant="argmax")) == specific


@pytest.mark.parametrize("variant", ["tang", "argmax"])
def test_lape_default_ignores_neurons_that_fired_once(variant: str) -> None:
    """Quantised P with many neurons that fired once (P = 1/T, entropy 0): none of them may win."""
    rng = np.random.default_rng(5)
    E_, L_, N_, T = 4, 6, 500, 2000
    K = rng.binomial(T, rng.uniform(0.05, 0.6, size=(1, L_, N_)), size=(E_, L_, N_))  # broad, shared
    once = rng.choice(L_ * N_, size=400, replace=False)
    K.reshape(E_, -1)[:, once] = 0
    K.reshape(E_, -1)[rng.integers(0, E_, size=once.size), once] = 1  # fired exactly once, for one emotion
    planted = rng.choice(np.setdiff1d(np.arange(L_ * N_), once), size=(E_, 5), replace=False)
    for e in range(E_):
        K.reshape(E_, -1)[:, planted[e]] = int(0.02 * T)
        K.reshape(E_, -1)[e, planted[e]] = int(0.9 * T)
    P = K / T
    mask = select(P, "lape", 20 / (L_ * N_), variant=variant)
    chosen = np.flatnonzero(mask.any(axis=0).reshape(-1))
    assert chosen.size and not np.isin(chosen, once).any()
    for e in range(E_):
        assert set(planted[e]) <= set(np.flatnonzero(mask[e].reshape(-1)))
    # the old default (no pre-filter) would have let them win
    old = select(P, "lape", 20 / (L_ * N_), variant="argmax", filter_rate=None)
    assert np.isin(np.flatnonzero(old.any(axis=0).reshape(-1)), once).sum() > 10


def _tang_reference(P: np.ndarray, top_rate: float, filter_rate: float = 0.95, bar_ratio: float = 0.95) -> list[set]:
    """Tang et al.'s identify.py, re-implemented from its description in numpy: [E, L, N] -> flat index sets.

    kthvalue(round(len * rate)) of all probabilities; entropy of P normalised over emotions (0 log 0 = 0);
    neurons with no P_e above the first bar get entropy +inf; the round(L * N * top_rate) lowest entropies
    form the pool; emotion e keeps the pooled neurons with P_e above the second bar.
    """
    E_, L_, N_ = P.shape
    probs = np.moveaxis(P, 0, -1)  # layer x inter x lang, as in identify.py
    flat = np.sort(probs.reshape(-1))
    top_prob_value = flat[round(flat.size * filter_rate) - 1]
    normed = probs / probs.sum(-1, keepdims=True)
    normed[np.isnan(normed)] = 0
    logp = np.where(normed > 0, np.log(np.where(normed > 0, normed, 1)), 0)
    ent = -(normed * logp).sum(-1)
    ent[(probs > top_prob_value).sum(-1) == 0] = np.inf
    index = np.argsort(ent.reshape(-1), kind="stable")[: round(L_ * N_ * top_rate)]
    bar = flat[round(flat.size * bar_ratio) - 1]
    selected = probs.reshape(L_ * N_, E_)[index].T  # lang x n
    return [set(index[selected[e] > bar].tolist()) for e in range(E_)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("filter_rate", "bar_ratio"), [(0.95, 0.95), (0.9, 0.8)])
def test_lape_tang_matches_identify_py(seed: int, filter_rate: float, bar_ratio: float) -> None:
    rng = np.random.default_rng(seed)
    E_, L_, N_ = 5, 4, 250
    P = rng.beta(0.5, 3.0, size=(E_, L_, N_)) * rng.uniform(0.2, 1.0, size=(1, L_, N_))  # no ties
    top_rate = 0.05  # pool of 50
    got = select(P, "lape", 0.01, top_rate=top_rate, filter_rate=filter_rate, activation_bar_ratio=bar_ratio)
    ref = _tang_reference(P, top_rate, filter_rate, bar_ratio)
    assert _sets(got) == ref
    assert sum(len(x) for x in ref) > 0
    # r is the default pool fraction
    assert _sets(select(P, "lape", top_rate, filter_rate=filter_rate, activation_bar_ratio=bar_ratio)) == ref


def test_lape_tang_threshold_assignment_planted() -> None:
    """A shared pool: a neuron belongs to every emotion it fires strongly for, or to none; sizes differ."""
    E_, L_, N_ = 3, 2, 100
    P = np.full((E_, L_, N_), 0.05)
    P[:, 0, 0] = [0.9, 0.0, 0.0]  # emotion 0 only
    P[:, 0, 1] = [0.9, 0.9, 0.0]  # emotions 0 and 1 (low entropy: log 2 < log 3)
    P[:, 1, 2] = [0.0, 0.0, 0.8]  # emotion 2 only
    P[:, 1, 3] = [0.0, 0.0, 0.8]
    P[:, 1, 4] = [0.0, 0.0, 0.8]
    P[:, 1, 5] = [0.0, 0.0, 0.01]  # fires rarely: entropy 0 but below the filter bar
    mask, info = select_with_info(P, "lape", 0.03)  # pool of 6 of 200 (5 eligible)
    assert _sets(mask) == [{0, 1}, {1}, {N_ + 2, N_ + 3, N_ + 4}]
    assert info["lape"]["n_eligible"] == 5 and info["lape"]["pool_size"] == 5
    # a higher activation bar: the pool stays, neurons at 0.8 now belong to no emotion
    P2 = P.copy()
    P2[:, 1, 6:40] = 0.85  # many high values raise the 0.95 order statistic above 0.8, not above 0.85
    P2[:, 1, 6:40] += np.linspace(0, 0.01, 34) * np.array([[1], [0], [0]])  # low-ish but not 0 entropy
    mask2, info2 = select_with_info(P2, "lape", 0.03)
    assert info2["lape"]["activation_bar"] >= 0.8
    assert not mask2[2].any() and {0, 1} <= _sets(mask2)[0]


def test_order_statistic_is_kthvalue() -> None:
    x = np.arange(1, 21, dtype=float)[::-1]  # 20 values
    assert order_statistic(x, 0.95) == 19.0  # 19th smallest
    assert order_statistic(x, 0.5) == 10.0
    assert order_statistic(x, 0.001) == 1.0  # at least the 1st


def test_entropy_of_one_hot_and_uniform() -> None:
    P = np.zeros((4, 1, 3))
    P[0, 0, 0] = 0.3
    P[:, 0, 1] = 0.2
    np.testing.assert_allclose(entropy(P)[0], [0.0, np.log(4), 0.0])


def test_per_layer_scope_gives_k_per_layer(planted) -> None:
    P, specific, _ = planted
    for method in ("lap", "mad"):
        mask = select(P, method, 0.02, scope="per_layer")  # k = 4 of 200 per layer
        assert (layer_distribution(mask) == 4).all(), method
    cas = select(P, "cas", 2 / N, scope="per_layer")
    assert _sets(cas) == specific


def test_random_control_matches_realised_size_and_layers(planted) -> None:
    P, specific, _ = planted
    src = np.zeros((E, L, N), bool)
    src[0, 0, :7] = True  # realised sizes differ per emotion (as with tang or cas)
    src[1, 2, :3] = True
    src[1, 1, 10:12] = True
    a = random_control(src, 3, "layers", stream="lap")
    assert np.array_equal(a, random_control(src, 3, "layers", stream="lap"))
    assert not np.array_equal(a, random_control(src, 4, "layers", stream="lap"))
    assert not np.array_equal(a, random_control(src, 3, "layers", stream="mad"))  # independent per selector
    np.testing.assert_array_equal(layer_distribution(a), layer_distribution(src))
    b = random_control(src, 3, "size")
    np.testing.assert_array_equal(b.reshape(E, -1).sum(1), [7, 5, 0, 0])
    # size-matched controls spread over all layers; layer-matched ones never leave the source's layers
    spread = sum(layer_distribution(random_control(src, s, "size"))[0] for s in range(50))
    assert (spread > 0).all() and spread[0] < 0.6 * spread.sum()
    # chance level: a control of the planted mask hits ~ the planted fraction of its layers
    m = select(P, "cas", R)
    hits = [
        len(set(np.flatnonzero(random_control(m, s)[e].reshape(-1))) & specific[e]) / PLANT
        for s in range(60) for e in range(E)
    ]
    assert np.mean(hits) < 0.05
    assert RANDOM_SEEDS == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="unknown random match 'bogus'"):
        random_control(src, 0, "bogus")
    with pytest.raises(ValueError, match="'random' is a control"):
        select(P, "random", R)


def _tied_design(L_: int = 8, N_: int = 400, E_: int = 4) -> np.ndarray:
    """Quantised P: 10 neurons per layer and emotion fire at 0.5 for that emotion only (all tied), the rest
    0.1 for every emotion."""
    P = np.full((E_, L_, N_), 0.1)
    for layer in range(L_):
        for n in range(10 * E_):
            P[:, layer, n] = 0.0
            P[n % E_, layer, n] = 0.5
    return P


@pytest.mark.parametrize(("method", "kw"), [("lap", {}), ("mad", {}), ("cas", {}),
                                             ("lape", {"variant": "tang"}), ("lape", {"variant": "argmax"})])
def test_ties_are_broken_uniformly_across_layers(method: str, kw: dict) -> None:
    """80 tied candidates per emotion (10 per layer) for 32 places: picks must spread evenly over the 8 layers;
    breaking ties by flat index would put every pick in layers 0-3."""
    P = _tied_design()
    counts = np.zeros(P.shape[1])
    for seed in range(30):
        mask, info = select_with_info(P, method, 0.01, seed=seed, **kw)  # budget / pool 32 of 3200
        counts += layer_distribution(mask).sum(axis=0)
        if kw.get("variant") != "tang":
            assert all(t["tied"] == 80 and t["taken"] == 32 for t in info["ties"]), info["ties"]
        else:
            assert info["ties"][0]["tied"] == 320 and info["ties"][0]["taken"] == 32
    assert counts.sum() == 30 * 32 * (4 if kw.get("variant") != "tang" else 1)
    assert chisquare(counts).pvalue > 1e-3, counts
    # seeded: the same seed gives the same mask, another seed a different one
    assert np.array_equal(select(P, method, 0.01, seed=7, **kw), select(P, method, 0.01, seed=7, **kw))
    assert not np.array_equal(select(P, method, 0.01, seed=7, **kw), select(P, method, 0.01, seed=8, **kw))


def test_ties_recorded_and_none_without_competition(planted) -> None:
    P, _, _ = planted
    _, info = select_with_info(P, "cas", R)
    # the planted contrasts are all 0.9 - 0.1: six tied at the cut-off, all taken (no competition)
    assert [(t["tied"], t["taken"]) for t in info["ties"]] == [(PLANT, PLANT)] * E
    P = np.full((2, 2, 5), 0.5)
    mask, info = select_with_info(P, "lap", 0.3)  # k = 3 of 10, all tied
    assert mask.reshape(2, -1).sum(1).tolist() == [3, 3]
    assert info["ties"][0] == {"cutoff": 0.5, "tied": 10, "taken": 3, "eligible": 10}
    assert not select(P, "cas", 0.3).any()  # no strictly positive contrast anywhere
    # equal up to float rounding counts as tied: |0.3 - 0.2| and |0.5 - 0.4| differ in the last bit
    P = np.array([[[0.3, 0.5]], [[0.2, 0.4]]])
    assert select_with_info(P, "cas", 0.5)[1]["ties"][0]["tied"] == 2


def test_mask_provenance_records_ties(tmp_path) -> None:
    import zarr

    from emotion_neurons.stages.select import main

    P = _tied_design().astype(np.float32)
    agg = tmp_path / "aggregate.zarr"
    g = zarr.open_group(agg, mode="w", zarr_format=3)
    for name, arr in (("K", (P * 100).astype(np.int64)), ("P", P), ("M", P)):
        g.create_array(name, shape=arr.shape, dtype=arr.dtype)[:] = arr
    g.create_array("T", shape=(4,), dtype=np.int64)[:] = 100
    g.attrs.update({"emotions": ["a", "b", "c", "d"], "task": "ser"})
    params = {"selector": "lap", "r": 0.01, "mask_seed": 3, "scope": "global", "params": {}}
    out = tmp_path / "lap-r0.01.safetensors"
    assert main(["--params", json.dumps(params), "--aggregate", str(agg), "--out", str(out)]) == 0
    mask, meta = load_mask(out)
    assert meta["ties"]["a"]["tied"] == 80 and meta["ties"]["a"]["taken"] == 32 and meta["seed"] == 3
    ctl = {"selector": "random", "r": 0.01, "mask_seed": 1, "control_of": "lap", "match": "layers"}
    rout = tmp_path / "random-lap-r0.01-s1.safetensors"
    assert main(["--params", json.dumps(ctl), "--control-of", str(out), "--out", str(rout)]) == 0
    rmask, rmeta = load_mask(rout)
    assert rmeta["counts_per_layer"] == meta["counts_per_layer"] and rmeta["control_of"] == "lap"
    assert not np.array_equal(rmask, mask)


def test_cas_only_positive_scores() -> None:
    P = np.full((2, 1, 4), 0.3)
    P[0, 0, 1] = 0.5
    mask = select(P, "cas", 1.0)  # budget 4 but only one neuron has a positive contrast
    assert _sets(mask) == [{1}, set()]


def test_lape_argmax_assigns_to_argmax_only(planted) -> None:
    P, _, _ = planted
    mask = select(P, "lape", 0.2, variant="argmax", filter_rate=None)
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
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "cas-r0.01.json", "cas-r0.01.neurons.json", "cas-r0.01.safetensors"]
    assert json.loads(meta_path(path).read_text())["r"] == R
    # Overwrite atomically; still no temp files; metadata embedded in the header survives a lost sidecar.
    save_mask(path, ~mask, emotions, {"selector": "x"})
    meta_path(path).unlink()
    got, meta = load_mask(path)
    assert np.array_equal(got, ~mask) and meta["selector"] == "x"
    assert sorted(p.name for p in path.parent.iterdir()) == ["cas-r0.01.neurons.json", "cas-r0.01.safetensors"]


def test_save_rejects_mismatched_emotions(tmp_path) -> None:
    with pytest.raises(ValueError, match="emotion names"):
        save_mask(tmp_path / "m.safetensors", np.zeros((2, 1, 3), bool), ["a"], {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(method="bogus"),
            r"unknown selector method 'bogus'; valid methods: cas, lap, lape, mad",
        ),
        (dict(r=0.0), r"r must lie in \(0, 1\]"),
        (dict(r=1.5), r"r must lie in \(0, 1\]"),
        (dict(P=np.zeros((2, 3))), r"P must be 3-D"),
        (dict(P=np.zeros((1, 2, 3))), r"at least 2 emotions"),
        (dict(P=np.array([[[np.nan]], [[0.1]]])), r"NaN"),
        (dict(scope="layer"), r"unknown scope 'layer'"),
        (dict(M=np.zeros((1, 1, 1))), r"M must have the shape of P"),
        (dict(method="lape", variant="x"), r"unknown lape variant 'x'; valid variants: tang, argmax"),
        (dict(method="lape", filter_rate=2.0), r"lape filter_rate must lie in \(0, 1\]"),
        (dict(method="lape", top_rate=0.0), r"lape top_rate must lie in \(0, 1\]"),
        (dict(method="lape", activation_bar_ratio=None), r"activation_bar_ratio must be a number"),
    ],
)
def test_invalid_inputs(kwargs: dict, match: str) -> None:
    args = dict(P=np.full((2, 2, 3), 0.5), method="lap", r=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select(args.pop("P"), args.pop("method"), args.pop("r"), **args)


def test_grid_has_a_matched_control_per_selector_mask() -> None:
    from emotion_neurons.conditions import grid, masks

    cfg = {"selectors": ["lap", "cas", "random"], "r": [0.01], "seed": 4, "random": {"seeds": 2}}
    ms = {m["mask"]: m for m in masks(cfg)}
    assert list(ms) == ["lap-r0.01", "cas-r0.01", "random-lap-r0.01-s0", "random-lap-r0.01-s1",
                        "random-cas-r0.01-s0", "random-cas-r0.01-s1"]
    assert ms["lap-r0.01"]["mask_seed"] == 4  # the tie-breaking seed
    assert ms["random-cas-r0.01-s1"]["source_mask"] == "cas-r0.01" and ms["random-cas-r0.01-s1"]["control_of"] == "cas"
    ids = [c["condition"] for c in grid(cfg, {"interventions": ["deactivate", "steer"], "alpha": [0.5]})]
    assert "random-cas-r0.01-steer-a0.5-s1" in ids and "cas-r0.01-deactivate" in ids and len(ids) == 1 + 6 * 2
    with pytest.raises(ValueError, match="'random' is a control matched to another selector"):
        masks({"selectors": ["random"], "r": [0.01]})


def test_schema_select_and_evaluate_keys() -> None:
    from pathlib import Path

    import jsonschema
    import yaml

    root = Path(__file__).resolve().parents[1]
    from emotion_neurons.schema import config_schema

    schema = config_schema()  # the registries' names injected
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["select"]["lape"]["variant"] == "tang" and cfg["select"]["random"] == {"match": "layers", "seeds": 5}
    for section, bad in (("select", {"random_seeds": 5}), ("select", {"lape": {"variant": "entropy"}}),
                         ("select", {"random": {"match": "layer"}}), ("select", {"lape": {"filter_rate": 0}}),
                         ("evaluate", {"bootstrap": 0}), ("evaluate", {"ci": 1.0})):
        c = yaml.safe_load((root / "config.yaml").read_text())
        for k, v in bad.items():
            c[section][k] = {**c[section][k], **v} if isinstance(v, dict) else v
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(c, schema)
