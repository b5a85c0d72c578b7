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


# -- label-agnostic injections and erase (issue 11) --------------------------------------------------------------
@pytest.fixture
def mask_spy(adapter, monkeypatch):
    """(instance id, the row's mask values on neurons 0..2 of layer 0) at every prefill edit."""
    seen: list[tuple[str, tuple[float, ...]]] = []
    batch: list[list[str]] = [[]]
    real_prepare, real_edit = adapter.prepare, Intervention._edit

    def prepare(instances, audios):
        batch[0] = [i.id for i in instances]
        return real_prepare(instances, audios)

    def edit(self, layer_pos, g):
        if layer_pos == 0 and not self.tracker.decoding:
            m = self.masks[:, 0, :3].float()
            seen.extend((iid, tuple(m[r].tolist())) for r, iid in enumerate(batch[0]))
        return real_edit(self, layer_pos, g)

    monkeypatch.setattr(adapter, "prepare", prepare)
    monkeypatch.setattr(Intervention, "_edit", edit)
    monkeypatch.setattr(evaluate, "load_adapter", lambda cfg: adapter)
    return seen


def _run_iv(tmp_path, mask, intervention, extra_eval=None, argv_extra=()):
    manifest, ids = _manifest(tmp_path, "ser")
    params = {
        "task": "ser",
        "condition": {"condition": f"lap-r0.05-{intervention}-a1", "intervention": intervention, "alpha": 1.0},
        "model": {"batch_size": 2}, "task_cfg": {"max_new_tokens": 3}, "data": {},
        "eval": {"positions": "all", "max_instances_per_shard": None, "sample_seed": 0, **(extra_eval or {})},
        "component": "thinker", "hook_site": "gate",
    }
    out = tmp_path / f"out-{intervention}"
    argv = ["--params", json.dumps(params), "--manifest", str(manifest), "--shard", "0", "--n-shards", "1",
            "--out", str(out), *argv_extra]
    if mask is not None:
        argv += ["--mask", str(mask)]
    assert evaluate.main(argv) == 0
    return read_table(out / "outputs.tsv"), ids, out


def _direct_option_logp(adapter, inst_id, manifest_rows):
    """log softmax of the next-token logits after the prompt alone (no batch, no hooks), at the option tokens."""
    import torch

    from emotion_neurons.io import load_audio

    inst = next(r for r in manifest_rows if r.id == inst_id)
    ids = adapter.tokens(inst, load_audio(inst.wav, 16000))
    with torch.no_grad():
        logits = adapter.model(input_ids=torch.tensor([ids])).logits[0, -1]
    lp = torch.log_softmax(logits.float(), -1)
    return lp[adapter.option_token_ids(len(inst.options))].numpy()


def test_two_pass_steers_with_the_mask_of_the_first_pass_prediction(adapter, mask_spy, tmp_path, monkeypatch):
    from emotion_neurons.io import read_jsonl
    from emotion_neurons.prompts import parse_answer

    real_generate = adapter.generate

    def generate(prepared, settings):  # src0 answers option 1 (angry); the toy's other answers do not parse
        outs = real_generate(prepared, settings)
        for inst, o in zip(prepared.instances, outs, strict=True):
            if inst.id == "src0":
                o.text = "1"
        return outs

    monkeypatch.setattr(adapter, "generate", generate)
    mask = _mask(tmp_path, adapter)
    base, ids, _ = _run_iv(tmp_path, None, "none")
    n_base = len(mask_spy)
    df, _, out = _run_iv(tmp_path, mask, "two_pass")
    assert n_base == 0 and len(df) == len(ids) and (df["mask_emotion"].isna() | df["mask_emotion"].eq("")).all()
    first = read_table(out / "first-pass.tsv")  # the first pass is the unintervened baseline, kept for audit
    assert dict(zip(first["id"], first["output_text"], strict=True)) == dict(
        zip(base["id"], base["output_text"], strict=True))
    rows = [Instance.from_dict(d) for d in read_jsonl(_manifest(tmp_path, "ser")[0])]
    applied = dict(mask_spy)
    for r in df.itertuples():
        scores = json.loads(r.first_scores)
        options = r.options.split("|")
        # recorded option scores equal a direct forward pass of the prompt
        direct = _direct_option_logp(adapter, r.id, rows)
        np.testing.assert_allclose([scores[o] for o in options], direct, rtol=1e-4, atol=1e-4)
        answer = parse_answer(str(r.first_output_text) if isinstance(r.first_output_text, str) else "", options)
        expect = answer if answer else max(scores, key=scores.get)
        assert r.first_pred == expect and r.first_pred_from == ("answer" if answer else "scores")
        if r.id == "src0":  # the parsed answer wins over the scores (argmax happy on the toy)
            assert r.first_pred == "angry" and r.first_pred_from == "answer"
        onehot = tuple(float(EMOTIONS.index(r.first_pred) == k) for k in range(3))
        assert applied[r.id] == onehot  # the second pass used the mask of the first pass's prediction


def test_mix_weights_are_softmax_of_scores_over_temperature(adapter, mask_spy, tmp_path):
    from scipy.special import softmax

    mask = _mask(tmp_path, adapter)
    df, ids, _ = _run_iv(tmp_path, mask, "mix", {"mix_temperature": 0.5})
    applied = dict(mask_spy)
    assert set(applied) == set(ids)
    for r in df.itertuples():
        s = json.loads(r.first_scores)
        w = softmax(np.array([s[e] for e in EMOTIONS]) / 0.5)
        np.testing.assert_allclose(applied[r.id], w, rtol=1e-5)
        np.testing.assert_allclose([json.loads(r.injection_weights)[e] for e in EMOTIONS], w, atol=1e-6)


def test_union_steers_the_or_of_every_mask(adapter, mask_spy, tmp_path):
    mask = _mask(tmp_path, adapter)
    df, ids, out = _run_iv(tmp_path, mask, "union")
    assert dict(mask_spy) == {iid: (1.0, 1.0, 1.0) for iid in ids}
    assert len(df) == len(ids) and not (out / "first-pass.tsv").exists()  # no first pass needed


def test_erase_reads_the_other_emotions_mean_from_the_aggregate(adapter, tmp_path, monkeypatch):
    import zarr

    monkeypatch.setattr(evaluate, "load_adapter", lambda cfg: adapter)
    seen = []
    real = Intervention.set_masks

    def spy(self, masks, values=None):
        seen.append((masks.clone(), None if values is None else values.clone()))
        return real(self, masks, values)

    monkeypatch.setattr(Intervention, "set_masks", spy)
    mask = _mask(tmp_path, adapter)
    agg = tmp_path / "aggregate.zarr"
    order = ["sad", "angry", "happy"]  # the aggregate's own order differs from the mask's
    M = np.random.default_rng(1).normal(size=(3, L, adapter.n_neurons())).astype(np.float32)
    g = zarr.open_group(agg, mode="w", zarr_format=3)
    g.create_array("M", shape=M.shape, dtype=M.dtype)[:] = M
    g.attrs.update({"emotions": order})
    df, ids, _ = _run_iv(tmp_path, mask, "erase", argv_extra=["--aggregate", str(agg)])
    assert len(df) == len(ids) * 3
    for masks, values in seen:
        e = int(masks[0, 0].nonzero()[0, 0])  # which emotion's mask this batch had
        others = [order.index(x) for x in EMOTIONS if x != EMOTIONS[e]]
        np.testing.assert_allclose(values[0].numpy(), M[others].mean(0), rtol=1e-6)
    g.attrs.update({"emotions": order})
    del g
    import shutil

    shutil.rmtree(agg)
    h = zarr.open_group(agg, mode="w", zarr_format=3)
    h.create_array("K", shape=M.shape, dtype=M.dtype)[:] = M
    h.attrs.update({"emotions": order})
    with pytest.raises(ValueError, match="no mean activation M: erase needs capture.act_sums"):
        _run_iv(tmp_path, mask, "erase", argv_extra=["--aggregate", str(agg)])
