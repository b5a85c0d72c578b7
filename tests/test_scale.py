"""Paper-scale plumbing: per-process memos of code hashes and corpus fingerprints, content-based keys."""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from emotion_neurons import config as C


def _esd(root, n=3):
    emos = {"Neutral": "neutral", "Angry": "angry"}
    for spk in ("0011", "0016"):
        lines = []
        for b, folder in enumerate(emos):
            (root / spk / folder).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                uid = f"{spk}_{b * 350 + k + 1:06d}"
                sf.write(root / spk / folder / f"{uid}.wav", np.full(1600, 0.1 * (k + 1), np.float32), 16000)
                lines.append(f"{uid}\tsentence {k}\t{folder}")
        (root / spk / f"{spk}.txt").write_text("\n".join(lines) + "\n")
    return {"format": "esd", "root": str(root), "emotions": emos, "ident_speakers": ["0011"], "eval_speakers": ["0016"]}


def test_same_size_in_place_edit_changes_the_fingerprint(tmp_path):
    cfg = _esd(tmp_path / "esd")
    fp = C.dataset_fingerprint(cfg)
    wav = tmp_path / "esd" / "0011" / "Angry" / "0011_000351.wav"
    size = wav.stat().st_size
    sf.write(wav, np.full(1600, -0.3, np.float32), 16000)  # same frames, same size, other samples
    assert wav.stat().st_size == size
    os.utime(wav, ns=(wav.stat().st_atime_ns, wav.stat().st_mtime_ns + 10**9))
    C.clear_caches()
    assert C.dataset_fingerprint(cfg) != fp


def test_fingerprint_is_memoised_and_cached_on_disk(tmp_path, monkeypatch):
    cfg = _esd(tmp_path / "esd")
    reads = []
    real = C._file_digests

    def spy(paths, stats=None):
        reads.append(len(paths))
        return real(paths, stats)

    monkeypatch.setattr(C, "_file_digests", spy)
    fp = C.dataset_fingerprint(cfg)
    assert C.dataset_fingerprint(cfg) == fp and reads == [14]  # 12 wavs + 2 transcripts; second call in the same process: no walk at all
    cache = json.loads(C._hash_cache_file().read_text())
    entries = [v for names in cache["dirs"].values() for v in names.values()]
    assert cache["version"] == C.HASH_CACHE_VERSION
    assert len(entries) == 14 and all(len(v[2]) == 64 for v in entries)
    # a new process (memo cleared) reuses the on-disk digests: no file is opened for reading
    C.clear_caches()
    opened = []
    real_open = open

    def spy_open(f, *a, **k):
        if str(f).endswith(".wav"):
            opened.append(f)
        return real_open(f, *a, **k)

    monkeypatch.setattr("builtins.open", spy_open)
    assert C.dataset_fingerprint(cfg) == fp and opened == []


def _reference_fingerprint(cfg):
    """The fingerprint as first defined (issue 8): sorted rglob per speaker, `relative path:sha256` lines.
    The stage-1 cache keys depend on it, so a faster walk must give the same value."""
    import hashlib
    from pathlib import Path

    root, h = Path(cfg["root"]), hashlib.sha256()
    for spk in sorted({*cfg["ident_speakers"], *cfg["eval_speakers"]}):
        for f in sorted((root / spk).rglob("*")):
            if f.is_file() and (f.suffix == ".wav" or f.name == f"{spk}.txt"):
                h.update(f"{f.relative_to(root)}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()[:16]


def test_fingerprint_matches_the_plain_definition(tmp_path, monkeypatch):
    cfg = _esd(tmp_path / "esd")
    # files the walk must skip or order part by part: nested folders, a non-wav, another speaker's transcript
    (tmp_path / "esd" / "0011" / "Angry" / "deep").mkdir()
    sf.write(tmp_path / "esd" / "0011" / "Angry" / "deep" / "x.wav", np.zeros(800, np.float32), 16000)
    (tmp_path / "esd" / "0011" / "Angry" / "notes.txt").write_text("not audio")
    (tmp_path / "esd" / "0011" / "0016.txt").write_text("not this speaker's")
    (tmp_path / "esd" / "0011" / "Angry-b").mkdir()
    sf.write(tmp_path / "esd" / "0011" / "Angry-b" / "y.wav", np.ones(800, np.float32), 16000)
    assert C.dataset_fingerprint(cfg) == _reference_fingerprint(cfg)
    monkeypatch.chdir(tmp_path)  # a relative root names the same corpus, so the same fingerprint
    C.clear_caches()
    assert C.dataset_fingerprint({**cfg, "root": "esd"}) == _reference_fingerprint(cfg)


def test_warm_fingerprint_costs_no_path_objects_per_file(tmp_path, monkeypatch):
    """17,500 `Path.resolve` and `Path.stat` calls were 4 s of a paper dry run: a warm start needs neither."""
    import pathlib

    cfg = _esd(tmp_path / "esd")
    fp = C.dataset_fingerprint(cfg)
    C.clear_caches()
    calls = []
    for name in ("resolve", "stat", "read_bytes"):
        real = getattr(pathlib.Path, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls.append((_name, self))
            return _real(self, *a, **k)

        monkeypatch.setattr(pathlib.Path, name, spy)
    assert C.dataset_fingerprint(cfg) == fp
    per_file = [c for c in calls if c[1].suffix == ".wav"]
    assert per_file == [], per_file[:3]


def test_emobox_fingerprint_covers_the_audio_files(tmp_path):
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, np.full(1600, 0.2, np.float32), 16000)
    lines = [json.dumps({"key": k, "wav": f"{k}.wav", "emo": "ang"}) for k in ("a", "b")]
    (tmp_path / "ident.jsonl").write_text("\n".join(lines[:1]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[1:]) + "\n")
    cfg = {"format": "emobox", "ident_manifest": str(tmp_path / "ident.jsonl"),
           "eval_manifest": str(tmp_path / "eval.jsonl"), "emotions": {"ang": "angry"}}
    fp = C.dataset_fingerprint(cfg)
    sf.write(tmp_path / "b.wav", np.full(1600, -0.2, np.float32), 16000)
    os.utime(tmp_path / "b.wav", ns=(1, (tmp_path / "b.wav").stat().st_mtime_ns + 10**9))
    C.clear_caches()
    assert C.dataset_fingerprint(cfg) != fp


def test_emobox_fingerprint_checks_each_audio_file_once(tmp_path, monkeypatch):
    """Existence is read once per listed file: a second check after hashing could disagree with the first
    (a file removed meanwhile) and misalign the digests with the manifest's order."""
    from pathlib import Path

    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, np.full(1600, 0.2, np.float32), 16000)
    lines = [json.dumps({"key": k, "wav": f"{k}.wav", "emo": "ang"}) for k in ("a", "b", "gone")]
    (tmp_path / "ident.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.jsonl").write_text(lines[0] + "\n")
    cfg = {"format": "emobox", "ident_manifest": str(tmp_path / "ident.jsonl"),
           "eval_manifest": str(tmp_path / "eval.jsonl"), "emotions": {"ang": "angry"}}
    calls: list[str] = []
    real = Path.is_file

    def spy(self):
        calls.append(self.name)
        return real(self)

    monkeypatch.setattr(Path, "is_file", spy)
    C.clear_caches()
    fp = C.dataset_fingerprint(cfg)
    wav_calls = [c for c in calls if c.endswith(".wav")]
    assert sorted(wav_calls) == ["a.wav", "a.wav", "b.wav", "gone.wav"], wav_calls  # a.wav is in both manifests
    monkeypatch.setattr(Path, "is_file", real)
    C.clear_caches()
    assert C.dataset_fingerprint(cfg) == fp


def test_every_stage_together_parses_each_file_once(monkeypatch):
    """The stages' closures overlap (config, io, ...): a dry run hashing all of them parses each file once."""
    from emotion_neurons.models import available

    available()  # the adapter declarations are read once per process, before any stage hash (not counted)
    parsed = []
    real = C.ast.parse

    def spy(src, filename="<unknown>", *a, **k):
        parsed.append(filename)
        return real(src, filename, *a, **k)

    monkeypatch.setattr(C.ast, "parse", spy)
    C.clear_caches()
    for stage in C.stages():
        C.code_version(stage, "qwen2_5_omni" if stage in ("generate", "evaluate") else None)
    assert parsed and len(parsed) == len(set(parsed))
    C.clear_caches()


def test_code_version_parses_the_import_closure_once(monkeypatch):
    calls = []
    real = C._package_imports

    def spy(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(C, "_package_imports", spy)
    C.clear_caches()
    v = C.code_version("aggregate")
    n = len(calls)
    assert n > 0
    for _ in range(50):
        assert C.code_version("aggregate") == v
    assert len(calls) == n


def _package_copy(tmp_path, monkeypatch):
    """A copy of the package to edit: code_version reads the files under config.PACKAGE_DIR."""
    import shutil

    pkg = tmp_path / "emotion_neurons"
    shutil.copytree(C.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "tiny"))
    monkeypatch.setattr(C, "PACKAGE_DIR", pkg)
    C.clear_caches()
    return pkg


def test_result_code_ignores_the_grouping_plumbing_but_not_the_intervention_code(tmp_path, monkeypatch):
    pkg = _package_copy(tmp_path, monkeypatch)

    def versions():
        C.clear_caches()
        return (C.code_version("evaluate", "qwen2_5_omni"), C.code_version("evaluate", "qwen2_5_omni", results_only=True),
                C.code_version("judge"), C.code_version("judge", results_only=True))

    before = versions()
    assert pkg / "group.py" in C.stage_files("evaluate", "qwen2_5_omni")  # evaluate does import it
    with open(pkg / "group.py", "a") as f:
        f.write("\n# an unrelated edit: a comment in the grouping helpers\n")
    plumbing = versions()
    assert plumbing[0] != before[0] and plumbing[2] != before[2]  # the jobs re-run (params change) ...
    assert plumbing[1] == before[1] and plumbing[3] == before[3]  # ... but the cached results stay valid
    with open(pkg / "interventions.py", "a") as f:
        f.write("\n# a related edit: the code that steers the model\n")
    related = versions()
    assert related[0] != plumbing[0] and related[1] != plumbing[1]
    C.clear_caches()


def test_group_caches_key_on_the_result_code(tmp_path, monkeypatch):
    import test_group as tg
    from toy import ToyAdapter

    from emotion_neurons.stages import evaluate, judge

    monkeypatch.setattr(evaluate, "load_adapter", lambda cfg: (a := ToyAdapter(), a.load(), a)[2])
    manifest, masks = tg._setup(tmp_path, "ser")

    def run(out, code, result_code):
        p = {"common": {**tg.COMMON, "task": "ser", "code": code, "result_code": result_code},
             "conditions": [tg.BASE, tg.STEER]}
        return evaluate.evaluate_group(p, manifest, masks, 0, 1, 2, str(tmp_path / "cache"), str(tmp_path / out))

    assert run("g1", "full-1", "res-1")["computed"] == 2
    assert run("g2", "full-2", "res-1")["computed"] == 0  # only the plumbing changed
    assert run("g3", "full-2", "res-2")["computed"] == 2  # the result code changed
    conds = [{k: v for k, v in c.items() if k != "mask"} for c in (tg.BASE, tg.STEER)]

    def jrun(out, code, result_code):
        common = {"task": "ser", "judges": {}, "labels": tg.te.EMOTIONS, "code": code, "result_code": result_code}
        return judge.judge_group({"common": common, "conditions": conds}, str(tmp_path / "g1"),
                                 str(tmp_path / "jc"), str(tmp_path / out))

    assert jrun("j1", "full-1", "res-1")["computed"] == 2
    assert jrun("j2", "full-2", "res-1")["computed"] == 0
    assert jrun("j3", "full-1", "res-2")["computed"] == 2


def _plant(cache, name, files):
    for rel, text in files.items():
        (cache / name / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / name / rel).write_text(text)
    return cache / name


def test_cache_gc_removes_exactly_the_entries_no_output_links(tmp_path):
    """Planted caches: an entry linked from a current output folder (kept), one linked only from a folder of
    another config (removed), never linked (removed), an unfinished atomic output (kept), params files."""
    import os

    from emotion_neurons.cache import gc

    ev, jd, params, s1 = (tmp_path / "cache" / n for n in ("eval", "judged", "params", "stage1"))
    for d in (ev, jd, params, s1):
        d.mkdir(parents=True)
    live_e = _plant(ev, "a" * 32, {"outputs.tsv": "x", "wavs/u1.wav": "w"})
    dead_e = _plant(ev, "b" * 32, {"outputs.tsv": "old", "strata.tsv": "s"})
    other_e = _plant(ev, "c" * 32, {"outputs.tsv": "other"})
    tmp_e = _plant(ev, ".d.tmp", {"outputs.tsv": "being written"})
    (jd / f"{'e' * 32}.tsv").write_text("judged")
    (jd / f"{'f' * 32}.tsv").write_text("stale judged")
    run = tmp_path / "run" / "ser" / "eval" / "group-3"
    (run / "shard-0" / "cond-a" / "wavs").mkdir(parents=True)
    os.link(live_e / "wavs" / "u1.wav", run / "shard-0" / "cond-a" / "wavs" / "u1.wav")  # one file suffices
    (run / "judged-0").mkdir()
    os.link(jd / f"{'e' * 32}.tsv", run / "judged-0" / "cond-a.tsv")
    elsewhere = tmp_path / "old-run" / "shard-0"
    elsewhere.mkdir(parents=True)
    os.link(other_e / "outputs.tsv", elsewhere / "outputs.tsv")
    (params / "keep.json").write_text("{}")
    (params / "stale.json").write_text("{}")
    (s1 / "ser-a-123").mkdir()
    (s1 / "ser-a-456").mkdir()
    (s1 / "ser-a-456" / "stats.bin").write_bytes(b"0" * 1000)
    spec = {"caches": [str(ev), str(jd)], "live": [str(run / "shard-0"), str(run / "judged-0"), str(run / "none")],
            "params_dir": str(params), "keep_params": ["results/cache/params/keep.json"],
            "stage1_dir": str(s1), "keep_stage1": ["results/cache/stage1/ser-a-123"]}
    doomed = {str(dead_e), str(other_e), str(jd / f"{'f' * 32}.tsv"), str(params / "stale.json")}
    dry = gc(**spec, dry_run=True)
    assert set(dry["entries"]) == doomed and all(os.path.exists(p) for p in doomed)
    summary = gc(**spec)
    assert set(summary["entries"]) == doomed and not any(os.path.exists(p) for p in doomed)
    assert summary["bytes"] == len("old") + len("s") + len("other") + len("stale judged") + len("{}")
    assert live_e.is_dir() and tmp_e.is_dir() and (jd / f"{'e' * 32}.tsv").is_file() and (params / "keep.json").is_file()
    assert (elsewhere / "outputs.tsv").read_text() == "other"  # another run's own link keeps its data
    assert summary["stage1_unused"] == [str(s1 / "ser-a-456")] and summary["stage1_unused_bytes"] == 1000
    assert (s1 / "ser-a-456").is_dir()  # stage-1 stores are listed, never removed
    assert gc(**spec)["removed"] == 0


def test_cache_gc_rule_keeps_what_the_current_config_links(tmp_path):
    """`snakemake cache_gc` with the demo config: the folders and params files it keeps are this config's."""
    import test_workflow as tw

    cfg = tw.demo_config()
    wd = tw.make_workdir(tmp_path / "wd")
    ev, jd = wd / "results" / "cache" / "eval", wd / "results" / "cache" / "judged"
    live = _plant(ev, "a" * 32, {"outputs.tsv": "x"})
    dead = _plant(ev, "b" * 32, {"outputs.tsv": "y"})
    g = next(iter(tw.eval_groups(cfg)))
    out = wd / "results" / cfg["run_name"] / "ser" / "eval" / f"group-{g}" / "shard-0" / "cond"
    out.mkdir(parents=True)
    os.link(live / "outputs.tsv", out / "outputs.tsv")
    jd.mkdir(parents=True)
    (jd / f"{'c' * 32}.tsv").write_text("stale")
    res = tw.snakemake(wd, "cache_gc", "--cores", "1", "--configfile", str(tw.REPO / "config" / "demo-machinery.yaml"))
    assert "cache_gc: removed 2 entries" in res.stdout + res.stderr, res.stderr[-2000:]
    assert "cache_gc: removed 2 entries" in (wd / "results" / cfg["run_name"] / "logs" / "cache_gc.log").read_text()
    assert live.is_dir() and not dead.exists() and not (jd / f"{'c' * 32}.tsv").exists()
    assert (out / "outputs.tsv").read_text() == "x"
