"""Grouped evaluation (issue 8): one model load per group of conditions, per-condition results cached by
content so a group that gains a condition computes only that condition, and outputs identical to
evaluating each condition on its own.

Why: a group job re-runs whenever its condition list changes; without the cache it would recompute every
condition of the group, and a state leak between conditions run in one process (hooks left on the model)
would silently change results. The toy adapter is counted at load time and a steered condition must differ
from the baseline, so a test that always passed would have to ignore the outputs.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import test_evaluate as te
from toy import ToyAdapter

from emotion_neurons import conditions
from emotion_neurons.io import read_table
from emotion_neurons.selectors import save_mask
from emotion_neurons.stages import evaluate, judge

COMMON = {
    "model": {"batch_size": 2},
    "task_cfg": {"max_new_tokens": 3},
    "data": {},
    "eval": {"positions": "all", "max_instances_per_shard": None, "sample_seed": 0},
    "component": "thinker",
    "hook_site": "gate",
    "code": "test",
}


def _cond(cid, intervention, alpha, mask):
    return {"condition": cid, "intervention": intervention, "alpha": alpha, "mask": mask, "selector": "lap",
            "r": 0.05, "mask_seed": 0, "control_of": ""}


BASE = {**conditions.BASELINE}
STEER = _cond("lap-r0.05-steer-a1", "steer", 1.0, "lap-r0.05")
DEACT = _cond("lap-r0.05-deactivate", "deactivate", 1.0, "lap-r0.05")


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads; every load builds a fresh toy adapter (as a real load would)."""
    n = [0]

    def load(cfg):
        n[0] += 1
        a = ToyAdapter()
        a.load()
        return a

    monkeypatch.setattr(evaluate, "load_adapter", load)
    return n


def _setup(tmp_path, task):
    manifest, _ = te._manifest(tmp_path, task)
    masks = tmp_path / "masks"
    masks.mkdir()
    a = ToyAdapter()
    a.load()
    mask = np.zeros((len(te.EMOTIONS), te.L, a.n_neurons()), dtype=bool)
    mask[:, :, : a.n_neurons() // 2] = True  # half of every layer: steering must change the outputs
    save_mask(masks / "lap-r0.05.safetensors", mask, te.EMOTIONS, {"selector": "lap", "r": 0.05})
    return str(manifest), str(masks)


def _group(tmp_path, task, conds, manifest, masks, out):
    p = {"common": {**COMMON, "task": task}, "conditions": conds}
    return evaluate.evaluate_group(p, manifest, masks, 0, 1, 2, str(tmp_path / "cache"), str(tmp_path / out))


def test_one_load_per_group_and_only_new_conditions_computed(tmp_path, loads):
    manifest, masks = _setup(tmp_path, "ser")
    n = _group(tmp_path, "ser", [BASE, STEER], manifest, masks, "g1")
    assert (n["computed"], n["cached"], n["model_loads"]) == (2, 0, 1) and loads[0] == 1
    # the group gains a condition: only that one is computed, under one more load
    n = _group(tmp_path, "ser", [BASE, STEER, DEACT], manifest, masks, "g2")
    assert (n["computed"], n["cached"], n["model_loads"]) == (1, 2, 1) and loads[0] == 2
    # nothing new: no load at all
    n = _group(tmp_path, "ser", [BASE, STEER, DEACT], manifest, masks, "g3")
    assert (n["computed"], n["model_loads"]) == (0, 0) and loads[0] == 2
    for c in (BASE, STEER, DEACT):
        pd.testing.assert_frame_equal(read_table(tmp_path / "g2" / c["condition"] / "outputs.tsv"),
                                      read_table(tmp_path / "g3" / c["condition"] / "outputs.tsv"))


def test_changed_mask_bytes_are_recomputed(tmp_path, loads):
    manifest, masks = _setup(tmp_path, "ser")
    _group(tmp_path, "ser", [STEER], manifest, masks, "g1")
    a = ToyAdapter()
    a.load()
    other = np.zeros((len(te.EMOTIONS), te.L, a.n_neurons()), dtype=bool)
    other[:, 0, 0] = True
    save_mask(f"{masks}/lap-r0.05.safetensors", other, te.EMOTIONS, {"selector": "lap", "r": 0.05})
    n = _group(tmp_path, "ser", [STEER], manifest, masks, "g2")
    assert n["computed"] == 1 and n["cached"] == 0


@pytest.mark.parametrize("task", ["evc", "ser"])
def test_grouped_outputs_equal_one_condition_per_process(tmp_path, loads, task):
    manifest, masks = _setup(tmp_path, task)
    _group(tmp_path, task, [STEER, BASE, DEACT], manifest, masks, "g")
    for c in (BASE, STEER, DEACT):
        out = tmp_path / f"alone-{c['condition']}"
        argv = ["--params", json.dumps({**COMMON, "task": task, "condition": c}), "--manifest", manifest,
                "--shard", "0", "--n-shards", "1", "--batch-size", "2", "--out", str(out)]
        if c["mask"]:
            argv += ["--mask", f"{masks}/{c['mask']}.safetensors"]
        assert evaluate.main(argv) == 0
        cols = ["id", "output_text", "mask_emotion"]
        alone = read_table(out / "outputs.tsv")[cols]
        grouped = read_table(tmp_path / "g" / c["condition"] / "outputs.tsv")[cols]
        pd.testing.assert_frame_equal(alone, grouped)
    steer = read_table(tmp_path / "g" / STEER["condition"] / "outputs.tsv")
    base = read_table(tmp_path / "g" / "baseline" / "outputs.tsv")
    assert task == "evc" or len(steer) == 3 * len(base)
    # the edit reached the model: some steered answer differs from the unedited one
    merged = steer.merge(base[["id", "output_text"]], on="id", suffixes=("", "_base"))
    assert (merged["output_text"] != merged["output_text_base"]).any()


def test_judge_group_caches_and_matches_the_per_condition_judge(tmp_path, loads):
    manifest, masks = _setup(tmp_path, "ser")
    _group(tmp_path, "ser", [BASE, STEER], manifest, masks, "g")
    common = {"task": "ser", "judges": {}, "labels": te.EMOTIONS, "code": "test"}
    conds = [{k: v for k, v in c.items() if k != "mask"} for c in (BASE, STEER)]
    n = judge.judge_group({"common": common, "conditions": conds}, str(tmp_path / "g"), str(tmp_path / "jc"),
                          str(tmp_path / "j1"))
    assert (n["computed"], n["cached"]) == (2, 0)
    n = judge.judge_group({"common": common, "conditions": conds}, str(tmp_path / "g"), str(tmp_path / "jc"),
                          str(tmp_path / "j2"))
    assert (n["computed"], n["cached"]) == (0, 2)
    for c in conds:
        alone = tmp_path / f"alone-{c['condition']}.tsv"
        judge.main(["--params", json.dumps({**common, "condition": c}), "--outputs",
                    str(tmp_path / "g" / c["condition"] / "outputs.tsv"), "--out", str(alone)])
        got = read_table(tmp_path / "j2" / f"{c['condition']}.tsv")
        pd.testing.assert_frame_equal(read_table(alone), got, check_like=True)
        assert got["condition"].eq(c["condition"]).all()


def test_missing_mask_names_the_condition(tmp_path, loads):
    manifest, masks = _setup(tmp_path, "ser")
    with pytest.raises(FileNotFoundError, match="lap-r0.05-deactivate.*cas-r0.05"):
        _group(tmp_path, "ser", [{**DEACT, "mask": "cas-r0.05"}], manifest, masks, "g")
    assert not (tmp_path / "g").exists()


def test_adding_conditions_changes_only_their_groups():
    """The group is a function of the condition id alone: a new alpha or r moves no old condition."""
    sel = {"selectors": ["lap", "cas", "random"], "r": [0.05], "random": {"seeds": 2}}
    ev = {"interventions": ["deactivate", "steer"], "alpha": [1.0]}
    for n_groups in (1, 3, 8):
        old = conditions.groups(conditions.grid(sel, ev), n_groups)
        for new_sel, new_ev in (({**sel, "r": [0.05, 0.1]}, ev), (sel, {**ev, "alpha": [1.0, 0.5]})):
            new = conditions.groups(conditions.grid(new_sel, new_ev), n_groups)
            old_ids = {c["condition"] for g in old.values() for c in g}
            added = {conditions.group_of(c["condition"], n_groups) for g in new.values() for c in g
                     if c["condition"] not in old_ids}
            changed = {g for g in new if [c["condition"] for c in new[g]] != [c["condition"] for c in old.get(g, [])]}
            assert changed == added and added
            for g, conds in old.items():  # old conditions keep their group and their order
                assert [c for c in new[g] if c["condition"] in old_ids] == conds
    with pytest.raises(ValueError, match="groups"):
        conditions.group_of("baseline", 0)
