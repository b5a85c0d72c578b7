"""The generation engine apart from the stage's I/O (issue 10): batches in, outputs and statistics out, hooks
always removed (after the loop, on error, when the caller stops early).

Why: identification, evaluation (both passes of an injection) and benchmarks share this loop; a hook left on
the model would silently edit or record every later generation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy import ToyAdapter

from emotion_neurons.engine import Engine
from emotion_neurons.hooks import InterventionSpec, SpanTracker, StatsRecorder
from emotion_neurons.types import GenerationSettings, Instance

SETTINGS = GenerationSettings(max_new_tokens=4)
INSTS = [Instance(id=f"u{i}", task="ser", wav=f"w{i}", speaker="s", emotion="sad", split="eval", prompt=p,
                  options=["sad", "happy", "angry"]) for i, p in enumerate(["hello", "a longer prompt", "hi", "x"])]
AUDIOS = {f"w{i}": np.zeros(1600 * (i + 1), np.float32) for i in range(4)}


@pytest.fixture(scope="module")
def toy():
    a = ToyAdapter()
    a.load()
    return a


def _no_hooks(adapter):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in adapter.model.modules())


def _masks(adapter, b):
    return torch.rand((b, 3, adapter.n_neurons()), generator=torch.Generator().manual_seed(0)) < 0.3


def test_engine_statistics_equal_direct_capture(toy):
    eng = Engine(toy, SETTINGS, batch_size=2)
    res = list(eng.run(INSTS, AUDIOS, record=True, sum_squares=True))
    assert [len(r.instances) for r in res] == [2, 2] and _no_hooks(toy)
    sites = toy.resolve_sites()
    tracker = SpanTracker(toy.stop_token_ids)
    rec = StatsRecorder(sites, tracker, sum_squares=True)
    prepared = toy.prepare(INSTS[:2], [AUDIOS["w0"], AUDIOS["w1"]])
    with tracker.attached(toy.model), rec.attached():
        tracker.start(prepared.span_codes)
        rec.reset(2)
        outs = toy.generate(prepared, SETTINGS)
    ref = rec.result()
    for k in ("pos_count", "tokens"):
        np.testing.assert_array_equal(res[0].stats[k], ref[k])
    np.testing.assert_allclose(res[0].stats["act_sum"], ref["act_sum"], rtol=1e-5, atol=1e-6)
    assert [o.text for o in res[0].outputs] == [o.text for o in outs]


def test_hooks_removed_on_error_and_on_early_stop(toy, monkeypatch):
    eng = Engine(toy, SETTINGS, batch_size=2)
    it = eng.run(INSTS, AUDIOS, intervention=InterventionSpec("steer", 1.0), mask_fn=lambda b: _masks(toy, len(b)),
                 record=True, option_scores=True)
    first = next(it)
    assert first.option_scores.shape == (2, 3) and not _no_hooks(toy)  # attached while the loop runs
    it.close()  # the caller stops early
    assert _no_hooks(toy)
    calls = []
    real = toy.generate

    def failing(prepared, settings):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(prepared, settings)

    monkeypatch.setattr(toy, "generate", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        list(eng.run(INSTS, AUDIOS, intervention=InterventionSpec("erase"),
                     mask_fn=lambda b: (_masks(toy, len(b)), torch.zeros(len(b), 3, toy.n_neurons())), record=True))
    assert len(calls) == 2 and _no_hooks(toy)


def test_intervention_needs_a_mask_fn_and_identity_needs_none(toy):
    eng = Engine(toy, SETTINGS, batch_size=4)
    with pytest.raises(ValueError, match="needs a mask_fn"):
        list(eng.run(INSTS, AUDIOS, intervention=InterventionSpec("steer", 1.0)))
    assert _no_hooks(toy)
    plain = list(eng.run(INSTS, AUDIOS))
    zero = list(eng.run(INSTS, AUDIOS, intervention=InterventionSpec("mix", 0.0)))
    assert [o.text for o in plain[0].outputs] == [o.text for o in zero[0].outputs]
