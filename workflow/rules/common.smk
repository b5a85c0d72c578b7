import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from emotion_neurons import conditions as _cond  # noqa: E402
from emotion_neurons import interventions as _iv  # noqa: E402
from emotion_neurons.stages import judge as _judge  # noqa: E402
from emotion_neurons.models import entry as _adapter_entry  # noqa: E402
from emotion_neurons.retry import SHELL_GUARD, SHELL_RECORD  # noqa: E402
from emotion_neurons.schema import validate_config  # noqa: E402
from emotion_neurons.selectors import SELECTORS  # noqa: E402
from emotion_neurons.config import (  # noqa: E402
    adapter_input_window,
    check_run_name,
    code_version,
    dumps,
    stage1_identity,
    stage1_key,
    stage1_task_cfg,
    stages as _stages,
    task_dataset,
)

if "spans" in (config.get("aggregate") or {}):
    raise ValueError(
        "config key aggregate.spans was replaced by per-task keys tasks.evc.spans (default [text, generated]) "
        "and tasks.ser.spans (default [audio, text, generated]); move the setting there"
    )
if config.get("aggregate") == {}:  # an empty leftover section of older configs
    del config["aggregate"]
# the schema's name lists (selectors, adapters, components, hook sites) come from the registries
validate_config(
    config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
)
_iv.check_config(config["evaluate"], config["capture"])

RUN = f"results/{check_run_name(config['run_name'])}"
# mask file names: a selector's `<selector>-r<r>`, a random control's `random-<selector>-r<r>-s<seed>`;
# the selector names come from the registry (a name may hold `_`, never the `-` between fields)
SELECTOR_MASK = rf"(?:{SELECTORS.pattern()})-r[0-9.e-]+"

CACHE = "results/cache/stage1"
# rules run `python -m emotion_neurons.stages.<stage>` from this checkout (also inside cluster jobs, which re-read
# this file), so an edit to the package is what runs without reinstalling
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        p
        for p in (str(Path(workflow.basedir) / "src"), os.environ.get("PYTHONPATH", ""))
        if p
    )
)
TASKS = [t for t, c in config["tasks"].items() if c.get("enabled", True)]
for _t in TASKS:
    task_dataset(config, _t)
KEYS = {t: stage1_key(config, t) for t in TASKS}
KEY2TASK = {k: t for t, k in KEYS.items()}
# environment of the model family (used by the GPU rules' conda: directive)
MODEL_ENV = f"../../envs/{_adapter_entry(config['model']['adapter']).env}.yaml"


wildcard_constraints:
    task="|".join(TASKS) or "none",
    shard=r"\d+",
    n=r"\d+",
    key="|".join(KEYS.values()) or "none",
    mask=SELECTOR_MASK,
    condition=r"[A-Za-z0-9_.-]+",


def emotions(task):
    tcfg = config["tasks"][task]
    return tcfg["target_emotions"] if task == "evc" else tcfg["labels"]


def n_shards(task):
    return int(config["tasks"][task].get("shards", 1))


def n_eval_shards():
    return int(config["evaluate"].get("shards", 1))


def stage1_dir(task):
    return f"{CACHE}/{KEYS[task]}"


def shard_dirs(task):
    n = n_shards(task)
    return [f"{stage1_dir(task)}/shard-{i}-of-{n}" for i in range(n)]


# The config is fixed for the life of this process, so the grid, its lookups and every job's params are built
# once: rebuilding the grid per job made dry runs of paper sweeps quadratic in the number of conditions.
@functools.cache
def _masks_by_name():
    return {m["mask"]: m for m in _cond.masks(config["select"])}


@functools.cache
def _grid(task):
    return _cond.grid(config["select"], config["evaluate"], task)


@functools.cache
def _grid_by_id(task):
    return _cond.by_id(config["select"], config["evaluate"], task)


def mask_spec(name):
    """The mask entry of the grid named `name` (its selector, r, seed and, for random, the mask it controls)."""
    m = _masks_by_name().get(name)
    if m is None:
        raise ValueError(
            f"mask {name!r} is not in the grid of select.selectors x select.r"
        )
    return {k: v for k, v in m.items() if k != "source_mask"}


def stage_codes():
    """Code version of every stage that feeds the report (all but the report itself), derived from stages/."""
    adapter = config["model"]["adapter"]
    return {s: code_version(s, adapter) for s in _stages() if s != "report"}


def select_params(name):
    """A selector mask job's params: its grid entry, scope and the selector's own section `select.<selector>`."""
    spec = mask_spec(name)
    return {
        **spec,
        "scope": config["select"].get("scope"),
        "params": config["select"].get(spec["selector"], {}),
    }


def conditions(task):
    return _grid(task)


def condition(task, cid):
    return _grid_by_id(task)[cid]


def model_params():
    """All model settings, batch size included (outputs depend on it; see config.STAGE1_MODEL_KEYS)."""
    return dict(config["model"])


def task_spans(task):
    return list(config["tasks"][task]["spans"])


@functools.cache
def stage1_params(task):
    ident = stage1_identity(config, task)
    return dumps({**ident, "model": model_params()})


def judge_params(task, cond=None):
    # EVC labels = every emotion of the dataset, source included (METHOD.md 3.2), not emotions(task)
    return _judge_params(task, dumps(cond))


@functools.cache
def _judge_params(task, cond_json):
    return dumps(_judge.params(config, task, json.loads(cond_json)))


def attempt(wildcards, attempt):
    """The job's attempt number as a resource, for SHELL_GUARD (params would re-run jobs when it changes)."""
    return attempt


def prepared_tables(task):
    """Stage 0's tables of skipped audio and warnings for `task`."""
    return [f"{stage1_dir(task)}/bad_audio.tsv", f"{stage1_dir(task)}/warnings.tsv"]


def guarded(cmd):
    """A GPU rule's shell: the retry guard first, the command, then the copy of a failed attempt's log."""
    return "".join((SHELL_GUARD, cmd, SHELL_RECORD))


def mem_mb(base):
    """Attempt-scaled memory: an OOM-killed job is retried with more."""

    def f(wildcards, attempt):
        return base * attempt

    return f


def eval_inputs(wc):
    cond = condition(wc.task, wc.condition)
    inputs = {"manifest": f"{stage1_dir(wc.task)}/instances.jsonl"}
    if cond["mask"]:
        inputs["mask"] = f"{RUN}/{wc.task}/masks/{cond['mask']}.safetensors"
    if _iv.INTERVENTIONS[cond["intervention"]].needs_means:  # erase: M of stage 3
        inputs["aggregate"] = f"{RUN}/{wc.task}/aggregate.zarr"
    return inputs


def eval_params(wc):
    return _eval_params(wc.task, wc.condition)


@functools.cache
def _eval_params(task, cid):
    return dumps(
        {
            "task": task,
            "condition": condition(task, cid),
            "model": model_params(),
            "task_cfg": {
                k: v for k, v in config["tasks"][task].items() if k != "spans"
            },
            "data": config["data"],
            "eval": {
                k: config["evaluate"].get(k)
                for k in ("positions", "max_instances_per_shard", "sample_seed")
            }
            | (
                {"mix_temperature": config["evaluate"].get("mix_temperature", 1.0)}
                if condition(task, cid)["intervention"] == "mix"
                else {}
            ),
            "component": config["component"],
            "hook_site": config["hook_site"],
            "code": code_version("evaluate", config["model"]["adapter"]),
        }
    )
