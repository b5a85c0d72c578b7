"""Snakemake: schema validation, one end-to-end run of the demo, and dry-run proofs of incremental reruns."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(
    workdir: Path, *args: str, check: bool = True, repo: Path = REPO
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "snakemake"), "-s", str(repo / "Snakefile"), "--directory", str(workdir), *args]
    res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=3000)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}")
    return res


def planned(workdir: Path, *overlays: dict, repo: Path = REPO) -> dict[str, int]:
    """Rules (and job counts) a dry run would execute with the demo config plus `overlays`."""
    files = ["--configfile", str(REPO / "config" / "demo-machinery.yaml")]
    for i, o in enumerate(overlays):
        p = workdir / f"overlay{i}.yaml"
        p.write_text(yaml.safe_dump(o))
        files.append(str(p))
    out = snakemake(workdir, "-n", "--quiet", "rules", *files, repo=repo).stdout
    counts = {}
    for line in out.splitlines():
        m = re.match(r"^([a-z_]+)\s+(\d+)$", line.strip())
        if m and m.group(1) not in ("total", "job"):
            counts[m.group(1)] = int(m.group(2))
    return counts


def demo_config(*overlays: dict) -> dict:
    """config.yaml, then config/demo-machinery.yaml, then `overlays`, merged as Snakemake merges config files."""

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    for o in (yaml.safe_load((REPO / "config" / "demo-machinery.yaml").read_text()), *overlays):
        cfg = merge(cfg, o)
    return cfg


def eval_groups(cfg: dict) -> dict[int, list[str]]:
    """Evaluation group -> its condition ids, as the workflow forms them."""
    from emotion_neurons import conditions

    grid = conditions.full_grid(cfg["select"], cfg["evaluate"], cfg["filter"])
    return {g: [c["condition"] for c in cs] for g, cs in conditions.groups(grid, cfg["evaluate"]["groups"]).items()}


def changed_groups(*overlays: dict) -> int:
    """How many groups per shard and task gain or lose a condition when `overlays` go onto the demo config."""
    old, new = eval_groups(demo_config()), eval_groups(demo_config(*overlays))
    return sum(old.get(g) != new.get(g) for g in set(old) | set(new))


def make_workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").symlink_to(REPO / "config.yaml")
    (path / ".tiny").symlink_to(REPO / ".tiny", target_is_directory=True)
    return path


def test_bad_config_names_the_key(tmp_path):
    wd = make_workdir(tmp_path / "wd")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"filter": {"c": 50, "wer_maximum": 0.2}}))
    res = snakemake(wd, "-n", "--configfile", str(bad), check=False)
    assert res.returncode != 0 and "wer_maximum" in res.stderr + res.stdout
    bad.write_text(yaml.safe_dump({"select": {"selectors": ["cas", "bogus"], "r": [0.01]}}))
    res = snakemake(wd, "-n", "--configfile", str(bad), check=False)
    assert res.returncode != 0 and "bogus" in res.stderr + res.stdout


def test_dry_run_counts_of_a_c_and_filtering_sweep(tmp_path):
    """Each identification setting gets its own filter, aggregate, masks and metrics; evaluation stays one job
    per group and shard however many settings there are, from the same stage-1 jobs."""
    from emotion_neurons.tiny.__main__ import build_all

    build_all(REPO / ".tiny", seeds=())  # the machinery runs need no trained miniature
    wd = make_workdir(tmp_path / "wd")
    sweep = {"filter": {"c": [3, 2], "enabled": [False, True]}}
    jobs = planned(wd, sweep)
    assert jobs["prepare"] == 2 and jobs["generate"] == 4 and jobs["judge_ident"] == 4
    assert jobs["filter"] == jobs["aggregate"] == jobs["metrics_ident"] == 2 * 4
    assert jobs["select"] == 2 * 4 * 4 and jobs["random_control"] == 2 * 4 * 8
    assert jobs["evaluate"] == jobs["judge_eval"] == 2 * len(eval_groups(demo_config(sweep)))
    assert jobs["sweep"] == 2 and jobs["report"] == 1
    # one group of about 300 conditions: its params go through a content-addressed file, not the
    # command line (one shell argument holds at most 128 KiB)
    big = {**sweep, "evaluate": {"groups": 1, "alpha": [0.25, 0.5, 1.0, 1.5, 2.0]}}
    (wd / "big.yaml").write_text(yaml.safe_dump(big))
    out = snakemake(wd, "-n", "-p", "--configfile", str(REPO / "config" / "demo-machinery.yaml"), str(wd / "big.yaml")).stdout
    files = set(re.findall(r"emotion_neurons\.stages\.evaluate group --params '?@(results/cache/params/[0-9a-f]+\.json)", out))
    assert len(files) == 2  # one group per task
    import json

    n_conds = len(eval_groups(demo_config(big))[0])
    assert n_conds > 200 and all(len(json.loads((wd / f).read_text())["conditions"]) == n_conds for f in files)


def test_dry_run_of_cross_task_transfer(tmp_path):
    """transfer.tasks: each task evaluates the other's masks of the primary setting, with its own metrics;
    no new identification jobs; target emotions without a SER mask are refused at start-up."""
    from emotion_neurons.tiny.__main__ import build_all

    build_all(REPO / ".tiny", seeds=())  # the machinery runs need no trained miniature
    wd = make_workdir(tmp_path / "wd")
    base = planned(wd)
    jobs = planned(wd, {"transfer": {"tasks": True}})
    assert {k: v for k, v in jobs.items() if k not in ("metrics_ident", "evaluate", "judge_eval")} == {
        k: v for k, v in base.items() if k not in ("metrics_ident", "evaluate", "judge_eval")}
    assert jobs["metrics_ident"] == 2 * 2 and jobs["evaluate"] >= base["evaluate"]
    (wd / "tr.yaml").write_text(yaml.safe_dump({"transfer": {"tasks": True}}))
    out = snakemake(wd, "-n", "-p", "--configfile", str(REPO / "config" / "demo-machinery.yaml"), str(wd / "tr.yaml")).stdout
    assert "from-ser-c3-unfiltered-cas-r0.05-steer-a1" in out and "ser/masks/c3-unfiltered/cas-r0.05" in out
    assert "from-evc-c3-unfiltered-random-cas-r0.05-deactivate-s1" in out
    assert "from-evc-c3-unfiltered-cas-r0.05-steer" not in out  # EVC masks only deactivate SER
    (wd / "bad.yaml").write_text(yaml.safe_dump({"transfer": {"tasks": True},
                                                 "tasks": {"ser": {"labels": ["neutral", "angry", "happy", "sad"]}}}))
    res = snakemake(wd, "-n", "--configfile", str(REPO / "config" / "demo-machinery.yaml"), str(wd / "bad.yaml"), check=False)
    assert res.returncode != 0 and "surprise" in res.stdout + res.stderr and "tasks.ser.labels" in res.stdout + res.stderr


#: The transfer corpus at machinery size (demo.yaml names the full one), as an overlay of demo-machinery.yaml.
ESD_B = {"datasets": {"esd_b": {
    "format": "esd", "root": ".tiny/esd_b",
    "emotions": {"Neutral": "neutral", "Angry": "angry", "Happy": "happy", "Sad": "sad", "Surprise": "surprise"},
    "ident_speakers": ["0031", "0032", "0033"], "eval_speakers": ["0036", "0037"], "max_utterances_per_emotion": 4}}}
#: Rules that identify (stages 1-3 and the masks): a dataset that is only a transfer target needs none of them.
IDENT_RULES = ("generate", "judge_ident", "filter", "aggregate", "select", "random_control")


def test_dry_run_of_cross_dataset_transfer(tmp_path):
    """transfer.datasets: a pair adds only its jobs. A target-only dataset gets stage 0 (its evaluation
    manifest), the evaluation of the source's masks and one metrics job per task, no identification; making it
    a source too adds its stages 1-3 and masks and evaluates them on the task's own dataset."""
    from emotion_neurons.tiny.__main__ import build_all

    build_all(REPO / ".tiny", seeds=())  # the machinery runs need no trained miniature
    wd = make_workdir(tmp_path / "wd")
    base = planned(wd, ESD_B)
    one = planned(wd, ESD_B, {"transfer": {"datasets": [["esd", "esd_b"]]}})
    n_groups = target_groups()
    assert {k: one[k] for k in IDENT_RULES} == {k: base[k] for k in IDENT_RULES}
    assert one["prepare"] == base["prepare"] + 2  # esd_b's manifest, per task
    assert one["evaluate"] == one["judge_eval"] == base["evaluate"] + 2 * n_groups
    assert one["metrics_ident"] == base["metrics_ident"] + 2 and one["sweep"] == base["sweep"] == 2
    out = snakemake(wd, "-n", "-p", "--configfile", str(REPO / "config" / "demo-machinery.yaml"),
                    *_overlays(wd, ESD_B, {"transfer": {"datasets": [["esd", "esd_b"]]}})).stdout
    assert "results/demo/ser.esd_b/metrics-by-ident/data-esd-c3-unfiltered" in out
    assert "data-esd-c3-unfiltered-cas-r0.05-deactivate" in out and "ser/masks/c3-unfiltered/cas-r0.05" in out
    assert "ser.esd_b/masks" not in out  # esd_b is not identified
    # the reverse pair as well: esd_b is identified (stages 1-3, masks), its masks evaluated on esd
    two = planned(wd, ESD_B, {"transfer": {"datasets": [["esd", "esd_b"], ["esd_b", "esd"]]}})
    assert two["prepare"] == one["prepare"]
    for rule in IDENT_RULES:
        assert two[rule] == 2 * base[rule], rule  # the same identification jobs again, on esd_b
    assert two["metrics_ident"] == one["metrics_ident"] + 2 and two["sweep"] == 2 and two["report"] == 1
    out = snakemake(wd, "-n", "-p", "--configfile", str(REPO / "config" / "demo-machinery.yaml"),
                    *_overlays(wd, ESD_B, {"transfer": {"datasets": [["esd", "esd_b"], ["esd_b", "esd"]]}})).stdout
    assert "ser.esd_b/masks/c3-unfiltered/cas-r0.05" in out and "results/demo/ser/metrics-by-ident/data-esd_b-c3-unfiltered" in out
    # names are checked against datasets: with the key named
    res = snakemake(wd, "-n", "--configfile", str(REPO / "config" / "demo-machinery.yaml"),
                    *_overlays(wd, ESD_B, {"transfer": {"datasets": [["esd", "esd_c"]]}}), check=False)
    assert res.returncode != 0 and "transfer.datasets[0]" in res.stdout + res.stderr and "esd_c" in res.stdout + res.stderr


def target_groups() -> int:
    """Evaluation groups per task of a target-only transfer dataset: its baseline and esd's masks."""
    from emotion_neurons import conditions

    cfg = demo_config(ESD_B)
    xfer = [conditions.grid(cfg["select"], cfg["evaluate"])[0]] + conditions.dataset_transfer_grid(
        cfg["select"], cfg["evaluate"], cfg["filter"], "ser", "esd", "ser")
    return len(conditions.groups(xfer, cfg["evaluate"]["groups"]))


def _overlays(wd: Path, *overlays: dict) -> list[str]:
    files = []
    for i, o in enumerate(overlays):
        f = wd / f"extra{i}.yaml"
        f.write_text(yaml.safe_dump(o))
        files.append(str(f))
    return files


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from emotion_neurons.tiny.__main__ import build_all

    build_all(REPO / ".tiny", seeds=())  # the machinery runs need no trained miniature
    wd = make_workdir(tmp_path_factory.mktemp("demo"))
    snakemake(wd, "--cores", "2", "--configfile", str(REPO / "config" / "demo-machinery.yaml"))
    return wd


@pytest.mark.slow
def test_demo_end_to_end(demo_run):
    run = demo_run / "results" / "demo"
    html = (run / "report.html").read_text()
    assert "Selector comparison" in html and html.count("data:image/png;base64") >= 2
    for task in ("evc", "ser"):
        kept = pd.read_csv(run / task / "filter" / "c3-unfiltered" / "kept.tsv", sep="\t")
        assert kept.groupby("emotion").size().nunique() == 1  # capped to the same count per emotion
        # lap lape mad cas + 2 random controls matched to each of them
        assert len(list((run / task / "masks" / "c3-unfiltered").glob("*.safetensors"))) == 4 + 4 * 2
        # one model load per evaluation group that computed anything, never one per condition
        logs = list((run / task / "logs").glob("evaluate-group*.log"))
        assert len(logs) == len(eval_groups(demo_config()))
        assert all("'model_loads': 1" in f.read_text() for f in logs)
        sweep = pd.read_csv(run / task / "metrics" / "c_sweep.tsv", sep="\t")
        assert set(sweep["ident"]) == {"c3-unfiltered"}
    deltas = pd.read_csv(run / "evc" / "metrics" / "deltas.tsv", sep="\t")
    assert {"delta", "ci_lo", "ci_hi"} <= set(deltas.columns) and len(deltas)
    effects = pd.read_csv(run / "ser" / "metrics" / "effects.tsv", sep="\t")
    assert {"SE", "ACE", "ESS"} <= set(effects.columns)
    stores = list((demo_run / "results" / "cache" / "stage1").glob("*/shard-*-of-2/stats.zarr"))
    assert len(stores) == 4
    # nothing half-written is left behind
    assert not [p for p in (demo_run / "results").rglob(".*.tmp*")]


@pytest.mark.slow
def test_demo_second_family_audio_flamingo3(demo_run):
    """The embedded setup's second model family: Audio Flamingo 3 on SER, sharing the workdir and cache."""
    snakemake(
        demo_run, "--cores", "2", "--configfile", str(REPO / "config" / "demo-machinery.yaml"),
        str(REPO / "config" / "demo-af3.yaml"),
    )
    run = demo_run / "results" / "demo-af3"
    assert (run / "report.html").exists() and not (run / "evc").exists()
    effects = pd.read_csv(run / "ser" / "metrics" / "effects.tsv", sep="\t")
    assert {"SE", "ACE", "ESS"} <= set(effects.columns)
    stores = list((demo_run / "results" / "cache" / "stage1").glob("ser-audio_flamingo3-*/shard-*/stats.zarr"))
    assert len(stores) == 2


@pytest.mark.slow
def test_nothing_to_do_after_a_run(demo_run):
    assert planned(demo_run) == {}


@pytest.mark.slow
def test_filter_change_never_reruns_stage1(demo_run):
    jobs = planned(demo_run, {"filter": {"c": 2, "seed": 1}})
    assert {"prepare", "generate", "judge_ident"}.isdisjoint(jobs)
    assert {"filter", "aggregate", "select", "metrics_ident", "sweep", "report"} <= set(jobs)


@pytest.mark.slow
def test_new_r_adds_only_new_jobs(demo_run):
    jobs = planned(demo_run, {"select": {"r": [0.05, 0.1]}})
    assert {"prepare", "generate", "judge_ident", "filter", "aggregate"}.isdisjoint(jobs)
    assert jobs["select"] == 2 * 4  # 4 new selector masks per task
    assert jobs["random_control"] == 2 * 4 * 2  # 2 seeds of a matched control for each, per task
    # 12 new masks per task (4 selector masks + 8 matched controls), each under deactivate and steer a1: one
    # evaluate job per task x group that gains one of them (the group's old conditions come from the cache)
    n = changed_groups({"select": {"r": [0.05, 0.1]}})
    assert 0 < n and jobs["evaluate"] == jobs["judge_eval"] == 2 * n


@pytest.mark.slow
def test_new_alpha_adds_only_new_jobs(demo_run):
    jobs = planned(demo_run, {"evaluate": {"alpha": [1.0, 0.5]}})
    assert {"prepare", "generate", "judge_ident", "filter", "aggregate", "select", "random_control"}.isdisjoint(jobs)
    # steer a0.5 for each of 12 masks, per task: the groups that gain one of them
    n = changed_groups({"evaluate": {"alpha": [1.0, 0.5]}})
    assert 0 < n and jobs["evaluate"] == 2 * n


@pytest.mark.slow
def test_new_alpha_computes_only_new_conditions(demo_run, tmp_path):
    """A re-run group evaluates its new conditions only: the others come from the per-condition cache."""
    wd = tmp_path / "copy"  # a copy: the other tests need the demo run as it is
    shutil.copytree(demo_run, wd, symlinks=True)
    overlay = wd / "alpha.yaml"
    overlay.write_text(yaml.safe_dump({"evaluate": {"alpha": [1.0, 0.5]}}))
    snakemake(wd, "--cores", "2", "--configfile", str(REPO / "config" / "demo-machinery.yaml"), str(overlay),
              "--until", "evaluate")
    old = eval_groups(demo_config())
    new = eval_groups(demo_config({"evaluate": {"alpha": [1.0, 0.5]}}))
    for task in ("evc", "ser"):
        for g, conds in new.items():
            if conds == old.get(g):
                continue
            log = (wd / "results" / "demo" / task / "logs" / f"evaluate-group{g}-0.log").read_text()
            added = len(set(conds) - set(old.get(g, [])))
            assert f"'cached': {len(conds) - added}, 'computed': {added}, 'model_loads': 1" in log


@pytest.mark.slow
def test_new_c_and_filtering_add_only_their_identification_jobs(demo_run):
    jobs = planned(demo_run, {"filter": {"c": [3, 2]}})
    assert {"prepare", "generate", "judge_ident"}.isdisjoint(jobs)
    # per task: one new setting (c2-unfiltered) with its own filter, aggregate, masks and metrics
    assert jobs["filter"] == jobs["aggregate"] == 2 and jobs["select"] == 2 * 4 and jobs["random_control"] == 2 * 8
    assert jobs["evaluate"] == 2 * changed_groups({"filter": {"c": [3, 2]}})


@pytest.mark.slow
def test_new_transfer_pair_adds_only_its_jobs(demo_run):
    """A target-only transfer dataset on a finished run: its stage 0 and evaluation, their metrics and the
    tables after them; no identification job, and none of the tasks' own evaluation re-runs."""
    jobs = planned(demo_run, ESD_B, {"transfer": {"datasets": [["esd", "esd_b"]]}})
    assert set(jobs) == {"prepare", "evaluate", "judge_eval", "metrics_ident", "sweep", "report", "all"}
    assert jobs["prepare"] == 2 and jobs["metrics_ident"] == 2 and jobs["sweep"] == 2
    assert jobs["evaluate"] == jobs["judge_eval"] == 2 * target_groups()


@pytest.mark.slow
def test_model_change_makes_a_new_stage1_store(demo_run):
    jobs = planned(demo_run, {"hook_site": "pre_act"})
    assert jobs["generate"] == 4 and jobs["prepare"] == 2
    assert (demo_run / "results" / "cache" / "stage1").exists()


@pytest.mark.slow
def test_report_only_change(demo_run):
    jobs = planned(demo_run, {"report": {"title": "Another title"}})
    assert set(jobs) == {"report", "all"}


@pytest.mark.slow
def test_other_run_reuses_cached_stage1(demo_run):
    jobs = planned(demo_run, {"run_name": "another", "filter": {"c": 2}})
    assert {"prepare", "generate"}.isdisjoint(jobs)  # same stage-1 identity: the cached stores are reused
    assert jobs["judge_ident"] == 4 and jobs["filter"] == 2


@pytest.fixture
def code_copy(tmp_path):
    """A copy of the workflow and package whose modules a test may edit."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, copy / name)
    for name in ("workflow", "config", "envs"):
        shutil.copytree(REPO / name, copy / name)
    shutil.copytree(REPO / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _touch_code(copy: Path, module: str) -> None:
    f = copy / "src" / "emotion_neurons" / module
    f.write_text(f.read_text() + "\n# edited\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, expected",
    [
        ("stages/report.py", {"report", "all"}),
        ("stages/metrics.py", {"metrics_ident", "sweep", "report", "all"}),
        ("stages/sweep.py", {"sweep", "report", "all"}),
        ("models/audio_flamingo3.py", set()),  # another model's adapter: nothing of this run
    ],
)
def test_code_change_reruns_exactly_its_rules(demo_run, code_copy, module, expected):
    assert planned(demo_run, repo=code_copy) == {}
    _touch_code(code_copy, module)
    assert set(planned(demo_run, repo=code_copy)) == expected


@pytest.mark.slow
def test_hook_code_change_reruns_stage1(demo_run, code_copy):
    _touch_code(code_copy, "hooks.py")
    jobs = planned(demo_run, repo=code_copy)
    # per task: every evaluation group (the baseline + 12 masks x (deactivate, steer a1), grouped)
    assert jobs["generate"] == 4 and jobs["evaluate"] == 2 * len(eval_groups(demo_config()))


def teardown_module(module):
    shutil.rmtree(REPO / ".snakemake" / "tmp", ignore_errors=True)


@pytest.mark.slow
def test_killed_job_leaves_nothing_trusted_and_resumes(tmp_path):
    """SIGKILL the whole Snakemake process group mid-way through stage 1, then resume."""
    import signal
    import time

    from emotion_neurons.tiny.__main__ import build_all

    build_all(REPO / ".tiny", seeds=())  # the machinery runs need no trained miniature
    wd = make_workdir(tmp_path / "wd")
    overlay = tmp_path / "ser-only.yaml"
    overlay.write_text(yaml.safe_dump({"run_name": "kill", "tasks": {"evc": {"enabled": False}}}))
    args = ["--cores", "1", "--configfile", str(REPO / "config" / "demo-machinery.yaml"), str(overlay), "--until", "generate"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(wd), *args]
    proc = subprocess.Popen(cmd, cwd=wd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    cache = wd / "results" / "cache" / "stage1"
    deadline = time.time() + 300
    while time.time() < deadline and not list(cache.glob("*/.shard-*.tmp/.stats.zarr.*")):
        time.sleep(0.05)
    assert list(cache.glob("*/.shard-*.tmp/.stats.zarr.*")), "stage 1 never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(cache.glob("*/shard-*-of-*")), "a killed job left an output Snakemake would trust"
    snakemake(wd, "--unlock", *args)  # a hard kill leaves Snakemake's lock behind
    snakemake(wd, "--rerun-incomplete", *args)
    shards = sorted(cache.glob("*/shard-*-of-2"))
    assert len(shards) == 2 and all((s / "stats.zarr").exists() and (s / "outputs.tsv").exists() for s in shards)
    assert not list(cache.glob("*/.shard-*.tmp")), "stale temporary folders were not cleaned"
