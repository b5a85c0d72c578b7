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


def _write(path, ids, stats, attrs=None, act_sums="float32"):
    meta = {"model_id": "m", "hook_site": "gate", "component": "thinker", **(attrs or {})}
    w = InstanceStatsWriter(path, ids, L, N, meta, act_sums=act_sums)
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
    assert g["pos_count"].chunks[:2] == (1, 1)  # chunked by instance and span
    assert g["pos_count"].dtype == np.uint16 and g.attrs["layout"] == 2
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


def test_float16_sums_and_no_sums(tmp_path):
    """float16 sums keep M to float16 precision; without sums P is exact and M is absent, not zero."""
    rng = np.random.default_rng(3)
    st = _stats(rng, 4)
    ids = ["a", "b", "c", "d"]
    groups = {"happy": ["a", "b"], "sad": ["c", "d"]}
    _write(tmp_path / "h.zarr", ids, st, act_sums="float16")
    _write(tmp_path / "n.zarr", ids, st, act_sums="none")
    assert open_store(tmp_path / "h.zarr")["act_sum"].dtype == np.float16
    assert "act_sum" not in open_store(tmp_path / "n.zarr")
    aggregate([tmp_path / "h.zarr"], groups, ["text"], tmp_path / "ah.zarr")
    aggregate([tmp_path / "n.zarr"], groups, ["text"], tmp_path / "an.zarr")
    ah, _ = load_aggregate(tmp_path / "ah.zarr")
    an, attrs = load_aggregate(tmp_path / "an.zarr")
    np.testing.assert_array_equal(ah["P"], an["P"])
    assert "M" not in an and attrs["has_mean_activation"] is False
    t = SPANS.index("text")
    S = st["act_sum"][:2, t].sum(0) / st["tokens"][:2, t].sum()
    np.testing.assert_allclose(ah["M"][0], S, atol=2e-3)


def test_count_overflow_is_refused_with_the_id(tmp_path):
    rng = np.random.default_rng(4)
    st = _stats(rng, 2)
    st["pos_count"][1, 0, 0, 0] = 70000
    w = InstanceStatsWriter(tmp_path / "s.zarr", ["a", "b"], L, N, {})
    with pytest.raises(ValueError, match="'b'.*70000"):
        w.write(["a", "b"], st)
    w.abort()
    assert not (tmp_path / "s.zarr").exists()


def test_sum_squares_needs_sums(tmp_path):
    with pytest.raises(ValueError, match="act_sums"):
        InstanceStatsWriter(tmp_path / "s.zarr", ["a"], L, N, {}, sum_squares=True, act_sums="none")


def test_layout1_store_is_still_read(tmp_path):
    """Stores written before layout 2 (int32 counts, float32 sums, one chunk per instance) aggregate the same."""
    import zarr

    rng = np.random.default_rng(5)
    st = _stats(rng, 3)
    g = zarr.open_group(tmp_path / "old.zarr", mode="w", zarr_format=3)
    shape = (3, len(SPANS), L, N)
    g.create_array("pos_count", shape=shape, chunks=(1, len(SPANS), L, N), dtype="int32")[:] = st["pos_count"]
    g.create_array("act_sum", shape=shape, chunks=(1, len(SPANS), L, N), dtype="float32")[:] = st["act_sum"]
    g.create_array("tokens", shape=(3, len(SPANS)), dtype="int64")[:] = st["tokens"]
    g.attrs.update({"instance_ids": ["x", "y", "z"], "spans": list(SPANS), "n_layers": L, "n_neurons": N,
                    "model_id": "m", "hook_site": "gate", "component": "thinker"})
    _write(tmp_path / "new.zarr", ["x", "y", "z"], st)
    groups = {"happy": ["x", "z"], "sad": ["y"]}
    aggregate([tmp_path / "old.zarr"], groups, ["audio", "generated"], tmp_path / "ao.zarr")
    aggregate([tmp_path / "new.zarr"], groups, ["audio", "generated"], tmp_path / "an.zarr")
    ao, _ = load_aggregate(tmp_path / "ao.zarr")
    an, _ = load_aggregate(tmp_path / "an.zarr")
    for k in ("K", "T", "P", "M"):
        np.testing.assert_array_equal(ao[k], an[k])


def test_newer_layout_is_refused(tmp_path):
    _write(tmp_path / "s.zarr", ["a", "b", "c", "d"], _stats(np.random.default_rng(6), 4))
    import zarr

    zarr.open_group(tmp_path / "s.zarr", mode="r+").attrs["layout"] = 99
    with pytest.raises(ValueError, match="layout 99"):
        open_store(tmp_path / "s.zarr")


@pytest.mark.parametrize("workers", [1, 4])
def test_parallel_aggregate_matches_numpy_on_many_stores(tmp_path, workers):
    """Non-contiguous row subsets across several stores, read in parallel, equal a plain numpy sum."""
    rng = np.random.default_rng(7)
    stores, data, ids = [], {}, []
    for s in range(3):
        sid = [f"s{s}-{i}" for i in range(70)]
        st = _stats(rng, 70)
        _write(tmp_path / f"{s}.zarr", sid, st)
        stores.append(tmp_path / f"{s}.zarr")
        for i, iid in enumerate(sid):
            data[iid] = {k: v[i] for k, v in st.items()}
        ids += sid
    pick = rng.permutation(ids)
    groups = {"angry": list(pick[:90]), "sad": list(pick[90:100]), "happy": list(pick[100:101])}
    spans = ["audio", "generated"]
    aggregate(stores, groups, spans, tmp_path / "agg.zarr", workers=workers)
    arrays, _ = load_aggregate(tmp_path / "agg.zarr")
    sidx = [SPANS.index(s) for s in spans]
    for e, emo in enumerate(groups):
        K = sum(data[i]["pos_count"][sidx].astype(np.int64).sum(0) for i in groups[emo])
        T = sum(data[i]["tokens"][sidx].sum() for i in groups[emo])
        np.testing.assert_array_equal(arrays["K"][e], K)
        assert arrays["T"][e] == T


def test_direct_chunk_reads_equal_zarr_reads_and_numpy(tmp_path):
    """The direct chunk reader (issue 8: zarr's per-chunk cost bound aggregation) sums exactly what zarr reads,
    including instances whose chunks zarr never wrote (all-zero counts equal the fill value)."""
    from emotion_neurons import stats

    rng = np.random.default_rng(11)
    st = _stats(rng, 6)
    st["pos_count"][2] = 0  # every span of one instance empty: no chunk files for it
    st["pos_count"][4, 1] = 0
    ids = [f"i{k}" for k in range(6)]
    _write(tmp_path / "s.zarr", ids, st, act_sums="float16")
    store = open_store(tmp_path / "s.zarr")
    chunk = tmp_path / "s.zarr" / "pos_count" / "c"
    assert (chunk / "0" / "0" / "0" / "0").is_file() and not (chunk / "2" / "0" / "0" / "0").exists()
    assert stats._direct_chunks(store["pos_count"]) is not None
    assert stats._direct_chunks(store["act_sum"]) is not None
    groups = {"angry": ["i0", "i2", "i4"], "sad": ["i1", "i5", "i3"]}
    spans = ["audio", "text", "generated"]
    aggregate([tmp_path / "s.zarr"], groups, spans, tmp_path / "d.zarr")
    aggregate([tmp_path / "s.zarr"], groups, spans, tmp_path / "z.zarr", direct=False)
    d, _ = load_aggregate(tmp_path / "d.zarr")
    z, _ = load_aggregate(tmp_path / "z.zarr")
    sidx = [SPANS.index(s) for s in spans]
    for e, emo in enumerate(groups):
        rows = [ids.index(i) for i in groups[emo]]
        np.testing.assert_array_equal(d["K"][e], st["pos_count"][rows][:, sidx].astype(np.int64).sum((0, 1)))
    for k in ("K", "T", "P", "M"):
        np.testing.assert_array_equal(d[k], z[k])


def test_direct_reader_refuses_other_layouts(tmp_path):
    import zarr

    from emotion_neurons import stats

    g = zarr.open_group(tmp_path / "o.zarr", mode="w", zarr_format=3)
    a = g.create_array("pos_count", shape=(2, len(SPANS), L, N), chunks=(1, len(SPANS), L, N), dtype="int32")
    b = g.create_array("b", shape=(2, len(SPANS), L, N), chunks=(1, 1, L, N), dtype="uint16", fill_value=3)
    assert stats._direct_chunks(a) is None and stats._direct_chunks(b) is None
