"""SLURM, for real: a one-node cluster (tests/slurm/cluster.sh) runs a reduced demo through
`workflow/profiles/slurm-local-test`; the same demo run locally must give identical results.

Needs root (the cluster installs Debian's slurm + munge with apt-get if missing and starts the daemons without
systemd). Skipped when that is impossible or when SKIP_SLURM=1; REQUIRE_SLURM=1 turns those skips into failures.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
PROFILE = REPO / "workflow" / "profiles" / "slurm-local-test"
# a fixed statedir: a later run stops whatever an interrupted one left running there
STATE = Path(os.environ.get("SLURM_TEST_STATEDIR", "/tmp/emotion-neurons-slurm-test"))
GPU_RULES = {"generate", "evaluate", "judge_ident", "judge_eval"}

# the demo reduced to what a 2-core machine runs in minutes: SER only, two generate shards (two stage-1
# stores merged by aggregate), cas and its matched random control (one seed), one evaluate shard (baseline + 2 conditions).
# Every SLURM job costs ~15 s of start-up (Snakemake starts twice: batch script and job step) and the fake
# GPU serialises the GPU rules, so each extra evaluate shard adds ~1 min to the SLURM run.
OVERLAY = {
    "tasks": {"evc": {"enabled": False}, "ser": {"shards": 2}},
    "select": {"selectors": ["cas", "random"], "random": {"seeds": 1}},
    "evaluate": {"shards": 1},
}

pytestmark = pytest.mark.slow


def _skip(reason: str):
    if os.environ.get("REQUIRE_SLURM") == "1":
        pytest.fail(f"REQUIRE_SLURM=1 but: {reason}")
    pytest.skip(reason)


def _prerequisites() -> str | None:
    if os.environ.get("SKIP_SLURM") == "1":
        return "SKIP_SLURM=1"
    if not sys.platform.startswith("linux"):
        return "the test cluster needs Linux"
    if os.geteuid() != 0:
        return "needs root: tests/slurm/cluster.sh installs slurm/munge and starts their daemons"
    installed = all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and not shutil.which("apt-get"):
        return "slurm is not installed and apt-get is not available to install it"
    return None


def _run(cmd: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    reason = _prerequisites()
    if reason:
        _skip(reason)
    # one test cluster per machine at a time (it also owns /etc/slurm/slurm.conf while it runs)
    lock = open(f"{STATE}.lock", "w")
    deadline = time.monotonic() + 900
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                _skip(f"another test session has held the SLURM test cluster ({STATE}.lock) for 15 min")
            time.sleep(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SLURM_CONF"] = str(STATE / "etc" / "slurm.conf")
    try:
        res = _run(["bash", str(CLUSTER), "start", str(STATE)], env, REPO, timeout=600)
        if res.returncode != 0:
            _skip(f"could not start a one-node SLURM cluster here:\n{res.stderr[-3000:]}")
        yield env
    finally:
        _run(["bash", str(CLUSTER), "stop", str(STATE)], env, REPO, timeout=120)
        lock.close()


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """A frozen copy of the workflow and the package. Cluster jobs re-read the Snakefile and recompute the
    stage-1 cache key (which hashes the stage-1 sources) in every job; an edit to src/ during the run would
    give the jobs another key than the main process. Both runs use this copy, so they also run the same code."""
    from emotion_neurons.tiny.__main__ import build_all

    build_all(REPO / ".tiny", seeds=())  # the machinery runs need no trained miniature
    dst = tmp_path_factory.mktemp("code")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, dst / name)
    for name in ("workflow", "config", "envs"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    shutil.copytree(REPO / "src" / "emotion_neurons", dst / "src" / "emotion_neurons", ignore=ignore)
    (dst / "overlay.yaml").write_text(yaml.safe_dump(OVERLAY))
    return dst


def _workdir(path: Path, code: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").symlink_to(code / "config.yaml")
    (path / ".tiny").symlink_to(REPO / ".tiny", target_is_directory=True)
    return path


def _snakemake_cmd(code: Path, wd: Path, *args: str) -> list[str]:
    return [
        str(BIN / "snakemake"),
        "-s",
        str(code / "Snakefile"),
        "--directory",
        str(wd),
        "--configfile",
        str(code / "config" / "demo-machinery.yaml"),
        str(code / "overlay.yaml"),
        *args,
    ]


def _check(res: subprocess.CompletedProcess, what: str) -> None:
    if res.returncode != 0:
        raise AssertionError(
            f"{what} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-12000:]}"
        )


@pytest.fixture(scope="module")
def runs(cluster, code, tmp_path_factory):
    """The reduced demo twice: locally (--cores 2) and through the SLURM profile. They run side by side: the
    SLURM run mostly waits (job start-up, status polling, one fake GPU), the local run fills that time."""
    # the venv first on PATH: SLURM exports this environment to the jobs (sbatch --export=ALL), whose shell
    # commands call `python -m emotion_neurons.stages.<stage>`
    env = {**cluster, "PATH": f"{BIN}:{cluster.get('PATH', '')}"}
    local = _workdir(tmp_path_factory.mktemp("local"), code)
    slurm = _workdir(tmp_path_factory.mktemp("slurm"), code)
    env.pop("SNAKEMAKE_PROFILE", None)  # the local run is plain --cores 2
    t0 = time.monotonic()
    local_log = local / "snakemake.out"
    with open(local_log, "w") as out:
        local_proc = subprocess.Popen(
            _snakemake_cmd(code, local, "--cores", "2"),
            cwd=local,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            res = _run(_snakemake_cmd(code, slurm, "--profile", str(PROFILE)), env, slurm, timeout=1200)
            t_slurm = time.monotonic() - t0
            local_proc.wait(timeout=600)
        finally:
            if local_proc.poll() is None:
                local_proc.kill()
                local_proc.wait()
    t_all = time.monotonic() - t0
    _check(subprocess.CompletedProcess([], local_proc.returncode, local_log.read_text(), ""), "local run")
    _check(res, "SLURM run")
    print(f"\nSLURM run {t_slurm:.0f} s, both runs {t_all:.0f} s")
    return {"local": local, "slurm": slurm, "slurm_output": res.stdout + res.stderr, "env": env}


def _rel(root: Path, pattern: str) -> set[str]:
    return {str(p.relative_to(root)) for p in root.glob(pattern)}


def test_jobs_ran_through_slurm(runs):
    wd, out, env = runs["slurm"], runs["slurm_output"], runs["env"]
    m = re.search(r"SLURM run ID: (\S+)", out)
    assert m, "the SLURM executor did not start"
    submitted = set(re.findall(r"has been submitted with SLURM jobid (\d+)", out))
    assert submitted, "no job was submitted with sbatch"
    # the controller's view of this run (no accounting database: squeue keeps finished jobs for MinJobAge)
    q = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--name", m.group(1), "--format=%i|%T|%k|%b"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = [line.split("|") for line in q.splitlines() if line.strip()]
    assert {j[0] for j in jobs} == submitted
    assert all(j[1] == "COMPLETED" for j in jobs), jobs
    rules = {}
    for _, _, comment, gres in jobs:
        rule = re.match(r"rule_([a-z_]+?)(_wildcards_.*)?$", comment).group(1)
        rules.setdefault(rule, set()).add(gres)
    assert GPU_RULES | {"prepare", "filter", "aggregate", "select", "metrics_ident", "sweep", "report"} <= set(rules)
    for rule, gres in rules.items():  # the profile gives exactly the GPU rules the (fake) GPU
        assert all(("gpu:1" in g) == (rule in GPU_RULES) for g in gres), (rule, gres)
    # the plugin's per-job logs (kept by slurm-keep-successful-logs): rule_<rule>[/<wildcards>]/<jobid>.log,
    # one per SLURM job, each of them a Snakemake run of one job inside the allocation
    logs = list((wd / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {p.stem for p in logs} == submitted
    assert all("Finished jobid" in p.read_text() for p in logs)


@pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp")  # Snakemake's marker in directory()
def test_same_stage1_stats(runs):
    import zarr

    a, b = runs["local"], runs["slurm"]
    stores = _rel(a, "results/cache/stage1/*/shard-*/stats.zarr")
    assert len(stores) == 2 and stores == _rel(b, "results/cache/stage1/*/shard-*/stats.zarr")
    for s in sorted(stores) + ["results/demo/ser/aggregate/c3-unfiltered.zarr"]:
        ga, gb = zarr.open_group(str(a / s), mode="r"), zarr.open_group(str(b / s), mode="r")
        names = sorted(ga.array_keys())
        assert names and names == sorted(gb.array_keys()), s
        for n in names:
            xa, xb = ga[n][...], gb[n][...]
            assert xa.dtype == xb.dtype and np.array_equal(xa, xb, equal_nan=True), f"{s}/{n}"


def test_same_masks_and_kept(runs):
    a, b = runs["local"] / "results/demo/ser", runs["slurm"] / "results/demo/ser"
    masks = _rel(a, "masks/c3-unfiltered/*.safetensors")
    assert masks == {"masks/c3-unfiltered/cas-r0.05.safetensors", "masks/c3-unfiltered/random-cas-r0.05-s0.safetensors"}
    assert masks == _rel(b, "masks/c3-unfiltered/*.safetensors")
    for f in sorted(masks) + ["filter/c3-unfiltered/kept.tsv"]:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_same_metrics(runs):
    a, b = runs["local"] / "results/demo/ser/metrics", runs["slurm"] / "results/demo/ser/metrics"
    tables = _rel(a, "*.tsv")
    assert tables and tables == _rel(b, "*.tsv")
    for t in sorted(tables):
        pd.testing.assert_frame_equal(
            pd.read_csv(a / t, sep="\t"), pd.read_csv(b / t, sep="\t"), check_exact=False, rtol=1e-9, obj=t
        )
    assert (runs["slurm"] / "results/demo/report.html").exists()
