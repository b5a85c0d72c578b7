"""Extending the pipeline from outside the package: a new selector (named `cas_signed`, with `_`) and a toy
model adapter, registered by a plugin module written by this test, go through config validation, the DAG
(a Snakemake dry run) and selection -- with the exact params the DAG gives the select job."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from emotion_neurons import registry
from emotion_neurons.models import ADAPTERS
from emotion_neurons.schema import ConfigError, validate_config
from emotion_neurons.selectors import SELECTORS, load_mask

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A selector and a model adapter added without editing the package."""
import numpy as np

from emotion_neurons.models import ADAPTERS, declare
from emotion_neurons.selectors import ranking


@ranking("cas_signed", params={"floor": {"type": "number", "minimum": 0}})
def cas_signed(P, *, floor=0.0):
    """Signed contrast P_e - max of the other emotions; eligible above `floor`."""
    E = P.shape[0]
    others = np.stack([np.delete(P, e, axis=0).max(axis=0) for e in range(E)])
    score = P - others
    return score, score > floor


ADAPTERS.register("toy_plugin", declare("toy_plugin_adapter:ToyPluginAdapter"))
'''

ADAPTER = '''
"""A toy adapter file: its declaration is read without importing it (this import leaves a marker)."""
import os
from pathlib import Path

Path(os.environ["TOY_IMPORT_MARKER"]).write_text("imported")

from toy import ToyAdapter  # noqa: E402


class ToyPluginAdapter(ToyAdapter):
    name = "toy_plugin"
    tasks = ("ser",)
    env = "core"
    components = {"thinker": r"^model\\.layers\\.(\\d+)\\.mlp$"}
    hook_sites = ("gate", "pre_act")
    max_audio_seconds = 12
'''


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


OVERLAY = {
    "model": {"adapter": "toy_plugin", "id": "toy", "speaker": None},
    "tasks": {"evc": {"enabled": False}},
    "select": {"selectors": ["cas_signed", "random"], "r": [0.5], "cas_signed": {"floor": 0.1}},
    "evaluate": {"interventions": ["deactivate"]},
}


def _config() -> dict:
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    demo = yaml.safe_load((REPO / "config" / "demo-machinery.yaml").read_text())
    return _merge(_merge(base, demo), OVERLAY)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    d = tmp_path / "plugin"
    d.mkdir()
    (d / "ext_cas_signed.py").write_text(textwrap.dedent(PLUGIN))
    (d / "toy_plugin_adapter.py").write_text(textwrap.dedent(ADAPTER))
    marker = tmp_path / "adapter-imported"
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.setenv(registry.PLUGINS_ENV, "ext_cas_signed")
    monkeypatch.setenv("TOY_IMPORT_MARKER", str(marker))
    yield d, marker
    SELECTORS.unregister("cas_signed")
    ADAPTERS.unregister("toy_plugin")
    registry._plugins_loaded.discard("ext_cas_signed")
    sys.modules.pop("ext_cas_signed", None)


def test_unregistered_names_are_rejected_at_validation():
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    with pytest.raises(ConfigError, match=r"select\.selectors\.0"):
        validate_config(_merge(base, {"select": {"selectors": ["cas_signed"]}}))
    with pytest.raises(ConfigError, match=r"model\.adapter"):
        validate_config(_merge(base, {"model": {"adapter": "toy_plugin"}}))
    with pytest.raises(ConfigError, match=r"select\.mad\.signed"):  # the old key says where it went
        validate_config(_merge(base, {"select": {"mad_signed": True}}))
    cfg = validate_config(_merge(base, {"select": {"mad": {}}}))
    assert cfg["select"]["mad"] == {"signed": False}  # defaults from the selector's signature
    from dataclasses import replace

    noenv = replace(ADAPTERS["qwen2_5_omni"], name="noenv", env="models-none")
    with ADAPTERS.temporarily("noenv", noenv), pytest.raises(ConfigError, match=r"envs/models-none\.yaml is missing"):
        validate_config(_merge(base, {"model": {"adapter": "noenv"}}))


def test_plugin_selector_and_adapter_through_validation_dag_and_selection(plugin, tmp_path):
    plugin_dir, marker = plugin
    # 1. config validation: the registries' names (and the selector's parameters) are the schema's
    cfg = validate_config(_config())
    assert "cas_signed" in SELECTORS and "toy_plugin" in ADAPTERS
    assert cfg["select"]["cas_signed"] == {"floor": 0.1}
    for bad, key in (({"select": {"cas_signed": {"flor": 1}}}, "select.cas_signed"),
                     ({"select": {"cas_signed": {"floor": -1}}}, "select.cas_signed.floor"),
                     ({"hook_site": "gated_product"}, "hook_site"),  # not among the toy's declared sites
                     ({"component": "talker"}, "component"),
                     ({"tasks": {"evc": {"enabled": True}}}, "tasks.evc")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            validate_config(_merge(_config(), bad))
    assert not marker.exists(), "validation imported the adapter module"

    # 2. the DAG: a dry run in a fresh process that finds both through EMOTION_NEURONS_PLUGINS
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(OVERLAY))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(REPO / "tests"), str(REPO / "src")])}
    cmd = [str(bin_dir / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(wd), "-n", "-p",
           "--configfile", str(REPO / "config" / "demo-machinery.yaml"), str(tmp_path / "over.yaml")]
    res = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    # masks live in the folder of their identification setting (`c<c>-filtered` / `c<c>-unfiltered`)
    assert re.search(r"masks/c\d+-(un)?filtered/cas_signed-r0\.5\.safetensors", out)
    assert re.search(r"masks/c\d+-(un)?filtered/random-cas_signed-r0\.5-s1\.safetensors", out)  # its controls
    assert re.search(r'"condition":"c\d+-(un)?filtered-cas_signed-r0\.5-deactivate"', out)  # a grouped condition
    assert re.search(r"cache/stage1/ser-toy_plugin-[0-9a-f]+/", out)
    prep = re.search(r"emotion_neurons\.stages\.prepare --params '(\{.*?\})'", out)
    assert json.loads(prep.group(1))["max_audio_seconds"] == 12.0  # from the declaration
    assert not marker.exists(), "the Snakefile imported the adapter module at parse time"
    sel = re.search(r"emotion_neurons\.stages\.select --params '(\{.*?\})' --aggregate", out)
    params = json.loads(sel.group(1))
    assert params["selector"] == "cas_signed" and params["params"] == {"floor": 0.1}

    # 3. selection with the DAG's params: hand-computed mask of a 2-emotion, 4-neuron P
    import zarr

    from emotion_neurons.stages.select import main

    P = np.array([[[0.9, 0.5, 0.2, 0.1]], [[0.1, 0.45, 0.6, 0.1]]], dtype=np.float32)
    # signed contrasts: e0 [0.8, 0.05, -0.4, 0], e1 [-0.8, -0.05, 0.4, 0]; budget 2 of 4, floor 0.1
    agg = tmp_path / "aggregate.zarr"
    g = zarr.open_group(agg, mode="w", zarr_format=3)
    for name, arr in (("K", (P * 100).astype(np.int64)), ("P", P)):
        g.create_array(name, shape=arr.shape, dtype=arr.dtype)[:] = arr
    g.create_array("T", shape=(2,), dtype=np.int64)[:] = 100
    g.attrs.update({"emotions": ["angry", "happy"], "task": "ser"})
    mask_file = tmp_path / "cas_signed-r0.5.safetensors"
    assert main(["--params", sel.group(1), "--aggregate", str(agg), "--out", str(mask_file)]) == 0
    mask, meta = load_mask(mask_file)
    assert mask[:, 0].tolist() == [[True, False, False, False], [False, False, True, False]]
    assert meta["selector"] == "cas_signed" and meta["cas_signed"] == {"floor": 0.1}
    # the default floor 0 would also take e0's neuron 1: the config's parameter reached the selector
    params["params"] = {}
    main(["--params", json.dumps(params), "--aggregate", str(agg), "--out", str(mask_file)])
    assert load_mask(mask_file)[0][0, 0].tolist() == [True, True, False, False]


def test_mask_export_reads_with_json_alone_and_matches_the_mask(tmp_path):
    """A TransformerLens / nnsight user reads neuron ids per emotion and layer without this package."""
    from emotion_neurons.selectors import export_path, save_mask

    rng = np.random.default_rng(0)
    mask = rng.random((3, 4, 50)) < 0.1
    target = tmp_path / "lap-r0.1.safetensors"
    save_mask(target, mask, ["angry", "happy", "sad"],
              {"selector": "lap", "r": 0.1, "hook_site": "gated_product", "component": "thinker", "model_id": "m"})
    assert export_path(target) == tmp_path / "lap-r0.1.neurons.json"
    code = textwrap.dedent("""
        import json, sys
        d = json.load(open(sys.argv[1]))
        print(json.dumps({"ids": d["neurons"], "tl": d["hook_site_aliases"]["transformer_lens"],
                          "shape": [len(d["emotions"]), d["n_layers"], d["n_neurons"]]}))
    """)
    # a bare interpreter: no site packages, no numpy, no emotion_neurons on the path
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(export_path(target))],
                         capture_output=True, text=True, check=True, env={})
    got = json.loads(res.stdout)
    assert got["shape"] == [3, 4, 50] and got["tl"] == "blocks.{layer}.mlp.hook_post"
    for i, e in enumerate(["angry", "happy", "sad"]):
        for layer in range(4):
            assert got["ids"][e][layer] == np.flatnonzero(mask[i, layer]).tolist(), (e, layer)
    # the provenance sidecar names the site in TransformerLens's vocabulary too
    assert load_mask(target)[1]["hook_site_aliases"] == {"module": "down_proj.input",
                                                         "transformer_lens": "blocks.{layer}.mlp.hook_post"}


def test_judge_stage_dispatches_through_the_judge_registry(tmp_path):
    import pandas as pd

    from emotion_neurons.io import write_table
    from emotion_neurons.judges import JUDGES
    from emotion_neurons.stages.judge import EvcJudge, SerJudge, judge_table

    assert JUDGES["evc"] is EvcJudge and JUDGES["ser"] is SerJudge

    class LengthJudge:
        def __init__(self, cfg, labels):
            self.cfg = cfg

        def __call__(self, outputs, base_dir):
            return outputs.assign(n_chars=outputs["output_text"].str.len(), where=str(base_dir))

    outputs = tmp_path / "shard" / "outputs.tsv"
    outputs.parent.mkdir()
    write_table(outputs, pd.DataFrame({"id": ["a", "b"], "status": ["ok", "ok"], "output_text": ["hi", "hello"]}))
    with JUDGES.temporarily("lengths", LengthJudge):
        got = judge_table("lengths", outputs, {}, [])
    assert got["n_chars"].tolist() == [2, 5] and set(got["where"]) == {str(outputs.parent)}
