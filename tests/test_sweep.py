"""c and filtering as grid dimensions (issue 11): the identification settings, their conditions, and the
stacked metric tables with the c sweep and the filtering ablation cut around the primary setting.

Why: with `filter.c` and `filter.enabled` as lists, every setting must get its own masks and conditions
(an id clash would silently evaluate one setting's mask for another), the baseline must be shared, and the
sweep tables must hold exactly the rows of the varied factor (hand-built tables with planted values).
"""

from __future__ import annotations

import pandas as pd
import pytest

from emotion_neurons import conditions
from emotion_neurons.io import read_table, write_table
from emotion_neurons.stages import sweep

SEL = {"selectors": ["lap", "random"], "r": [0.05], "random": {"seeds": 2}}
EV = {"interventions": ["deactivate", "steer"], "alpha": [1.0]}


def test_idents_cross_c_and_filtering_primary_first():
    ids = conditions.idents({"c": [50, 10], "enabled": [True, False]})
    assert [i["ident"] for i in ids] == ["c50-filtered", "c50-unfiltered", "c10-filtered", "c10-unfiltered"]
    # scalars (the single-run config) are one setting
    assert conditions.idents({"c": 3, "enabled": False}) == [{"ident": "c3-unfiltered", "c": 3, "filtered": False}]
    assert conditions.ident_filter({"c": [50, 10], "enabled": True, "seed": 4}, ids[3]) == {
        "c": 10, "enabled": False, "seed": 4}
    with pytest.raises(ValueError, match="filter.c"):
        conditions.idents({"c": [5, 5]})


def test_full_grid_one_baseline_and_every_condition_per_setting():
    one = conditions.grid(SEL, EV)
    full = conditions.full_grid(SEL, EV, {"c": [50, 10], "enabled": True})
    assert len(full) == 1 + 2 * (len(one) - 1)
    assert [c["condition"] for c in full if c["ident"] == ""] == ["baseline"]
    ids = [c["condition"] for c in full]
    assert len(set(ids)) == len(ids)
    c10 = [c for c in full if c["ident"] == "c10-filtered"]
    assert {c["mask"].split("/")[0] for c in c10} == {"c10-filtered"} and all(c["c"] == 10 for c in c10)
    # the seed stays the last part of a random control's id (metrics strips it to collapse seeds)
    assert "c10-filtered-random-lap-r0.05-deactivate-s1" in ids
    # adding a c adds conditions and changes none
    more = conditions.full_grid(SEL, EV, {"c": [50, 10, 25], "enabled": True})
    assert [c for c in more if c["condition"] in set(ids)] == full


def _tables(root, ident, ess):
    d = root / ident
    eff = pd.DataFrame({"condition": ["x-lap", "x-lap"], "selector": "lap", "mask_emotion": ["angry", "mean"],
                        "ESS": [ess, ess + 1]})
    write_table(d / "effects_by_selector.tsv", eff)
    write_table(d / "summary.tsv", pd.DataFrame({"condition": ["baseline"], "WA": [0.5]}))
    return d


def test_stack_and_sweeps(tmp_path):
    ids = conditions.idents({"c": [50, 10], "enabled": [True, False]})
    planted = {"c50-filtered": 1.0, "c50-unfiltered": 2.0, "c10-filtered": 3.0, "c10-unfiltered": 4.0}
    dirs = [_tables(tmp_path, i["ident"], planted[i["ident"]]) for i in ids]
    out = tmp_path / "out"
    params = {"task": "ser", "idents": ids}
    import json

    assert sweep.main(["--params", json.dumps(params), "--inputs", *map(str, dirs), "--outdir", str(out)]) == 0
    eff = read_table(out / "effects_by_selector.tsv")
    assert len(eff) == 8 and set(eff["ident"]) == set(planted)
    assert (eff[eff["mask_emotion"].eq("angry")].set_index("ident")["ESS"].to_dict()) == planted
    cs = read_table(out / "c_sweep.tsv")
    assert cs[cs["mask_emotion"].eq("angry")][["c", "ESS"]].values.tolist() == [[10, 3.0], [50, 1.0]]
    ab = read_table(out / "filter_ablation.tsv")
    assert ab[ab["mask_emotion"].eq("angry")][["filtered", "ESS"]].values.tolist() == [[True, 1.0], [False, 2.0]]
    assert len(read_table(out / "summary.tsv")) == 4
    with pytest.raises(ValueError, match="does not belong"):
        sweep.stack("ser", ids, dirs[::-1])


def test_transfer_grid_takes_the_other_tasks_primary_masks():
    filt = {"c": [50, 10], "enabled": True}
    evc = conditions.transfer_grid(SEL, {**EV, "alpha": [0.5, 1.0]}, filt, "ser", "evc")
    ser = conditions.transfer_grid(SEL, EV, filt, "evc", "ser")
    # SER masks steer EVC at every alpha; EVC masks only deactivate SER
    assert {c["intervention"] for c in evc} == {"steer"} and {c["alpha"] for c in evc} == {0.5, 1.0}
    assert {c["intervention"] for c in ser} == {"deactivate"}
    assert len(ser) == len(conditions.masks(SEL)) and len(evc) == 2 * len(ser)
    assert all(c["mask"].startswith("ser/masks/c50-filtered/") for c in evc)
    assert {c["ident"] for c in ser} == {"from-evc-c50-filtered"} and all(c["c"] == 50 for c in ser)
    own = {c["condition"] for c in conditions.full_grid(SEL, EV, filt)}
    assert not own & {c["condition"] for c in ser}


def test_transfer_rows_go_to_task_transfer_not_to_the_sweeps(tmp_path):
    import json

    ids = conditions.idents({"c": [50], "enabled": True})
    tr = {**ids[0], "ident": "from-evc-c50-filtered", "source_task": "evc"}
    dirs = [_tables(tmp_path, ids[0]["ident"], 1.0), _tables(tmp_path, tr["ident"], 9.0)]
    out = tmp_path / "out"
    params = {"task": "ser", "idents": [*ids, tr]}
    assert sweep.main(["--params", json.dumps(params), "--inputs", *map(str, dirs), "--outdir", str(out)]) == 0
    t = read_table(out / "task_transfer.tsv")
    assert set(t["masks_from"]) == {"evc"} and t[t["mask_emotion"].eq("angry")]["ESS"].tolist() == [9.0]
    for name in ("c_sweep", "filter_ablation"):
        assert read_table(out / f"{name}.tsv")["ESS"].tolist() == [1.0, 2.0]
