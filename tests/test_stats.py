"""Zarr stores: round trip, atomicity, aggregation against a direct numpy sum."""

from __future__ import annotations

import numpy as np
import pytest

from emotion_neurons import SPANS
from emotion_neurons.stats import InstanceStatsWriter, aggregate, load_aggregate, open_store

L, N = 3, 7


def _stats(rng, n):
    return {
        "pos_count": rng.integers(0, 5, (n, len(SPANS), L, N)).astype(np.int32),
        "act_sum": rng.normal(size=(n, len(SPANS), L, N)).astype(np.float32),
        "tokens": rng.integers(5, 9, (n, len(SPANS))).astype(np.int64),
    }


def _write(path, ids, stats, attrs=None):
    w = InstanceStatsWriter(path, ids, L, N, {"model_id": "m", "hook_site": "gate", "component": "thinker", **(attrs or {})})
    w.write(ids[:2], {k: v[:2] for k, v in stats.items()})
    w.write(ids[2:], {k: v[2:] for k, v in stats.items()})
    w.close()


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ids = ["a", "b", "c", "d"]
    st = _stats(rng, 4)
    _write(tmp_path / "s.zarr", ids, st)
    g = open_store(tmp_path / "s.zarr")
    assert g.attrs["instance_ids"] == ids and g.attrs["spans"] == list(SPANS)
    np.testing.assert_array_equal(g["pos_count"][:], st["pos_count"])
    np.testing.assert_array_equal(g["act_sum"][:], st["act_sum"])
    np.testing.assert_array_equal(g["tokens"][:], st["tokens"])
    assert g["pos_count"].chunks[0] == 1  # chunked by instance
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_incomplete_store_never_appears(tmp_path):
    rng = np.random.default_rng(0)
    st = _stats(rng, 2)
    w = InstanceStatsWriter(tmp_path / "s.zarr", ["a", "b"], L, N, {})
    w.write(["a"], {k: v[:1] for k, v in st.items()})
    with pytest.raises(RuntimeError, match="missing for 1"):
        w.close()
    assert not (tmp_path / "s.zarr").exists()
    assert list(tmp_path.iterdir()) == []


def test_aggregate_matches_numpy(tmp_path):
    rng = np.random.default_rng(1)
    s1, s2 = _stats(rng, 4), _stats(rng, 4)
    _write(tmp_path / "a.zarr", ["a0", "a1", "a2", "a3"], s1)
    _write(tmp_path / "b.zarr", ["b0", "b1", "b2", "b3"], s2)
    groups = {"happy": ["a0", "b3"], "sad": ["a1", "a2", "b0"]}
    spans = ["text", "generated"]
    aggregate([tmp_path / "a.zarr", tmp_path / "b.zarr"], groups, spans, tmp_path / "agg.zarr")
    arrays, attrs = load_aggregate(tmp_path / "agg.zarr")
    sidx = [SPANS.index(s) for s in spans]
    rows = {"a": s1, "b": s2}

    def pick(iid, key):
        return rows[iid[0]][key][int(iid[1])][sidx]

    for e, emo in enumerate(groups):
        K = sum(pick(i, "pos_count").sum(0) for i in groups[emo])
        T = sum(pick(i, "tokens").sum() for i in groups[emo])
        S = sum(pick(i, "act_sum").astype(np.float64).sum(0) for i in groups[emo])
        np.testing.assert_array_equal(arrays["K"][e], K)
        assert arrays["T"][e] == T
        np.testing.assert_allclose(arrays["P"][e], K / T, rtol=1e-6)
        np.testing.assert_allclose(arrays["M"][e], S / T, rtol=1e-5)
    assert attrs["emotions"] == ["happy", "sad"] and attrs["n_instances"] == {"happy": 2, "sad": 3}


def test_aggregate_errors(tmp_path):
    rng = np.random.default_rng(2)
    _write(tmp_path / "a.zarr", ["a", "b", "c", "d"], _stats(rng, 4))
    with pytest.raises(KeyError, match="zz"):
        aggregate([tmp_path / "a.zarr"], {"happy": ["zz"], "sad": ["a"]}, ["text"], tmp_path / "o.zarr")
    with pytest.raises(ValueError, match="unknown spans"):
        aggregate([tmp_path / "a.zarr"], {"happy": ["a"], "sad": ["b"]}, ["prompt"], tmp_path / "o.zarr")
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        aggregate([tmp_path / "missing.zarr"], {"happy": ["a"]}, ["text"], tmp_path / "o.zarr")
    _write(tmp_path / "b.zarr", ["a", "x", "y", "z"], _stats(rng, 4))
    with pytest.raises(ValueError, match="more than one"):
        aggregate([tmp_path / "a.zarr", tmp_path / "b.zarr"], {"happy": ["a"]}, ["text"], tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()
