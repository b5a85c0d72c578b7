"""Stage 4b mask routing (issue 7, "Tests that must exist"): which mask reaches the hook for which row.

Why: EVC must steer each row with the mask of its own target emotion, also inside batches that mix targets;
SER must apply every emotion's mask to every utterance (the rows of the change matrix). Each emotion gets a
distinct mask (only neuron e of layer 0 for emotion e), and a spy on the intervention's edit records, per
forward call, which mask each row of the running batch had.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from toy import ToyAdapter

from emotion_neurons.hooks import Intervention
from emotion_neurons.io import read_table, write_jsonl
from emotion_neurons.selectors import save_mask
from emotion_neurons.stages import evaluate
from emotion_neurons.types import Instance

EMOTIONS = ["angry", "happy", "sad"]
L = 3  # toy layers


@pytest.fixture(scope="module")
def adapter():
    a = ToyAdapter()
    a.load()
    return a


def _wav(tmp_path, name, n):
    p = tmp_path / f"{name}.wav"
    t = np.arange(1600 * n) / 16000
    sf.write(p, (0.3 * np.sin(2 * np.pi * 150 * n * t)).astype(np.float32), 16000)
    return str(p)


def _manifest(tmp_path, task):
    rows = []
    for s in range(3):
        wav = _wav(tmp_path, f"src{s}", s + 2)
        if task == "evc":
            for t in EMOTIONS:
                rows.append(Instance(id=f"src{s}->{t}", task="evc", wav=wav, speaker=f"spk{s % 2}", emotion="neutral",
                                     split="eval", prompt=f"speak {t} {s}", text="words", target=t))
        else:
            rows.append(Instance(id=f"src{s}", task="ser", wav=wav, speaker=f"spk{s % 2}", emotion=EMOTIONS[s],
                                 split="eval", prompt=f"which emotion {s}", options=list(EMOTIONS)))
    path = tmp_path / f"{task}.jsonl"
    write_jsonl(path, [r.to_dict() for r in rows])
    return path, [r.id for r in rows]


def _mask(tmp_path, adapter):
    mask = np.zeros((len(EMOTIONS), L, adapter.n_neurons()), dtype=bool)
    for e in range(len(EMOTIONS)):
        mask[e, 0, e] = True  # distinct masks: emotion e is neuron e of layer 0
    path = tmp_path / "lap-r0.05.safetensors"
    save_mask(path, mask, EMOTIONS, {"selector": "lap", "r": 0.05})
    return path


@pytest.fixture
def spy(adapter, monkeypatch):
    """(instance id, emotion index of its mask) for every row of every edit the hook made."""
    seen: list[tuple[str, int]] = []
    batch: list[list[str]] = [[]]
    real_prepare, real_edit = adapter.prepare, Intervention._edit

    def prepare(instances, audios):
        batch[0] = [i.id for i in instances]
        return real_prepare(instances, audios)

    def edit(self, layer_pos, g):
        if layer_pos == 0:
            on = self.masks[:, 0].nonzero().tolist()  # [row, neuron]
            assert sorted(r for r, _ in on) == list(range(len(batch[0])))  # exactly one neuron per row
            seen.extend((batch[0][r], n) for r, n in on)
        return real_edit(self, layer_pos, g)

    monkeypatch.setattr(adapter, "prepare", prepare)
    monkeypatch.setattr(Intervention, "_edit", edit)
    monkeypatch.setattr(evaluate, "load_adapter", lambda cfg: adapter)
    return seen


def _run(tmp_path, task, mask, intervention="steer", batch_size=2, cap=None):
    manifest, ids = _manifest(tmp_path, task)
    params = {
        "task": task,
        "condition": {"condition": f"lap-r0.05-{intervention}", "intervention": intervention, "alpha": 1.0},
        "model": {"batch_size": batch_size},
        "task_cfg": {"max_new_tokens": 3},
        "data": {},
        "eval": {"positions": "all", "max_instances_per_shard": cap, "sample_seed": 0},
        "component": "thinker",
        "hook_site": "gate",
    }
    out = tmp_path / f"out-{task}-{intervention}"
    argv = ["--params", json.dumps(params), "--manifest", str(manifest), "--shard", "0", "--n-shards", "1",
            "--out", str(out)]
    if mask is not None:
        argv += ["--mask", str(mask)]
    assert evaluate.main(argv) == 0
    return read_table(out / "outputs.tsv"), ids, out


@pytest.mark.parametrize("intervention", ["steer", "deactivate"])
def test_evc_row_gets_the_mask_of_its_own_target(adapter, spy, tmp_path, intervention):
    mask = _mask(tmp_path, adapter)
    df, ids, _ = _run(tmp_path, "evc", mask, intervention, batch_size=4)  # batches mix targets and sources
    assert sorted(df["id"]) == sorted(ids) and df["status"].eq("ok").all()
    applied: dict[str, set[int]] = {}
    for iid, e in spy:
        applied.setdefault(iid, set()).add(e)
    assert applied == {iid: {EMOTIONS.index(iid.split("->")[1])} for iid in ids}
    assert (df["mask_emotion"] == df["target"]).all()


def test_ser_applies_every_mask_to_every_utterance(adapter, spy, tmp_path):
    mask = _mask(tmp_path, adapter)
    df, ids, _ = _run(tmp_path, "ser", mask, batch_size=2)
    assert set(spy) == {(iid, e) for iid in ids for e in range(len(EMOTIONS))}
    assert len(df) == len(ids) * len(EMOTIONS)
    assert set(zip(df["id"], df["mask_emotion"].map(EMOTIONS.index), strict=True)) == set(spy)
    # the gold label is not what routes the mask: every utterance saw its own emotion's mask and the others
    assert df.groupby("id")["mask_emotion"].apply(sorted).map(lambda v: v == sorted(EMOTIONS)).all()


def test_baseline_applies_no_mask_and_cap_is_reported(adapter, spy, tmp_path):
    df, ids, out = _run(tmp_path, "evc", None, "none", cap=6)
    assert spy == [] and (df["mask_emotion"].isna() | (df["mask_emotion"] == "")).all()
    strata = read_table(out / "strata.tsv")
    assert strata["kept"].sum() == len(df) == 6
    assert df["target"].value_counts().to_dict() == dict.fromkeys(EMOTIONS, 2)
