"""The intervention registry and the arithmetic of each intervention on the hook site (issue 11).

Why: every intervention is a registered class whose edit must equal its METHOD.md definition (section 3.4),
computed here by hand; the strength interventions at alpha 0 must attach no hook (plain outputs), and the
label-agnostic injections must build their masks from the first pass exactly as defined.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from toy import ToyAdapter

from emotion_neurons import SPANS
from emotion_neurons.hooks import SpanTracker, StatsRecorder
from emotion_neurons.interventions import (
    INTERVENTIONS,
    Intervention,
    InterventionSpec,
    check_config,
    injection_weights,
    other_emotion_means,
    softmax_weights,
    weighted_masks,
)
from emotion_neurons.types import GenerationSettings, Instance

SETTINGS = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def toy():
    a = ToyAdapter()
    a.load()
    return a


def _masks(adapter, batch, frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, len(adapter.resolve_sites()), adapter.n_neurons()), generator=g) < frac


def _edit(adapter, spec, masks, g, layer=1, values=None, positions_codes=None):
    tracker = SpanTracker([2])
    tracker.start(positions_codes if positions_codes is not None else torch.zeros(g.shape[:2], dtype=torch.long))
    tracker.codes = tracker._prefill
    iv = Intervention(adapter.resolve_sites(), tracker, spec)
    iv.set_masks(masks, values)
    return iv._edit(layer, g)


def test_registry_lists_every_intervention_and_the_schema_enum_is_that_list():
    assert set(INTERVENTIONS.names()) >= {"none", "deactivate", "steer", "steer_norm", "erase", "two_pass", "mix",
                                          "union"}
    from emotion_neurons.schema import config_schema

    def enum() -> list[str]:
        return config_schema()["properties"]["evaluate"]["properties"]["interventions"]["items"]["enum"]

    assert sorted(enum()) == sorted(n for n in INTERVENTIONS.names() if n != "none")
    # one list: the schema's enum is the registry's, so a newly registered intervention is valid config at once
    with INTERVENTIONS.temporarily("halve_test", type("HalveTest", (Intervention,), {"uses_alpha": False})):
        assert "halve_test" in enum()
    assert "halve_test" not in enum()
    for name in INTERVENTIONS.names():
        assert isinstance(Intervention(None, None, InterventionSpec(name, 1.0)), INTERVENTIONS[name])
    with pytest.raises(ValueError, match="intervention 'amplify' unknown; expected one of .*steer_norm"):
        InterventionSpec("amplify")


def test_a_new_intervention_is_one_class():
    class Halve(Intervention):
        uses_alpha = False

        def factor(self, m):
            return 1 - 0.5 * m

    with INTERVENTIONS.temporarily("halve", Halve):
        g = torch.randn(1, 2, 48)
        m = torch.zeros(1, 3, 48, dtype=torch.bool)
        m[0, 1, :5] = True
        sites = [None] * 3
        tracker = SpanTracker([2])
        tracker.start(torch.zeros(1, 2, dtype=torch.long))
        iv = Intervention(sites, tracker, InterventionSpec("halve"))
        iv.set_masks(m)
        out = iv._edit(1, g)
        np.testing.assert_allclose(out[..., :5].numpy(), 0.5 * g[..., :5].numpy(), rtol=1e-6)
        np.testing.assert_array_equal(out[..., 5:].numpy(), g[..., 5:].numpy())
    assert "halve" not in INTERVENTIONS


def test_steer_norm_rescales_each_position_to_its_original_norm(toy):
    masks = _masks(toy, 2, frac=0.5)
    g = torch.randn(2, 3, toy.n_neurons())
    out = _edit(toy, InterventionSpec("steer_norm", 0.8), masks, g).numpy()
    gn = g.numpy()
    steered = gn * (1 + 0.8 * masks[:, 1].numpy()[:, None, :])
    expected = steered * (np.linalg.norm(gn, axis=-1, keepdims=True) / np.linalg.norm(steered, axis=-1, keepdims=True))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(gn, axis=-1), rtol=1e-5)
    assert not np.allclose(out, gn)  # the direction did change


def test_erase_sets_masked_neurons_to_the_other_emotions_mean(toy):
    M = np.random.default_rng(0).normal(size=(3, 3, toy.n_neurons())).astype(np.float32)
    Mbar = other_emotion_means(M)
    np.testing.assert_allclose(Mbar[0], (M[1] + M[2]) / 2, rtol=1e-6)  # by hand
    np.testing.assert_allclose(Mbar[2], (M[0] + M[1]) / 2, rtol=1e-6)
    masks = _masks(toy, 2, frac=0.4)
    rows = [2, 0]  # row 0 erases with emotion 2's mask, row 1 with emotion 0's
    values = torch.from_numpy(Mbar[rows])
    g = torch.randn(2, 3, toy.n_neurons())
    out = _edit(toy, InterventionSpec("erase"), masks, g, layer=1, values=values).numpy()
    m = masks[:, 1].numpy()[:, None, :].repeat(3, axis=1)
    target = np.broadcast_to(Mbar[rows][:, None, 1], out.shape)
    np.testing.assert_allclose(out[m], target[m], rtol=1e-6)
    np.testing.assert_array_equal(out[~m], g.numpy()[~m])
    # the equivalent of alpha 0: an empty mask leaves the site unchanged
    empty = torch.zeros_like(masks)
    np.testing.assert_array_equal(_edit(toy, InterventionSpec("erase"), empty, g, values=values).numpy(), g.numpy())
    with pytest.raises(ValueError, match="needs values"):
        _edit(toy, InterventionSpec("erase"), masks, g)
    with pytest.raises(ValueError, match="at least two emotions"):
        other_emotion_means(M[:1])


def test_erase_on_the_model_records_the_means_it_set(toy):
    """Through a real generation: layer 0's recorded sums of masked neurons are Mbar x tokens of each span."""
    insts = [Instance(id=f"u{i}", task="ser", wav="", speaker="s", emotion="sad", split="eval", prompt=p)
             for i, p in enumerate(["hello", "a longer prompt"])]
    audios = [np.zeros(4800, np.float32), np.zeros(3200, np.float32)]
    sites = toy.resolve_sites()
    tracker = SpanTracker(toy.stop_token_ids)
    masks = _masks(toy, 2, frac=0.3)
    values = torch.randn(2, len(sites), toy.n_neurons())
    iv = Intervention(sites, tracker, InterventionSpec("erase"))
    rec = StatsRecorder(sites, tracker)
    prepared = toy.prepare(insts, audios)
    with tracker.attached(toy.decoder_root("thinker")), iv.attached(), rec.attached():
        tracker.start(prepared.span_codes)
        iv.set_masks(masks, values)
        rec.reset(2)
        toy.generate(prepared, SETTINGS)
    st = rec.result()
    for s in range(len(SPANS)):
        expect = values.numpy()[:, 0] * st["tokens"][:, s][:, None]  # [B, N]
        m = masks.numpy()[:, 0]
        np.testing.assert_allclose(st["act_sum"][:, s, 0][m], expect[m], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["steer", "steer_norm", "two_pass", "mix", "union"])
def test_strength_interventions_at_alpha_zero_attach_no_hook(toy, name):
    sites = toy.resolve_sites()
    assert INTERVENTIONS[name].uses_alpha
    iv = Intervention(sites, SpanTracker([2]), InterventionSpec(name, 0.0))
    with iv.attached():
        iv.set_masks(torch.ones(1, len(sites), toy.n_neurons(), dtype=torch.bool))
        assert all(not s.module._forward_hooks and not s.module._forward_pre_hooks for s in sites)
    iv = Intervention(sites, SpanTracker([2]), InterventionSpec(name, 0.5))
    with iv.attached():
        assert all(s.module._forward_hooks for s in sites)
    assert not any(s.module._forward_hooks for s in sites)


def test_generated_positions_only_for_the_new_interventions(toy):
    masks = _masks(toy, 2, frac=0.5)
    g = torch.randn(2, 4, toy.n_neurons())
    codes = torch.tensor([[0, 1, 2, 2], [1, 1, 1, 2]])
    values = torch.randn(2, 3, toy.n_neurons())
    for spec in (InterventionSpec("steer_norm", 1.0, "generated"), InterventionSpec("erase", 1.0, "generated")):
        out = _edit(toy, spec, masks, g, values=values, positions_codes=codes)
        full = _edit(toy, InterventionSpec(spec.kind, 1.0), masks, g, values=values, positions_codes=codes)
        gen = (codes == SPANS.index("generated")).unsqueeze(-1).expand_as(g)
        np.testing.assert_array_equal(out[~gen].numpy(), g[~gen].numpy())
        np.testing.assert_allclose(out[gen].numpy(), full[gen].numpy(), rtol=1e-6)


def test_injection_weights_and_masks():
    scores = np.array([[-0.1, -2.3, -3.0], [-1.5, -0.4, -1.2]])
    np.testing.assert_allclose(softmax_weights(scores, 0.5), softmax(scores / 0.5, axis=1), rtol=1e-12)
    np.testing.assert_allclose(injection_weights("softmax", scores, [0, 1], 2.0), softmax(scores / 2.0, axis=1))
    np.testing.assert_array_equal(injection_weights("predicted", scores, [2, 0], 1.0), [[0, 0, 1], [1, 0, 0]])
    bank = torch.zeros(3, 2, 5, dtype=torch.bool)
    bank[0, 0, [0, 1]] = True
    bank[1, 0, [1, 2]] = True
    bank[2, 1, [4]] = True
    union = weighted_masks(bank, injection_weights("union", scores, [0, 0], 1.0))
    np.testing.assert_array_equal(union[0].numpy(), (bank[0] | bank[1] | bank[2]).float().numpy())  # OR, not sum
    one = weighted_masks(bank, injection_weights("predicted", scores, [1, 2], 1.0))
    np.testing.assert_array_equal(one.numpy(), bank[[1, 2]].float().numpy())
    w = softmax(scores / 1.0, axis=1)
    mix = weighted_masks(bank, w)
    assert mix[0, 0, 1].item() == pytest.approx(w[0, 0] + w[0, 1], rel=1e-6)  # neuron in masks 0 and 1
    assert mix[1, 1, 4].item() == pytest.approx(w[1, 2], rel=1e-6)
    # mix steers with the weighted mask: g * (1 + alpha sum_e w_e m_e)
    tracker = SpanTracker([2])
    tracker.start(torch.zeros(2, 1, dtype=torch.long))
    iv = Intervention([None, None], tracker, InterventionSpec("mix", 2.0))
    iv.set_masks(mix)
    g = torch.ones(2, 1, 5)
    np.testing.assert_allclose(iv._edit(0, g)[:, 0].numpy(), 1 + 2.0 * mix[:, 0].numpy(), rtol=1e-6)


def test_config_check_names_the_missing_activation_sums():
    check_config({"interventions": ["deactivate", "steer", "erase"]}, {"act_sums": "float16"})
    with pytest.raises(ValueError, match=r"\['erase'\].*capture.act_sums is 'none'"):
        check_config({"interventions": ["steer", "erase"]}, {"act_sums": "none"})
    with pytest.raises(ValueError, match="'wiggle'.*not registered"):
        check_config({"interventions": ["wiggle"]}, {})


def test_grid_takes_strength_from_the_registry_and_keeps_injections_to_ser():
    from emotion_neurons.conditions import grid

    sel = {"selectors": ["lap"], "r": [0.01]}
    ev = {"interventions": ["deactivate", "erase", "steer_norm", "two_pass", "mix", "union"], "alpha": [0.5, 1.0]}
    ser = [c["condition"] for c in grid(sel, ev, "ser")]
    assert ser == ["baseline", "lap-r0.01-deactivate", "lap-r0.01-erase", "lap-r0.01-steer_norm-a0.5",
                   "lap-r0.01-steer_norm-a1", "lap-r0.01-two_pass-a0.5", "lap-r0.01-two_pass-a1", "lap-r0.01-mix-a0.5",
                   "lap-r0.01-mix-a1", "lap-r0.01-union-a0.5", "lap-r0.01-union-a1"]
    evc = [c["condition"] for c in grid(sel, ev, "evc")]
    assert evc == ["baseline", "lap-r0.01-deactivate", "lap-r0.01-erase", "lap-r0.01-steer_norm-a0.5",
                   "lap-r0.01-steer_norm-a1"]


@pytest.mark.slow
def test_dry_run_adds_only_the_injection_jobs(tmp_path):
    """Adding the three injections to the demo adds one SER condition per mask each (none to EVC) and no job of
    another rule; the grouped evaluate jobs (one per group and shard) carry exactly those new conditions."""
    import json
    import re

    from test_workflow import REPO, demo_config, make_workdir, planned, snakemake

    from emotion_neurons import conditions

    b = {"evaluate": {"interventions": ["deactivate", "steer"], "alpha": [1.0]}}
    m = {"evaluate": {"interventions": ["deactivate", "steer", "two_pass", "mix", "union"], "alpha": [1.0],
                      "mix_temperature": 0.5}}
    wd = make_workdir(tmp_path / "wd")
    base, more = planned(wd, b), planned(wd, m)
    assert {k: v for k, v in more.items() if k not in ("evaluate", "judge_eval")} == {
        k: v for k, v in base.items() if k not in ("evaluate", "judge_eval")}
    n_masks = base["select"] // 2 + base["random_control"] // 2  # per task
    cb, cm = demo_config(b), demo_config(m)
    for task, extra in (("ser", 3 * n_masks), ("evc", 0)):
        old = {c["condition"] for c in conditions.full_grid(cb["select"], cb["evaluate"], cb["filter"], task)}
        new = {c["condition"] for c in conditions.full_grid(cm["select"], cm["evaluate"], cm["filter"], task)}
        assert old <= new and len(new - old) == extra, task
        assert all(re.search(r"-(two_pass|mix|union)(-|$)", c) for c in new - old)
    (wd / "more.yaml").write_text(json.dumps(m))
    out = snakemake(wd, "-n", "-p", "--configfile", str(REPO / "config" / "demo-machinery.yaml"),
                    str(wd / "more.yaml")).stdout
    texts = [out] + [(wd / f).read_text() for f in set(re.findall(r"@(results/cache/params/[0-9a-f]+\.json)", out))]
    planned_ids = {c for t in texts for c in re.findall(r'"condition":"([^"]*-(?:two_pass|mix|union)[^"]*)"', t)}
    assert len(planned_ids) == 3 * n_masks


@pytest.mark.parametrize("kind", ["steer_norm", "erase"])
def test_new_interventions_stay_in_one_compiled_graph(kind, tmp_path_factory):
    """The fast path (tests/test_fastpath.py) for the new edits: a fullgraph-compiled static-cache decode step
    with the hook traced once, no recompilation on a second batch, the same text as eager."""
    transformers = pytest.importorskip("transformers")
    from test_fastpath import BATCH, SETTINGS
    from torch._dynamo.utils import counters

    from emotion_neurons.models import get_adapter
    from emotion_neurons.tiny.qwen_omni import build

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = get_adapter("qwen2_5_omni")
    a.load(str(build(tmp_path_factory.mktemp(f"qwen_{kind}"))), device="cpu")
    sites = a.resolve_sites("thinker", "gate")
    masks = torch.rand((2, len(sites), a.n_neurons("thinker")), generator=torch.Generator().manual_seed(0)) < 0.2
    values = torch.randn(masks.shape, generator=torch.Generator().manual_seed(1))
    spec = InterventionSpec(kind, alpha=1.0)

    def once():
        tracker = SpanTracker(a.component_stop_token_ids("thinker"))
        iv = Intervention(sites, tracker, spec)
        prepared = a.prepare(*BATCH)
        with tracker.attached(a.decoder_root("thinker")), iv.attached():
            tracker.start(a.prefill_span_codes("thinker", prepared))
            iv.set_masks(masks, values if kind == "erase" else None)
            return [o.text for o in a.generate(prepared, SETTINGS)]

    torch._dynamo.reset()
    counters.clear()
    cfg = transformers.CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
    cfg._compile_all_devices = True
    try:
        a.set_decoding("static", "off")
        ref = once()
        a.set_decoding("static", cfg)
        first = once()
        graphs = counters["stats"]["unique_graphs"]
        second = once()
        assert counters["stats"]["unique_graphs"] == graphs and 1 <= graphs <= 2
        assert not dict(counters["graph_break"])
        assert first == ref == second
    finally:
        a.set_decoding("dynamic", "off")
        torch._dynamo.reset()
        torch.set_num_threads(threads)
