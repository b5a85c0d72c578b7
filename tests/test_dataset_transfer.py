"""Cross-dataset transfer (issue 11, METHOD.md 3.5): masks identified on dataset X evaluated on dataset Y.

Why: the pairs become folder and condition names, so a bad name must fail at start-up naming the key; the
transfer conditions must take the source's masks (never the target's) and keep their own metrics; and the
numbers of `metrics/dataset_transfer.tsv` must be the SE/ACE/ESS of the source's masks on the target's rows
(hand-computed on planted judged rows, through the metrics and sweep stages as the workflow runs them), with
the Jaccard overlap of the two datasets' masks computed by hand, and the pair of a dataset with itself the
in-dataset numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from emotion_neurons import conditions
from emotion_neurons.io import read_table, write_table
from emotion_neurons.selectors import save_mask
from emotion_neurons.stages import metrics, report, sweep

SEL = {"selectors": ["cas", "random"], "r": [0.05], "random": {"seeds": 2}}
EV = {"interventions": ["deactivate", "steer", "erase"], "alpha": [1.0]}
FILT = {"c": [3, 5], "enabled": False}
DATASETS = {"esd": {}, "esd_b": {}}
EMOS = ["angry", "sad"]


def test_pairs_are_checked_against_datasets():
    assert conditions.dataset_pairs({"datasets": [["esd", "esd_b"], ["esd_b", "esd"]]}, DATASETS) == [
        ("esd", "esd_b"), ("esd_b", "esd")]
    assert conditions.dataset_pairs({}, DATASETS) == [] and conditions.dataset_pairs(None, DATASETS) == []
    with pytest.raises(ValueError, match=r"transfer.datasets\[1\] names dataset 'meld'.*known: \['esd', 'esd_b'\]"):
        conditions.dataset_pairs({"datasets": [["esd", "esd_b"], ["meld", "esd"]]}, DATASETS)
    with pytest.raises(ValueError, match="twice"):
        conditions.dataset_pairs({"datasets": [["esd", "esd_b"], ["esd", "esd_b"]]}, DATASETS)
    with pytest.raises(ValueError, match=r"transfer.datasets\[0\]: a pair is \[source, target\]"):
        conditions.dataset_pairs({"datasets": [["esd"]]}, DATASETS)
    with pytest.raises(ValueError, match="letters, digits and '_'"):
        conditions.dataset_pairs({"datasets": [["esd", "esd-b"]]}, {**DATASETS, "esd-b": {}})


def test_transfer_grid_takes_the_source_masks_of_the_primary_setting():
    g = conditions.dataset_transfer_grid(SEL, EV, FILT, "ser", "esd_b", "ser.esd_b")
    own = conditions.grid(SEL, EV, "ser")[1:]
    assert len(g) == len(own)  # every intervention of the task's grid, once
    assert {c["ident"] for c in g} == {"data-esd_b-c3-unfiltered"}  # the primary setting only
    cas = next(c for c in g if c["condition"] == "data-esd_b-c3-unfiltered-cas-r0.05-deactivate")
    assert cas["mask"] == "ser.esd_b/masks/c3-unfiltered/cas-r0.05" and cas["source_dataset"] == "esd_b"
    assert "aggregate" not in cas
    # erase reads M of the source's aggregate of that setting, not of an aggregate named after the ident
    erase = next(c for c in g if c["condition"] == "data-esd_b-c3-unfiltered-cas-r0.05-erase")
    assert erase["aggregate"] == "ser.esd_b/aggregate/c3-unfiltered"
    # the seed stays last (metrics collapses random controls by stripping it) and ids never clash with the own grid
    assert "data-esd_b-c3-unfiltered-random-cas-r0.05-deactivate-s1" in {c["condition"] for c in g}
    full = {c["condition"] for c in conditions.full_grid(SEL, EV, FILT, "ser")}
    assert not full & {c["condition"] for c in g}


def _judged(cond: dict, correct: dict[str, list[int]], mask_emotion: str = "") -> list[dict]:
    """SER judged rows of one condition: per gold emotion, its utterances' correctness in order."""
    keys = {k: cond[k] for k in ("condition", "selector", "r", "intervention", "alpha", "mask_seed", "control_of")}
    return [{**keys, "id": f"{e}{i}", "speaker": f"00{36 + i % 2}", "status": "ok", "emotion": e,
             "mask_emotion": mask_emotion, "correct": ok, "pred": e if ok else "neutral"}
            for e, oks in correct.items() for i, ok in enumerate(oks)]


def _metrics_dir(tmp_path, name: str, source: str, unit: str, planted: dict[str, dict[str, list[int]]]):
    """Run the metrics stage on planted judged rows of the baseline and the source's cas deactivation."""
    g = conditions.dataset_transfer_grid(SEL, {"interventions": ["deactivate"], "alpha": [1.0]}, FILT, "ser", source, unit)
    cas = next(c for c in g if c["selector"] == "cas")
    rows = _judged(dict(conditions.BASELINE), planted["baseline"])
    for e in EMOS:
        rows += _judged(cas, planted[e], mask_emotion=e)
    f = tmp_path / f"{name}.tsv"
    write_table(f, pd.DataFrame(rows))
    out = tmp_path / name / cas["ident"]
    p = {"task": "ser", "wer_max": None, "bootstrap": 200, "seed": 0, "ci": 0.95}
    assert metrics.main(["--params", json.dumps(p), "--judged", str(f), "--outdir", str(out)]) == 0
    return out


def _masks(tmp_path, ds: str, angry: list[int], sad: list[int]) -> dict[str, str]:
    m = np.zeros((2, 2, 4), bool)
    m[0, 0, angry] = True
    m[1, 1, sad] = True
    f = tmp_path / ds / "cas-r0.05.safetensors"
    save_mask(f, m, EMOS, {"selector": "cas", "r": 0.05})
    return {"cas-r0.05": str(f)}


def test_dataset_transfer_table_is_hand_computed(tmp_path):
    # esd's masks on esd_b's rows. Baseline accuracy: angry 3/4, sad 2/4. Mask angry: angry 1/4, sad 2/4;
    # mask sad: angry 3/4, sad 0/4. SE(angry) = 25 - 75 = -50 points, ACE(angry) = Acc[sad->angry] - 75 = 0,
    # SE(sad) = 0 - 50 = -50, ACE(sad) = Acc[angry->sad] - 50 = 0; ESS = SE - ACE = -50; mean likewise.
    on_b = _metrics_dir(tmp_path, "ser.esd_b", "esd", "ser", {
        "baseline": {"angry": [1, 1, 1, 0], "sad": [1, 1, 0, 0]},
        "angry": {"angry": [1, 0, 0, 0], "sad": [1, 1, 0, 0]},
        "sad": {"angry": [1, 1, 1, 0], "sad": [0, 0, 0, 0]}})
    # esd_b's masks on esd: no effect on angry, sad down by 25: SE(angry) 0, SE(sad) -25, ACE 0
    on_a = _metrics_dir(tmp_path, "ser", "esd_b", "ser.esd_b", {
        "baseline": {"angry": [1, 1, 0, 0], "sad": [1, 1, 1, 1]},
        "angry": {"angry": [1, 1, 0, 0], "sad": [1, 1, 1, 1]},
        "sad": {"angry": [1, 1, 0, 0], "sad": [1, 1, 1, 0]}})
    own = _metrics_dir(tmp_path, "own", "esd", "ser", {  # in-dataset (esd on esd): the task's own primary folder
        "baseline": {"angry": [1, 1, 0, 0], "sad": [1, 1, 1, 1]},
        "angry": {"angry": [0, 0, 0, 0], "sad": [1, 1, 1, 1]},
        "sad": {"angry": [1, 1, 0, 0], "sad": [1, 1, 1, 1]}})
    # masks: angry {0,1,2} vs {1,2,3} of layer 0 -> 2/4; sad {0} vs {0} of layer 1 -> 1; mean 0.75
    masks = {"esd": _masks(tmp_path, "esd", [0, 1, 2], [0]), "esd_b": _masks(tmp_path, "esd_b", [1, 2, 3], [0])}
    spec = {"ident": "c3-unfiltered", "masks": masks, "pairs": [
        {"source": "esd", "target": "esd_b", "dir": str(on_b)}, {"source": "esd_b", "target": "esd", "dir": str(on_a)},
        {"source": "esd", "target": "esd", "dir": str(own)}]}
    ids = [{"ident": "c3-unfiltered", "c": 3, "filtered": False}]
    out = tmp_path / "metrics"
    p = {"task": "ser", "idents": ids, "datasets": spec}
    own_primary = tmp_path / "own-primary" / "c3-unfiltered"
    own_primary.parent.mkdir()
    own.rename(own_primary)
    spec["pairs"][2]["dir"] = str(own_primary)
    assert sweep.main(["--params", json.dumps(p), "--inputs", str(own_primary), "--outdir", str(out)]) == 0
    t = read_table(out / "dataset_transfer.tsv")
    cas = t[t["selector"].eq("cas")].set_index(["source_dataset", "target_dataset", "mask_emotion"])
    assert cas.loc[("esd", "esd_b", "angry"), ["SE", "ACE", "ESS"]].tolist() == [-50.0, 0.0, -50.0]
    assert cas.loc[("esd", "esd_b", "sad"), ["SE", "ACE", "ESS"]].tolist() == [-50.0, 0.0, -50.0]
    assert cas.loc[("esd", "esd_b", "mean"), ["SE", "ACE", "ESS"]].tolist() == [-50.0, 0.0, -50.0]
    assert cas.loc[("esd_b", "esd", "sad"), ["SE", "ACE", "ESS"]].tolist() == [-25.0, 0.0, -25.0]
    assert cas.loc[("esd_b", "esd", "angry"), ["SE", "ACE", "ESS"]].tolist() == [0.0, 0.0, 0.0]
    # intervals come with the numbers, as in the other tables
    assert {"SE_lo", "SE_hi", "ESS_lo", "ESS_hi"} <= set(t.columns)
    # the Jaccard of the two datasets' cas masks, per emotion and their mean, either direction
    for pair in (("esd", "esd_b"), ("esd_b", "esd")):
        assert cas.loc[(*pair, "angry"), "jaccard"] == pytest.approx(0.5)
        assert cas.loc[(*pair, "sad"), "jaccard"] == pytest.approx(1.0)
        assert cas.loc[(*pair, "mean"), "jaccard"] == pytest.approx(0.75)
    # a dataset with itself: exactly the in-dataset numbers of the task's own primary setting, Jaccard 1
    same = t[t["source_dataset"].eq("esd") & t["target_dataset"].eq("esd")].drop(
        columns=["source_dataset", "target_dataset", "jaccard"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(same, read_table(own_primary / "effects_by_selector.tsv"))
    assert (t[t["source_dataset"].eq("esd") & t["target_dataset"].eq("esd")]["jaccard"] == 1.0).all()
    ov = read_table(out / "dataset_overlap.tsv")
    row = ov[ov["source_dataset"].eq("esd") & ov["target_dataset"].eq("esd_b") & ov["mask_emotion"].eq("angry")].iloc[0]
    assert (row["n_source"], row["n_target"], row["n_shared"]) == (3, 3, 2)
    # the stacked main table keeps only the task's own rows in the sweeps
    assert "dataset_transfer" not in {f.stem for f in (out).glob("c_sweep*")}

    # the report's section: one matrix per setting with the planted numbers, and the overlap
    sweeps = {k: read_table(out / f"{k}.tsv") for k in ("dataset_transfer", "dataset_overlap")}
    sec = report.dataset_transfer("ser", sweeps)
    assert "How to read it" in sec and "masks from esd_b" in sec and "on esd_b" in sec
    assert "-50 [" in sec and "-25 [" in sec and "0.750" in sec
    assert "nan" not in sec.lower()


def test_transfer_rows_stay_out_of_the_sweeps_and_task_transfer(tmp_path):
    ids = [{"ident": "c3-unfiltered", "c": 3, "filtered": False},
           {"ident": "from-evc-c3-unfiltered", "c": 3, "filtered": False, "source_task": "evc"},
           {"ident": "data-esd_b-c3-unfiltered", "c": 3, "filtered": False, "source_dataset": "esd_b"}]
    dirs = []
    for i, idt in enumerate(ids):
        d = tmp_path / idt["ident"]
        write_table(d / "effects_by_selector.tsv", pd.DataFrame(
            {"condition": ["x"], "selector": ["cas"], "mask_emotion": ["mean"], "ESS": [float(i)]}))
        dirs.append(d)
    tables = sweep.stack("ser", ids, dirs)
    assert tables["effects_by_selector"]["masks_from"].tolist() == ["ser", "evc", "dataset:esd_b"]
    out = sweep.sweeps("ser", tables, ids)
    assert out["c_sweep"]["ESS"].tolist() == [0.0] and out["task_transfer"]["ESS"].tolist() == [1.0]


def test_report_says_why_without_pairs():
    sec = report.dataset_transfer("ser", {})
    assert "transfer.datasets lists no" in sec and "absent" in sec


def test_evc_pairs_take_the_deltas_and_the_overlap_by_target(tmp_path):
    """EVC: the by-selector deltas of each pair; a target emotion's row gets that emotion's mask overlap and the
    pooled row (`all`) the mean over emotions; the report's matrix shows the target-accuracy delta in points."""
    masks = {"esd": _masks(tmp_path, "esd", [0, 1, 2], [0]), "esd_b": _masks(tmp_path, "esd_b", [1, 2, 3], [0])}
    pairs = []
    for src, tgt, delta in (("esd", "esd_b", 0.25), ("esd_b", "esd", -0.5)):
        d = tmp_path / f"{src}-{tgt}"
        write_table(d / "deltas_by_selector.tsv", pd.DataFrame([
            {"condition": "x", "selector": "cas", "r": 0.05, "intervention": "steer", "alpha": 1.0, "mask_seed": 0,
             "control_of": "", "target": tgt_e, "metric": "target_acc", "n": 8, "value": 0.5, "baseline": 0.25,
             "delta": delta, "ci_lo": delta - 0.1, "ci_hi": delta + 0.1, "n_seeds": 1, "delta_seed_sd": np.nan}
            for tgt_e in ("angry", "sad", "all")]))
        pairs.append({"source": src, "target": tgt, "dir": str(d)})
    out = sweep.dataset_transfer("evc", {"ident": "c3-unfiltered", "pairs": pairs, "masks": masks})
    t = out["dataset_transfer"].set_index(["source_dataset", "target"])
    assert t.loc[("esd", "angry"), "jaccard"] == pytest.approx(0.5)
    assert t.loc[("esd", "sad"), "jaccard"] == pytest.approx(1.0)
    assert t.loc[("esd_b", "all"), "jaccard"] == pytest.approx(0.75)
    sec = report.dataset_transfer("evc", out)
    assert "masks from esd_b" in sec and "25 [15, 35]" in sec and "-50 [-60, -40]" in sec
