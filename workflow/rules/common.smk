import functools
import json
import os
import re
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
# cross-dataset transfer (transfer.datasets, METHOD.md 3.5): each enabled task also runs on every other dataset a
# pair names, as a unit `<task>.<dataset>` with its own run folder and stage-1 key: stage 0 always (its evaluation
# manifest), stages 1-3 and the masks only when the dataset is a pair's source
DATASET_PAIRS = _cond.dataset_pairs(config.get("transfer"), config["datasets"])
UNITS = {t: (t, config["tasks"][t]["dataset"]) for t in TASKS}
for _t in TASKS:
    for _ds in dict.fromkeys(d for pair in DATASET_PAIRS for d in pair):
        if _ds != UNITS[_t][1]:
            UNITS[f"{_t}.{_ds}"] = (_t, _ds)


def utask(unit):
    """The task (evc, ser) a unit runs; a task is its own unit on its configured dataset."""
    return UNITS[unit][0]


def unit_of(task, dataset):
    """The unit that runs `task` on `dataset`."""
    return task if dataset == UNITS[task][1] else f"{task}.{dataset}"


@functools.cache
def ucfg(unit):
    """The config a unit's stages read: the config itself for a task, else with the task's dataset swapped."""
    task, ds = UNITS[unit]
    if unit == task:
        return config
    return {**config, "tasks": {**config["tasks"], task: {**config["tasks"][task], "dataset": ds}}}


KEYS = {u: stage1_key(ucfg(u), utask(u)) for u in UNITS}
KEY2TASK = {k: t for t, k in KEYS.items()}
# identification settings (filter.c x filter.enabled): stages 2-3 and the masks run once per setting, all from
# the same stage-1 statistics; the first setting is the primary one (the report's main sections)
IDENTS = {i["ident"]: i for i in _cond.idents(config["filter"])}
PRIMARY = next(iter(IDENTS))
# environment of the model family (used by the GPU rules' conda: directive)
MODEL_ENV = f"../../envs/{_adapter_entry(config['model']['adapter']).env}.yaml"


wildcard_constraints:
    task="|".join(re.escape(u) for u in UNITS) or "none",
    shard=r"\d+",
    n=r"\d+",
    key="|".join(KEYS.values()) or "none",
    mask=SELECTOR_MASK,
    ident="|".join(IDENTS),
    condition=r"[A-Za-z0-9_.-]+",
    group=r"\d+",


def emotions(task):
    tcfg = config["tasks"][utask(task)]
    return tcfg["target_emotions"] if utask(task) == "evc" else tcfg["labels"]


def n_shards(task):
    return int(config["tasks"][utask(task)].get("shards", 1))


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


def _dataset_conditions(unit):
    """The cross-dataset transfer conditions a unit evaluates: the masks of each pair's source that targets the
    unit's dataset (a pair of the task's own dataset with itself is its own grid)."""
    task, ds = UNITS[unit]
    out = []
    for src, tgt in DATASET_PAIRS:
        if tgt == ds and not (src == tgt and unit == task):
            out += _cond.dataset_transfer_grid(
                config["select"], config["evaluate"], config["filter"], task, src, unit_of(task, src)
            )
    return out


@functools.cache
def _grid(task):
    """The unit's conditions; a mask is named by its path under the run folder (`<unit>/masks/<setting>/..`),
    so cross-task (transfer.tasks) and cross-dataset (transfer.datasets) conditions can take other masks.
    A `<task>.<dataset>` unit evaluates the baseline and its transfer conditions only.
    """
    if task not in TASKS:
        base = {**_cond.full_grid(config["select"], config["evaluate"], config["filter"], utask(task))[0],
                "source_task": ""}
        return _with_mix_temperature([base, *_dataset_conditions(task)])
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
    return _with_mix_temperature(out + _dataset_conditions(task))


def _with_mix_temperature(out):
    # `mix` reads its temperature; only its conditions carry it, so changing it re-runs only them
    tau = float(config["evaluate"].get("mix_temperature", 1.0))
    return [
        {**c, "mix_temperature": tau} if c["intervention"] == "mix" else c for c in out
    ]


@functools.cache
def _grid_by_id(task):
    return {c["condition"]: c for c in _grid(task)}


def dataset_idents(unit):
    """The cross-dataset settings evaluated on `unit`, one per pair source (`data-<source>-<primary>`)."""
    return [
        {**IDENTS[PRIMARY], "ident": c["ident"], "source_dataset": c["source_dataset"]}
        for c in {c["ident"]: c for c in _dataset_conditions(unit)}.values()
    ]


def metric_idents(task):
    """The settings whose metrics are computed for `task`: its own, the cross-task transfer one, then the
    cross-dataset ones; a `<task>.<dataset>` unit has the cross-dataset ones only."""
    if task not in TASKS:
        return dataset_idents(task)
    out = list(IDENTS.values())
    if TRANSFER:
        other = "ser" if task == "evc" else "evc"
        src = IDENTS[PRIMARY]
        out.append({**src, "ident": f"from-{other}-{PRIMARY}", "source_task": other})
    return out + dataset_idents(task)


def dataset_transfer_spec(task):
    """What the sweep of `task` needs for metrics/dataset_transfer.tsv: per pair (and the task's own dataset
    with itself), the metrics folder of its setting (the task's own primary one for its dataset with itself),
    and the selector masks (primary setting) of every dataset the task identifies on (its own and each pair's
    source), for the mask overlap."""
    pairs = []
    own = UNITS[task][1]
    # the task's own dataset with itself (its in-dataset numbers, no extra job) is the matrix's diagonal
    for src, tgt in dict.fromkeys([*DATASET_PAIRS, (own, own)]):
        unit = unit_of(task, tgt)
        ident = PRIMARY if src == tgt and unit == task else _cond.dataset_ident(src, PRIMARY)
        pairs.append({"source": src, "target": tgt, "dir": f"{RUN}/{unit}/metrics-by-ident/{ident}"})
    identified = dict.fromkeys([UNITS[task][1], *(s for s, _ in DATASET_PAIRS)])
    masks = {
        ds: {
            m["mask"]: f"{RUN}/{unit_of(task, ds)}/masks/{PRIMARY}/{m['mask']}.safetensors"
            for m in _cond.masks(config["select"])
            if m["selector"] != "random"
        }
        for ds in identified
    }
    return {"ident": PRIMARY, "pairs": pairs, "masks": masks}


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
    return list(config["tasks"][utask(task)]["spans"])


@functools.cache
def stage1_params(task):
    ident = stage1_identity(ucfg(task), utask(task))
    return dumps({**ident, "model": model_params()})


def judge_params(task, cond=None):
    # EVC labels = every emotion of the dataset, source included (METHOD.md 3.2), not emotions(task)
    return _judge_params(task, dumps(cond))


@functools.cache
def _judge_params(task, cond_json):
    return dumps(_judge.params(ucfg(task), utask(task), json.loads(cond_json)))


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


def aggregate_of(c):
    """The stage-3 aggregate (under the run folder) whose M a condition's intervention reads: its own
    `aggregate` (a cross-dataset condition), else its source task's of its identification setting."""
    return c.get("aggregate") or f"{c['source_task']}/aggregate/{c['ident']}"


def eval_inputs(wc):
    conds = group_conditions(wc.task, wc.group)
    return {
        "manifest": f"{stage1_dir(wc.task)}/instances.jsonl",
        "masks": sorted({f"{RUN}/{c['mask']}.safetensors" for c in conds if c["mask"]}),
        # erase reads M of its identification setting's stage-3 aggregate
        "aggregates": sorted(
            {
                f"{RUN}/{aggregate_of(c)}.zarr"
                for c in conds
                if _iv.INTERVENTIONS[c["intervention"]].needs_means
            }
        ),
    }


def _eval_common(task):
    return {
        "task": utask(task),
        "model": model_params(),
        "task_cfg": {k: v for k, v in ucfg(task)["tasks"][utask(task)].items() if k != "spans"},
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
    common = _judge.params(ucfg(task), utask(task), None)
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
        for t in UNITS
        for g in eval_groups(t)
        for i in range(n_eval_shards())
        for kind in ("shard", "judged")
    ]
    used = [
        big_params(text)
        for t in UNITS
        for g in eval_groups(t)
        for text in (_eval_params(t, g), _judge_group_params(t, g))
    ]
    return {
        "caches": [EVAL_CACHE, JUDGED_CACHE],
        "live": live,
        "params_dir": PARAMS_CACHE,
        "keep_params": [p[1:] for p in used if p.startswith("@")],
        "stage1_dir": CACHE,
        "keep_stage1": [stage1_dir(t) for t in UNITS],
    }


def sweep_inputs(wc):
    """The sweep's metrics folders (`idents`, in metric_idents order) and, with transfer.datasets, the pairs'
    metrics folders and the masks whose overlap it computes."""
    out = {
        "idents": [
            f"{RUN}/{wc.task}/metrics-by-ident/{i['ident']}"
            for i in metric_idents(wc.task)
        ]
    }
    if DATASET_PAIRS:  # metrics/dataset_transfer.tsv: each pair's metrics and the masks compared
        spec = dataset_transfer_spec(wc.task)
        out["transfer"] = sorted({p["dir"] for p in spec["pairs"]})
        out["masks"] = sorted({f for ms in spec["masks"].values() for f in ms.values()})
    return out


def sweep_params(wc):
    """The sweep's params; `datasets` only with transfer.datasets, so runs without pairs keep theirs."""
    p = {
        "task": utask(wc.task),
        "idents": metric_idents(wc.task),
        "code": code_version("sweep"),
    }
    if DATASET_PAIRS:
        p["datasets"] = dataset_transfer_spec(wc.task)
    return dumps(p)
