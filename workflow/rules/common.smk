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
# content-keyed per-condition results of the grouped evaluate and judge jobs (emotion_neurons.group)
EVAL_CACHE = "results/cache/eval"
JUDGED_CACHE = "results/cache/judged"
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
# identification settings (filter.c x filter.enabled): stages 2-3 and the masks run once per setting, all from
# the same stage-1 statistics; the first setting is the primary one (the report's main sections)
IDENTS = {i["ident"]: i for i in _cond.idents(config["filter"])}
PRIMARY = next(iter(IDENTS))
# environment of the model family (used by the GPU rules' conda: directive)
MODEL_ENV = f"../../envs/{_adapter_entry(config['model']['adapter']).env}.yaml"


wildcard_constraints:
    task="|".join(TASKS) or "none",
    shard=r"\d+",
    n=r"\d+",
    key="|".join(KEYS.values()) or "none",
    mask=SELECTOR_MASK,
    ident="|".join(IDENTS),
    condition=r"[A-Za-z0-9_.-]+",
    group=r"\d+",


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


TRANSFER = (config.get("transfer") or {}).get("tasks", False) and {"evc", "ser"} <= set(
    TASKS
)
if TRANSFER:
    _missing = sorted(set(emotions("evc")) - set(emotions("ser")))
    if _missing:
        raise ValueError(
            f"transfer.tasks: SER masks steer EVC, but target emotion(s) {_missing} of tasks.evc.target_emotions "
            "are not among tasks.ser.labels (no SER mask to steer them with)"
        )


@functools.cache
def _grid(task):
    """The task's conditions; a mask is named by its path under the run folder (`<task>/masks/<setting>/..`),
    so cross-task transfer conditions (transfer.tasks) can take the other task's masks.
    """
    own = [
        {
            **c,
            "mask": f"{task}/masks/{c['mask']}" if c["mask"] else "",
            "source_task": task if c["mask"] else "",
        }
        for c in _cond.full_grid(
            config["select"], config["evaluate"], config["filter"], task
        )
    ]
    out = own
    if TRANSFER:
        other = "ser" if task == "evc" else "evc"
        out = own + _cond.transfer_grid(
            config["select"], config["evaluate"], config["filter"], other, task
        )
    # `mix` reads its temperature; only its conditions carry it, so changing it re-runs only them
    tau = float(config["evaluate"].get("mix_temperature", 1.0))
    return [
        {**c, "mix_temperature": tau} if c["intervention"] == "mix" else c for c in out
    ]


@functools.cache
def _grid_by_id(task):
    return {c["condition"]: c for c in _grid(task)}


def metric_idents(task):
    """The settings whose metrics are computed for `task`: its own, then the cross-task transfer one."""
    out = list(IDENTS.values())
    if TRANSFER:
        other = "ser" if task == "evc" else "evc"
        src = IDENTS[PRIMARY]
        out.append({**src, "ident": f"from-{other}-{PRIMARY}", "source_task": other})
    return out


def ident_filter(ident):
    """The scalar filter settings of one identification setting."""
    return _cond.ident_filter(config["filter"], IDENTS[ident])


def ident_conditions(task, ident):
    """The baseline and the conditions of one identification setting (the input of its metrics)."""
    return [c for c in conditions(task) if c["ident"] in ("", ident)]


def mask_spec(name):
    """The mask entry of the grid named `name` (its selector, r, seed and, for random, the mask it controls)."""
    m = _masks_by_name().get(name)
    if m is None:
        raise ValueError(
            f"mask {name!r} is not in the grid of select.selectors x select.r"
        )
    return {k: v for k, v in m.items() if k != "source_mask"}


def stage_codes():
    """Code version of every stage that feeds the report (all but the report itself and the cache's garbage
    collector), derived from stages/."""
    adapter = config["model"]["adapter"]
    return {
        s: code_version(s, adapter)
        for s in _stages()
        if s not in ("report", "cache_gc")
    }


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


def n_groups():
    return int(config["evaluate"].get("groups", 8))


@functools.cache
def _groups(task):
    return _cond.groups(conditions(task), n_groups())


def eval_groups(task):
    """The groups of `task` that hold at least one condition."""
    return list(_groups(task))


def group_conditions(task, g):
    try:
        return _groups(task)[int(g)]
    except KeyError:
        raise ValueError(
            f"task {task}: evaluation group {g} holds no condition"
        ) from None


def eval_inputs(wc):
    conds = group_conditions(wc.task, wc.group)
    return {
        "manifest": f"{stage1_dir(wc.task)}/instances.jsonl",
        "masks": sorted({f"{RUN}/{c['mask']}.safetensors" for c in conds if c["mask"]}),
        # erase reads M of its identification setting's stage-3 aggregate
        "aggregates": sorted(
            {
                f"{RUN}/{c['source_task']}/aggregate/{c['ident']}.zarr"
                for c in conds
                if _iv.INTERVENTIONS[c["intervention"]].needs_means
            }
        ),
    }


def _eval_common(task):
    return {
        "task": task,
        "model": model_params(),
        "task_cfg": {k: v for k, v in config["tasks"][task].items() if k != "spans"},
        "data": config["data"],
        "eval": {
            k: config["evaluate"].get(k)
            for k in ("positions", "max_instances_per_shard", "sample_seed")
        },
        "component": config["component"],
        "hook_site": config["hook_site"],
        "code": code_version("evaluate", config["model"]["adapter"]),
        # the per-condition cache key: the code without the grouping plumbing (config.RESULT_NEUTRAL_MODULES)
        "result_code": code_version(
            "evaluate", config["model"]["adapter"], results_only=True
        ),
    }


PARAMS_CACHE = "results/cache/params"
INLINE_PARAMS_MAX = 32_000


def big_params(text):
    """`text` itself, or for a long one `@<file>` of it, content-addressed: a shell command line (one argument
    of at most 128 KiB on Linux) cannot carry the params of a group of hundreds of conditions. The file name
    is the content hash, so a changed group still changes its params (and re-runs); written at DAG build.
    """
    if len(text) <= INLINE_PARAMS_MAX:
        return text
    import hashlib

    from emotion_neurons.io import write_text

    path = Path(PARAMS_CACHE) / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    if not path.exists():
        write_text(path, text)
    return f"@{path}"


def eval_params(wc):
    return big_params(_eval_params(wc.task, int(wc.group)))


@functools.cache
def _eval_params(task, g):
    """A group's params: what its conditions share, then each condition (the per-condition cache key is
    `common` + the condition, so regrouping never invalidates a computed condition)."""
    return dumps(
        {
            "common": _eval_common(task),
            "conditions": group_conditions(task, g),
        }
    )


@functools.cache
def _judge_group_params(task, g):
    common = _judge.params(config, task, None)
    del common["condition"]
    common["result_code"] = code_version("judge", results_only=True)
    return dumps(
        {
            "common": common,
            "conditions": [
                {k: v for k, v in c.items() if k != "mask"}
                for c in group_conditions(task, g)
            ],
        }
    )


def judged_dirs(task):
    return [
        f"{RUN}/{task}/eval/group-{g}/judged-{i}"
        for g in eval_groups(task)
        for i in range(n_eval_shards())
    ]


def judged_files(task, ident=None):
    """Every condition's judged table (of one identification setting and the baseline, with `ident`), inside
    the judged directories of its group."""
    return [
        f"{RUN}/{task}/eval/group-{g}/judged-{i}/{c['condition']}.tsv"
        for g, conds in _groups(task).items()
        for i in range(n_eval_shards())
        for c in conds
        if ident is None or c["ident"] in ("", ident)
    ]


def ident_judged_dirs(task, ident):
    return sorted({str(Path(f).parent) for f in judged_files(task, ident)})


# cache hygiene (the cache_gc target, emotion_neurons.cache) - what the outputs and jobs of this config use
def _gc_spec():
    live = [
        f"{RUN}/{t}/eval/group-{g}/{kind}-{i}"
        for t in TASKS
        for g in eval_groups(t)
        for i in range(n_eval_shards())
        for kind in ("shard", "judged")
    ]
    used = [
        big_params(text)
        for t in TASKS
        for g in eval_groups(t)
        for text in (_eval_params(t, g), _judge_group_params(t, g))
    ]
    return {
        "caches": [EVAL_CACHE, JUDGED_CACHE],
        "live": live,
        "params_dir": PARAMS_CACHE,
        "keep_params": [p[1:] for p in used if p.startswith("@")],
        "stage1_dir": CACHE,
        "keep_stage1": [stage1_dir(t) for t in TASKS],
    }
