"""Metrics on tiny tables whose expected values are computed by hand in the comments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from emotion_neurons.effects import (
    average_random,
    evc_deltas,
    evc_random_deltas,
    evc_summary,
    evc_vs_random,
    ser_effects,
    ser_random_effects,
    ser_summary,
    ser_vs_random,
)

NAN = float("nan")


def _cond(
    condition: str, selector: str, intervention: str, alpha: float, seed: int, r: float = 0.005
) -> dict:
    if condition == "baseline":
        return dict(condition="baseline", selector="none", r=NAN, intervention="none", alpha=NAN, mask_seed=0)
    return dict(
        condition=condition, selector=selector, r=r, intervention=intervention, alpha=alpha, mask_seed=seed
    )


# ------------------------------------------------------------------------------------------- EVC

#           id    target   ok     prob  wer  cer   refusal success
BASE = [
    ("a1", "angry", True, 0.8, 0.0, 0.0, False, True),
    ("a2", "angry", False, 0.2, 0.2, 0.1, False, False),
    ("h1", "happy", False, 0.4, 0.1, 0.05, False, False),
    ("h2", "happy", False, 0.3, 0.0, 0.0, True, False),
]
CAS = [
    ("a1", "angry", True, 0.9, 0.0, 0.0, False, True),
    ("a2", "angry", True, 0.6, 0.0, 0.0, False, True),
    ("h1", "happy", True, 0.7, 0.1, 0.05, False, True),
    ("h2", "happy", False, 0.5, 0.4, 0.2, False, False),
]


def _evc_rows(cond: dict, rows: list[tuple]) -> list[dict]:
    out = []
    for id_, tgt, ok, prob, wer, cer, ref, succ in rows:
        out.append(
            dict(
                **cond,
                id=id_,
                speaker="0016",
                emotion="neutral",
                target=tgt,
                pred=tgt if ok else "neutral",
                target_prob=prob,
                wer=wer,
                cer=cer,
                refusal=ref,
                emotion_ok=ok,
                content_ok=wer <= 0.1,
                success=succ,
            )
        )
    return out


def _evc_table() -> pd.DataFrame:
    rows = _evc_rows(_cond("baseline", "", "", 0, 0), BASE)
    rows += _evc_rows(_cond("cas-r0.005-steer-a1.0", "cas", "steer", 1.0, 0), CAS)
    return pd.DataFrame(rows)


def test_evc_summary_by_hand() -> None:
    s = evc_summary(_evc_table()).set_index(["condition", "target"])
    assert list(s.index) == [
        ("baseline", "angry"),
        ("baseline", "happy"),
        ("baseline", "all"),
        ("cas-r0.005-steer-a1.0", "angry"),
        ("cas-r0.005-steer-a1.0", "happy"),
        ("cas-r0.005-steer-a1.0", "all"),
    ]
    cols = ["n", "target_acc", "target_prob", "wer", "cer", "refusal_rate", "success_rate"]
    expected = {
        ("baseline", "angry"): [2, 0.5, 0.5, 0.1, 0.05, 0.0, 0.5],
        ("baseline", "happy"): [2, 0.0, 0.35, 0.05, 0.025, 0.5, 0.0],
        ("baseline", "all"): [4, 0.25, 0.425, 0.075, 0.0375, 0.25, 0.25],
        ("cas-r0.005-steer-a1.0", "angry"): [2, 1.0, 0.75, 0.0, 0.0, 0.0, 1.0],
        ("cas-r0.005-steer-a1.0", "happy"): [2, 0.5, 0.6, 0.25, 0.125, 0.0, 0.5],
        ("cas-r0.005-steer-a1.0", "all"): [4, 0.75, 0.675, 0.125, 0.0625, 0.0, 0.75],
    }
    for key, vals in expected.items():
        np.testing.assert_allclose(s.loc[key, cols].to_numpy(float), vals, err_msg=str(key))
    assert s.loc[("cas-r0.005-steer-a1.0", "all"), "selector"] == "cas"
    assert s.loc[("cas-r0.005-steer-a1.0", "all"), "alpha"] == 1.0


def test_evc_deltas_paired_bootstrap() -> None:
    d = evc_deltas(_evc_table(), n_boot=2000, seed=0)
    assert set(d["condition"]) == {"cas-r0.005-steer-a1.0"}
    d = d.set_index(["target", "metric"])
    assert len(d) == 3 * 6
    # angry target_acc: paired diffs (a1: 1-1=0, a2: 1-0=1) -> delta 0.5; resample means are 0, 0.5 or 1,
    # each extreme with probability 1/4, so the 95% percentile interval is [0, 1].
    row = d.loc[("angry", "target_acc")]
    assert (row["value"], row["baseline"], row["delta"], row["n"]) == pytest.approx((1.0, 0.5, 0.5, 2))
    assert row["ci_lo"] == 0.0 and row["ci_hi"] == 1.0
    # all / target_prob: diffs 0.1, 0.4, 0.3, 0.2 -> delta 0.25, CI strictly inside [0.1, 0.4]
    row = d.loc[("all", "target_prob")]
    assert row["delta"] == pytest.approx(0.25) and row["n"] == 4
    assert 0.1 <= row["ci_lo"] <= 0.25 <= row["ci_hi"] <= 0.4 and row["ci_lo"] < row["ci_hi"]
    # angry refusal: diffs 0, 0 -> zero-width interval at 0
    row = d.loc[("angry", "refusal_rate")]
    assert row["delta"] == 0.0 and row["ci_lo"] == 0.0 and row["ci_hi"] == 0.0
    # happy wer: 0.25 - 0.05 = 0.2
    assert d.loc[("happy", "wer"), "delta"] == pytest.approx(0.2)
    # every CI contains its point delta
    assert ((d["ci_lo"] <= d["delta"] + 1e-12) & (d["delta"] - 1e-12 <= d["ci_hi"])).all()


def test_evc_deltas_zero_width_and_reproducible() -> None:
    t = _evc_table()
    shifted = t[t["condition"] == "baseline"].copy()
    shifted["condition"], shifted["selector"], shifted["r"] = "shift", "mad", 0.01
    shifted["intervention"], shifted["alpha"] = "steer", 0.5
    shifted["target_prob"] += 0.1  # identical paired difference for every instance
    t2 = pd.concat([t, shifted], ignore_index=True)
    d = evc_deltas(t2, n_boot=200, seed=1)
    row = d.set_index(["condition", "target", "metric"]).loc[("shift", "all", "target_prob")]
    assert row["delta"] == pytest.approx(0.1)
    assert row["ci_lo"] == row["ci_hi"] == row["delta"]
    pd.testing.assert_frame_equal(d, evc_deltas(t2, n_boot=200, seed=1))
    # a condition's CI does not depend on which other conditions are in the table
    only_cas = evc_deltas(t, n_boot=200, seed=1)
    pd.testing.assert_frame_equal(only_cas, d[d["condition"] != "shift"].reset_index(drop=True))


def test_evc_deltas_pairs_only_shared_ids() -> None:
    t = _evc_table()
    t = t[~((t["condition"] != "baseline") & (t["id"] == "h2"))]  # condition lost h2
    d = evc_deltas(t, n_boot=100).set_index(["target", "metric"])
    # happy target_prob over shared h1 only: 0.7 vs 0.4
    row = d.loc[("happy", "target_prob")]
    assert (row["n"], row["value"], row["baseline"]) == pytest.approx((1, 0.7, 0.4))
    # all target_acc over a1, a2, h1: cond 3/3, baseline 1/3
    row = d.loc[("all", "target_acc")]
    assert (row["n"], row["value"], row["baseline"]) == pytest.approx((3, 1.0, 1 / 3))


def test_evc_errors() -> None:
    t = _evc_table()
    with pytest.raises(ValueError, match="no baseline"):
        evc_deltas(t[t["condition"] != "baseline"])
    with pytest.raises(ValueError, match="missing required column.*wer, refusal"):
        evc_summary(t.drop(columns=["wer", "refusal"]))
    with pytest.raises(ValueError, match="missing required column.*id"):
        evc_deltas(t.drop(columns=["id"]))
    with pytest.raises(ValueError, match="duplicate instance"):
        evc_deltas(pd.concat([t, t.iloc[[0]]]))
    bad = t.copy()
    bad.loc[bad.index[-1], "alpha"] = 0.5
    with pytest.raises(ValueError, match="several values of 'alpha'"):
        evc_summary(bad)


# ------------------------------------------------------------------------------------------- SER


def _ser_rows(cond: dict, mask_emotion: str, correct: dict[str, list[bool]]) -> list[dict]:
    rows = []
    for emo, flags in correct.items():
        for i, ok in enumerate(flags):
            rows.append(
                dict(
                    **cond,
                    mask_emotion=mask_emotion,
                    id=f"{emo}{i}",
                    speaker="s1",
                    emotion=emo,
                    pred=emo if ok else "",
                    correct=ok,
                )
            )
    return rows


def _ser_table(random_seeds: tuple[int, ...] = (), control_of: str | None = None) -> pd.DataFrame:
    T, F = True, False
    rows = _ser_rows(_cond("baseline", "", "", 0, 0), "", {"ang": [T, T], "hap": [T, F], "sad": [T, T]})
    c = _cond("cas-r0.005-deactivate", "cas", "deactivate", NAN, 0)
    rows += _ser_rows(c, "ang", {"ang": [F, F], "hap": [T, F], "sad": [T, F]})
    rows += _ser_rows(c, "hap", {"ang": [T, T], "hap": [F, F], "sad": [T, T]})
    rows += _ser_rows(c, "sad", {"ang": [T, F], "hap": [T, T], "sad": [F, F]})
    for s in random_seeds:  # seed 0 leaves everything as the baseline; seed 1 breaks one 'ang' answer
        c = _cond(f"random-r0.005-deactivate-s{s}", "random", "deactivate", NAN, s)
        if control_of is not None:
            c["condition"] = f"random-{control_of}-r0.005-deactivate-s{s}"
            c["control_of"] = control_of
        for m in ("ang", "hap", "sad"):
            ang = [T, F] if (s == 1 and m == "hap") else [T, T]
            rows += _ser_rows(c, m, {"ang": ang, "hap": [T, F], "sad": [T, T]})
    return pd.DataFrame(rows)


def test_ser_summary_by_hand() -> None:
    T, F = True, False
    rows = _ser_rows(_cond("baseline", "", "", 0, 0), "", {"ang": [T, T], "hap": [T, F, F, F], "sad": [F, T]})
    rows += _ser_rows(_cond("cas-x", "cas", "steer", 0.5, 0), "hap", {"ang": [F, F], "hap": [T, T, T, F]})
    s = ser_summary(pd.DataFrame(rows)).set_index(["condition", "mask_emotion"])
    # baseline: ang 1, hap 1/4, sad 1/2 -> UAR 7/12; WA = 4/8
    b = s.loc[("baseline", "")]
    assert (b["n"], b["acc_ang"], b["acc_hap"], b["acc_sad"]) == pytest.approx((8, 1.0, 0.25, 0.5))
    assert b["UAR"] == pytest.approx(7 / 12) and b["WA"] == pytest.approx(0.5)
    # cas, hap mask: ang 0, hap 3/4, no sad rows -> UAR over the two present classes 3/8; WA 3/6
    c = s.loc[("cas-x", "hap")]
    assert (c["n"], c["acc_ang"], c["acc_hap"]) == pytest.approx((6, 0.0, 0.75))
    assert np.isnan(c["acc_sad"])
    assert c["UAR"] == pytest.approx(0.375) and c["WA"] == pytest.approx(0.5)
    assert c["selector"] == "cas" and c["alpha"] == 0.5


def test_ser_effects_by_hand() -> None:
    change, effects = ser_effects(_ser_table())
    # baseline acc: ang 1, hap 0.5, sad 1. Acc[e -> e'] rows = mask, cols = evaluated:
    #   ang mask: 0, .5, .5   hap mask: 1, 0, 1   sad mask: .5, 1, 0
    expected = np.array(
        [
            [-100.0, 0.0, -50.0],
            [0.0, -50.0, 0.0],
            [-50.0, 50.0, -100.0],
        ]
    )
    assert list(change["mask_emotion"]) == ["ang", "hap", "sad"]
    np.testing.assert_allclose(change[["ang", "hap", "sad"]].to_numpy(float), expected)
    assert (change["selector"] == "cas").all() and (change["intervention"] == "deactivate").all()
    e = effects.set_index("mask_emotion")
    # SE = diagonal; ACE(e) = mean of column e without the diagonal:
    #   ACE(ang) = (0 + -50)/2 = -25, ACE(hap) = (0 + 50)/2 = 25, ACE(sad) = (-50 + 0)/2 = -25
    np.testing.assert_allclose(e.loc[["ang", "hap", "sad"], "SE"], [-100, -50, -100])
    np.testing.assert_allclose(e.loc[["ang", "hap", "sad"], "ACE"], [-25, 25, -25])
    np.testing.assert_allclose(e.loc[["ang", "hap", "sad"], "ESS"], [-75, -75, -75])
    np.testing.assert_allclose(e.loc["mean", ["SE", "ACE", "ESS"]].to_numpy(float), [-250 / 3, -25 / 3, -75])
    assert list(e.loc[["ang", "hap", "sad"], "n_cross"]) == [2, 2, 2]


def test_ser_effects_random_seeds_and_average() -> None:
    change, effects = ser_effects(_ser_table(random_seeds=(0, 1)))
    rnd = effects[(effects["selector"] == "random")]
    assert sorted(rnd["mask_seed"].unique()) == [0, 1]
    r1 = rnd[rnd["mask_seed"] == 1].set_index("mask_emotion")
    # seed 1: only the hap mask changes ang accuracy (1 -> 0.5): change[hap, ang] = -50
    #   SE(ang)=0, ACE(ang)=(-50 + 0)/2=-25, ESS(ang)=25; SE(hap)=0, ACE(hap)=0
    assert (r1.loc["ang", "SE"], r1.loc["ang", "ACE"], r1.loc["ang", "ESS"]) == (0.0, -25.0, 25.0)
    assert (r1.loc["hap", "SE"], r1.loc["hap", "ACE"]) == (0.0, 0.0)
    avg = average_random(effects, ["SE", "ACE", "ESS"]).set_index(["selector", "mask_emotion"])
    # random ang: ACE mean of (0, -25) = -12.5, sample std = 25 / sqrt(2)
    row = avg.loc[("random", "ang")]
    assert (row["ACE"], row["ACE_std"], row["n_seeds"], row["mask_seed"]) == pytest.approx(
        (-12.5, 25 / np.sqrt(2), 2, -1)
    )
    assert avg.loc[("cas", "ang"), "n_seeds"] == 1 and np.isnan(avg.loc[("cas", "ang"), "SE_std"])
    assert avg.loc[("cas", "ang"), "SE"] == -100
    assert len(avg) == 2 * 4  # cas and random, 3 emotions + mean each
    # change matrix too: random row 'hap' column 'ang' = mean(0, -50)
    cavg = average_random(change, ["ang", "hap", "sad"]).set_index(["selector", "mask_emotion"])
    assert cavg.loc[("random", "hap"), "ang"] == -25.0


def test_average_random_on_summary_strips_seed_from_condition() -> None:
    t = _evc_table()
    rows = [t]
    for s, ok in ((0, [True, True, False, False]), (1, [False, True, False, False])):
        r = t[t["condition"] == "baseline"].copy()
        r["condition"], r["selector"], r["r"] = f"random-r0.005-steer-a1.0-s{s}", "random", 0.005
        r["intervention"], r["alpha"], r["mask_seed"] = "steer", 1.0, s
        r["emotion_ok"] = ok
        rows.append(r)
    s = evc_summary(pd.concat(rows, ignore_index=True))
    avg = average_random(s, ["target_acc", "success_rate"])
    assert (
        list(avg["condition"])
        == ["baseline"] * 3 + ["cas-r0.005-steer-a1.0"] * 3 + ["random-r0.005-steer-a1.0"] * 3
    )
    row = avg.set_index(["condition", "target"]).loc[("random-r0.005-steer-a1.0", "angry")]
    # seed 0 angry acc 1.0, seed 1 angry acc 0.5 -> mean 0.75, std sqrt(0.125)
    assert (row["target_acc"], row["target_acc_std"], row["n_seeds"]) == pytest.approx(
        (0.75, np.sqrt(0.125), 2)
    )
    assert row["n"] == 2 and row["mask_seed"] == -1


def test_ser_errors() -> None:
    t = _ser_table()
    with pytest.raises(ValueError, match="no baseline"):
        ser_effects(t[t["condition"] != "baseline"])
    with pytest.raises(ValueError, match="missing required column.*mask_emotion"):
        ser_summary(t.drop(columns=["mask_emotion"]))
    with pytest.raises(ValueError, match="missing required column.*correct"):
        ser_effects(t.drop(columns=["correct"]))
    with pytest.raises(ValueError, match="missing required column.*nope"):
        average_random(t, ["nope"])


# ------------------------------------------------------------------------------ random controls, clusters


def _evc_long(cond: dict, prob: np.ndarray, ids: list[str], targets: list[str], ok=None) -> pd.DataFrame:
    n = len(ids)
    ok = np.zeros(n, bool) if ok is None else ok
    return pd.DataFrame(
        dict(**cond, id=ids, target=targets, target_prob=prob, emotion_ok=ok, wer=np.zeros(n), cer=np.zeros(n),
             refusal=np.zeros(n, bool), success=ok)
    )


def _random_cond(sel: str, s: int) -> dict:
    c = _cond(f"random-{sel}-r0.005-steer-a1-s{s}", "random", "steer", 1.0, s)
    return {**c, "control_of": sel}


def _sources_table(shifts: list[float], noise_seed: int = 0) -> pd.DataFrame:
    """20 sources x 2 targets; random seed s adds shifts[s] + the same per-instance noise to target_prob."""
    rng = np.random.default_rng(noise_seed)
    ids = [f"u{i}->{t}" for i in range(20) for t in ("angry", "sad")]
    tg = [i.split("->")[1] for i in ids]
    base = rng.uniform(0.2, 0.6, size=len(ids))
    noise = rng.normal(0.0, 0.05, size=len(ids))
    parts = [_evc_long(_cond("baseline", "", "", 0, 0), base, ids, tg)]
    for s, sh in enumerate(shifts):
        parts.append(_evc_long(_random_cond("lap", s), base + sh + noise, ids, tg))
    return pd.concat(parts, ignore_index=True)


def _row(df: pd.DataFrame, target: str = "all", metric: str = "target_prob") -> pd.Series:
    return df[(df["target"] == target) & (df["metric"] == metric)].iloc[0]


def test_random_interval_widens_when_seeds_disagree() -> None:
    agree = evc_random_deltas(_sources_table([0.1, 0.1, 0.1, 0.1, 0.1]), n_boot=2000)
    disagree = evc_random_deltas(_sources_table([-0.1, 0.0, 0.1, 0.2, 0.3]), n_boot=2000)
    for t in (agree, disagree):
        assert set(t["condition"]) == {"random-lap-r0.005-steer-a1"}  # seeds collapsed into one row
        assert (t["mask_seed"] == -1).all() and (t["n_seeds"] == 5).all() and (t["control_of"] == "lap").all()
    a, d = _row(agree), _row(disagree)
    assert a["delta"] == pytest.approx(d["delta"])  # same mean shift, 0.1 + the mean noise
    assert a["delta_seed_sd"] == pytest.approx(0.0, abs=1e-12)
    assert d["delta_seed_sd"] == pytest.approx(np.std([-0.1, 0.0, 0.1, 0.2, 0.3], ddof=1))
    width_a, width_d = a["ci_hi"] - a["ci_lo"], d["ci_hi"] - d["ci_lo"]
    assert width_d > 3 * width_a
    # averaging the per-seed bounds (the old report) ignores the seed spread: its width is the agree width
    per_seed = evc_deltas(_sources_table([-0.1, 0.0, 0.1, 0.2, 0.3]), n_boot=2000)
    per_seed = per_seed[(per_seed["target"] == "all") & (per_seed["metric"] == "target_prob")]
    assert (per_seed["ci_hi"] - per_seed["ci_lo"]).mean() < 0.5 * width_d
    assert d["ci_lo"] < 0.0 < 0.2 < d["ci_hi"]


def test_pooled_evc_bootstrap_resamples_source_utterances() -> None:
    """4 sources x 4 targets; every target of sources u0, u1 gains 1, of u2, u3 nothing: delta 0.5.

    By source: a resample is 4 draws of {1, 1, 0, 0}, all-0 and all-1 each have probability 1/16 > 2.5%, so the
    95% interval is [0, 1]. By instance it would be the mean of 16 draws (sd 0.125), roughly [0.25, 0.75].
    """
    targets = ["angry", "happy", "sad", "surprise"]
    ids = [f"u{i}->{t}" for i in range(4) for t in targets]
    tg = [i.split("->")[1] for i in ids]
    gain = np.array([1.0 if i.startswith(("u0", "u1")) else 0.0 for i in ids])
    cond = _cond("cas-r0.005-steer-a1", "cas", "steer", 1.0, 0)
    t = pd.concat([_evc_long(_cond("baseline", "", "", 0, 0), np.zeros(16), ids, tg, ok=np.zeros(16, bool)),
                   _evc_long(cond, gain, ids, tg, ok=gain > 0)], ignore_index=True)
    row = _row(evc_deltas(t, n_boot=4000), metric="target_acc")
    assert row["delta"] == 0.5 and row["n"] == 16
    assert (row["ci_lo"], row["ci_hi"]) == (0.0, 1.0)
    # the same numbers with every instance its own source: the instance bootstrap, much narrower
    t2 = t.assign(id=t["id"].str.replace("->", "_"))
    row2 = _row(evc_deltas(t2, n_boot=4000), metric="target_acc")
    assert row2["delta"] == 0.5 and 0.15 < row2["ci_lo"] < 0.35 and 0.65 < row2["ci_hi"] < 0.85
    # per target each source appears once: cluster and instance bootstrap agree exactly
    a = evc_deltas(t, n_boot=500).query("target == 'angry'")
    b = evc_deltas(t2, n_boot=500).query("target == 'angry'")
    np.testing.assert_allclose(a[["ci_lo", "ci_hi"]].to_numpy(float), b[["ci_lo", "ci_hi"]].to_numpy(float))
    # an explicit source column wins over the id
    t3 = t2.assign(source=t["id"].str.split("->").str[0])
    assert tuple(_row(evc_deltas(t3, n_boot=4000), metric="target_acc")[["ci_lo", "ci_hi"]]) == (0.0, 1.0)


def test_selector_vs_matched_random_paired_delta_sign() -> None:
    ids = [f"u{i}->angry" for i in range(4)]
    tg = ["angry"] * 4
    base = np.array([0.2, 0.2, 0.2, 0.2])
    parts = [_evc_long(_cond("baseline", "", "", 0, 0), base, ids, tg)]
    parts.append(_evc_long(_cond("lap-r0.005-steer-a1", "lap", "steer", 1.0, 0), np.array([0.9, 0.8, 0.7, 0.6]), ids, tg))
    parts.append(_evc_long(_cond("mad-r0.005-steer-a1", "mad", "steer", 1.0, 0), np.array([0.1, 0.1, 0.2, 0.2]), ids, tg))
    for s, vals in enumerate(([0.5, 0.4, 0.3, 0.2], [0.3, 0.2, 0.1, 0.0])):  # controls of lap
        parts.append(_evc_long(_random_cond("lap", s), np.array(vals), ids, tg))
    for s, vals in enumerate(([0.4, 0.4, 0.4, 0.4], [0.6, 0.6, 0.6, 0.6])):  # controls of mad
        parts.append(_evc_long(_random_cond("mad", s), np.array(vals), ids, tg))
    v = evc_vs_random(pd.concat(parts, ignore_index=True), n_boot=1000)
    assert set(v["condition"]) == {"lap-r0.005-steer-a1", "mad-r0.005-steer-a1"}
    lap = _row(v[v["condition"] == "lap-r0.005-steer-a1"])
    # lap mean 0.75; its control: seed means 0.35 and 0.15 -> 0.25; paired delta 0.5 (diffs .6,.6,.6,.6 / .4 x4)
    assert (lap["value"], lap["random"], lap["delta"], lap["n_seeds"]) == pytest.approx((0.75, 0.25, 0.5, 2))
    assert lap["random_condition"] == "random-lap-r0.005-steer-a1" and lap["ci_lo"] > 0
    assert lap["ci_lo"] == pytest.approx(0.4) and lap["ci_hi"] == pytest.approx(0.6)  # seeds 0.6 / 0.4, no noise
    mad = _row(v[v["condition"] == "mad-r0.005-steer-a1"])
    # mad mean 0.15 against its own control (mean 0.5), never against lap's: delta -0.35 < 0
    assert (mad["value"], mad["random"], mad["delta"]) == pytest.approx((0.15, 0.5, -0.35))
    assert mad["ci_hi"] < 0


def test_ser_random_effects_and_vs_random() -> None:
    t = _ser_table(random_seeds=(0, 1), control_of="cas")
    eff = ser_random_effects(t, n_boot=500).set_index(["condition", "mask_emotion"])
    r = eff.loc[("random-cas-r0.005-deactivate", "ang")]
    # as in test_ser_effects_random_seeds_and_average: ACE(ang) per seed 0, -25 -> mean -12.5
    assert (r["ACE"], r["ACE_seed_sd"], r["n_seeds"], r["mask_seed"]) == pytest.approx((-12.5, 25 / np.sqrt(2), 2, -1))
    assert r["ACE_lo"] <= -12.5 <= r["ACE_hi"] and r["ACE_lo"] < r["ACE_hi"]
    c = eff.loc[("cas-r0.005-deactivate", "ang")]
    assert (c["SE"], c["ACE"], c["ESS"], c["n_seeds"]) == pytest.approx((-100, -25, -75, 1))
    v = ser_vs_random(t, n_boot=500).set_index("mask_emotion")
    # cas SE(ang) -100 vs random 0 -> -100; ESS(ang) -75 vs random mean (0 + 25) / 2 -> -87.5
    assert (v.loc["ang", "SE"], v.loc["ang", "ESS"]) == pytest.approx((-100.0, -87.5))
    assert v.loc["ang", "SE_hi"] < 0 and (v["random_condition"] == "random-cas-r0.005-deactivate").all()


def test_ser_injections_paired_change_against_the_baseline():
    """Hand-computed: 4 utterances (2 angry, 2 sad); baseline right on u0 only, two_pass on u0-u2: WA 25 -> 75,
    UAR (50+0)/2 -> (100+50)/2; the first pass's pseudo-labels are gold on 3 of 4, 2 from a parsed answer."""
    from scipy.stats import bootstrap

    from emotion_neurons.effects import ser_injections

    ids, emo = ["u0", "u1", "u2", "u3"], ["angry", "angry", "sad", "sad"]
    meta = {"selector": "lap", "r": 0.05, "mask_seed": 0, "control_of": "", "mask_emotion": ""}
    base = pd.DataFrame({"id": ids, "emotion": emo, "correct": [1, 0, 0, 0], "condition": "baseline",
                         "intervention": "none", "alpha": 0.0, **meta, "selector": "none", "r": 0.0})
    inj = pd.DataFrame({"id": ids, "emotion": emo, "correct": [1, 1, 1, 0], "condition": "lap-r0.05-two_pass-a1",
                        "intervention": "two_pass", "alpha": 1.0, **meta,
                        "first_pred": ["angry", "angry", "angry", "sad"],
                        "first_pred_from": ["answer", "scores", "answer", "scores"]})
    uni = inj.assign(condition="lap-r0.05-union-a1", intervention="union", correct=[0, 0, 0, 0])
    uni = uni.drop(columns=["first_pred", "first_pred_from"])
    steer = inj.assign(condition="lap-r0.05-steer-a1", intervention="steer", mask_emotion="angry")
    out = ser_injections(pd.concat([base, inj, uni, steer], ignore_index=True), n_boot=2000, seed=0)
    assert list(out["condition"]) == ["lap-r0.05-two_pass-a1", "lap-r0.05-union-a1"]  # steer is not an injection
    r = out.iloc[0]
    assert (r["n"], r["WA"], r["WA_base"], r["UAR"], r["UAR_base"]) == (4, 0.75, 0.25, 0.75, 0.25)
    assert r["dWA"] == pytest.approx(0.5) and r["dUAR"] == pytest.approx(0.5)
    assert (r["first_pred_acc"], r["first_from_answer"]) == (0.75, 0.5)
    # the paired WA interval agrees with scipy's percentile bootstrap of the per-utterance differences
    ref = bootstrap((np.array([0, 1, 1, 0.0]),), np.mean, n_resamples=20000, method="percentile",
                    random_state=0).confidence_interval
    assert r["dWA_lo"] == pytest.approx(ref.low, abs=0.13) and r["dWA_hi"] == pytest.approx(ref.high, abs=0.13)
    u = out.iloc[1]
    assert u["dWA"] == pytest.approx(-0.25) and np.isnan(u["first_pred_acc"]) and np.isnan(u["first_from_answer"])
