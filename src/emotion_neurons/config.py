"""Config helpers shared by the Snakefile and the stage modules.

Rules pass each stage only the config subset it depends on, as sorted JSON in `params`, so Snakemake re-runs a
rule exactly when that subset (or the code it runs, see `code_version`) changes.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent

#: Stage entry modules live in `stages/`: rule `<stage>` (or `<stage>_<phase>`) runs `python -m
#: emotion_neurons.stages.<stage>`. The map is this naming rule, never a hand-kept table.
STAGE_PACKAGE = "stages"


def stage_module(stage: str) -> str:
    """Dotted module (relative to the package) that runs `stage`, e.g. `stages.select`."""
    return f"{STAGE_PACKAGE}.{stage}"


def stages() -> tuple[str, ...]:
    """Every stage name: the entry modules found in `stages/`."""
    return tuple(sorted(p.stem for p in (PACKAGE_DIR / STAGE_PACKAGE).glob("*.py") if p.stem != "__init__"))


def _module_file(name: str) -> Path | None:
    rel = PACKAGE_DIR.joinpath(*name.split("."))
    for cand in (rel.with_suffix(".py"), rel / "__init__.py"):
        if cand.exists():
            return cand
    return None


@functools.cache
def _package_imports(path: Path) -> frozenset[Path]:
    """Package-internal modules imported anywhere in `path` (lazy imports inside functions included).

    Memoised: every stage's closure walks the same files, and parsing them once per stage cost ~10 s of a
    dry run (issue 8 profile)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inside = path.is_relative_to(PACKAGE_DIR)  # a plugin's file imports the package absolutely
    pkg = path.parent.relative_to(PACKAGE_DIR).parts if inside else ()
    found: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if not inside:
                continue
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level > 1 else list(pkg)
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [mod] if node.module else []
            names += [f"{mod}.{a.name}" if mod else a.name for a in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            full = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names = [n.split(".", 1)[1] for n in full if n.startswith("emotion_neurons.")]
        else:
            continue
        for n in names:
            f = _module_file(n) if n else None
            if f is not None:
                found.add(f)
    return frozenset(found)


def _adapter_files(adapter: str | None) -> list[Path]:
    models = PACKAGE_DIR / "models"
    if adapter is None:
        return sorted(models.glob("*.py"))
    from .models import entry

    return [entry(adapter).file]


#: package modules that only move a stage's results around (grouped jobs: argument parsing, content hashes,
#: linking cached results; the cache's garbage collector): editing them never changes a result, so the
#: per-condition result caches key on `code_version(..., results_only=True)`, which leaves them out
RESULT_NEUTRAL_MODULES: tuple[str, ...] = ("group.py", "cache.py")


def stage_files(stage: str, adapter: str | None = None, results_only: bool = False) -> list[Path]:
    """Transitive closure of the package files a stage imports.

    Adapters are imported by name at run time: with `adapter` set only that adapter's module counts, so
    editing one model's adapter never re-runs another model's jobs. With `results_only` the
    `RESULT_NEUTRAL_MODULES` (and what only they import) are left out.
    """
    entry = _module_file(stage_module(stage))
    if entry is None:
        raise KeyError(f"stage {stage!r} has no entry module {stage_module(stage)}; stages: {', '.join(stages())}")
    neutral = {PACKAGE_DIR / m for m in RESULT_NEUTRAL_MODULES} if results_only else set()
    todo = [entry, PACKAGE_DIR / "__init__.py"]
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f is None or f in seen or f in neutral:
            continue
        seen.add(f)
        if f != Path(__file__).resolve():  # this module imports the registry only to compute these hashes
            todo.extend(_package_imports(f))
        if f == PACKAGE_DIR / "models" / "__init__.py":
            todo.extend(_adapter_files(adapter))
    from .registry import plugin_files

    return sorted(seen | set(plugin_files()))


@functools.cache
def code_version(stage: str, adapter: str | None = None, results_only: bool = False) -> str:
    """Hash of the source files a stage runs (Snakemake does not see imported modules on its own).

    Computed once per process: Snakemake evaluates every job's params in one process, and re-parsing the
    import closure per job dominated dry runs of large grids (issue 8). Edits made while a run is in
    progress are therefore not seen by that run (the README says not to edit `src/` during a run).
    `results_only`: the hash of the code a result depends on (see `RESULT_NEUTRAL_MODULES`).
    """
    h = hashlib.sha256()
    for f in stage_files(stage, adapter, results_only):
        h.update(str(f.relative_to(PACKAGE_DIR) if f.is_relative_to(PACKAGE_DIR) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def dumps(obj: Any) -> str:
    """Canonical JSON: key order never triggers a re-run."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def load_params(arg: str) -> dict[str, Any]:
    """Parse `--params`: inline JSON, or @path to a JSON file."""
    if arg.startswith("@"):
        return json.loads(Path(arg[1:]).read_text())
    return json.loads(arg)


def short_hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(dumps(obj).encode()).hexdigest()[:n]


def task_dataset(config: dict[str, Any], task: str) -> dict[str, Any]:
    name = config["tasks"][task]["dataset"]
    try:
        return config["datasets"][name]
    except KeyError:
        raise KeyError(f"tasks.{task}.dataset names {name!r}, which is not under datasets") from None


HASH_CACHE_ENV = "EMOTION_NEURONS_HASH_CACHE"
_hash_lock = threading.Lock()


def _hash_cache_file() -> Path:
    return Path(os.environ.get(HASH_CACHE_ENV, "results/cache/content-hashes.json"))


#: version of the content-hash cache file's layout; a file of another version is ignored (recomputed once)
HASH_CACHE_VERSION = 2


def _file_digests(paths: list[str], stats: list[os.stat_result] | None = None) -> list[str]:
    """sha256 of each file's bytes (absolute paths), cached on disk by (path, size, mtime_ns).

    Content, not size, so a same-size in-place edit of a wav invalidates cached statistics; the cache keeps
    a 17,500-file corpus cheap to fingerprint on every Snakemake start: one stat per file (none when the
    caller's directory walk already has them), contents read only for new or changed files. The cache file
    groups names by folder (`{"version": 2, "dirs": {folder: {name: [size, mtime_ns, sha256]}}}`) and keys
    them by absolute path, not by resolved path: resolving 17,500 paths cost 4 s of a dry run (issue 8
    profile). A file rewritten with its old size AND its old modification time (`touch -r`) is not noticed.
    """
    from .io import file_sha

    cache_file = _hash_cache_file()
    with _hash_lock:
        try:
            data = json.loads(cache_file.read_text())
            dirs: dict[str, dict[str, list]] = data["dirs"] if data.get("version") == HASH_CACHE_VERSION else {}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            dirs = {}
        out, dirty = [], False
        for i, f in enumerate(paths):
            st = stats[i] if stats is not None else os.stat(f)
            folder, name = os.path.split(f)
            entries = dirs.setdefault(folder, {})
            hit = entries.get(name)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                out.append(hit[2])
                continue
            digest = file_sha(f)
            entries[name] = [st.st_size, st.st_mtime_ns, digest]
            out.append(digest)
            dirty = True
        if dirty:
            try:
                from .io import write_text

                cache_file.parent.mkdir(parents=True, exist_ok=True)
                write_text(cache_file, json.dumps({"version": HASH_CACHE_VERSION, "dirs": dirs},
                                                  separators=(",", ":")))
            except OSError:  # a read-only results folder only costs speed
                pass
    return out


def _esd_files(base: str, transcript: str) -> list[tuple[str, str, os.stat_result]]:
    """(path relative to `base`'s parent, absolute path, stat) of the wavs and the transcript under one
    speaker folder, in the order `sorted(Path(base).rglob("*"))` gives (part by part), with one `os.scandir`
    pass: Path objects, rglob and sorting Paths cost about 3 s at 17,500 files. Like rglob, symlinked
    sub-folders are not descended into."""
    found: list[tuple[tuple[str, ...], str, os.stat_result]] = []
    spk = os.path.basename(base)
    stack: list[tuple[str, tuple[str, ...]]] = [(base, (spk,))]
    while stack:
        folder, parts = stack.pop()
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, (*parts, e.name)))
                elif (e.name.endswith(".wav") and e.name != ".wav" or e.name == transcript) and e.is_file():
                    found.append(((*parts, e.name), e.path, e.stat()))
    found.sort(key=lambda t: t[0])
    return [("/".join(parts), path, st) for parts, path, st in found]


def _emobox_audio(manifest: Path, dcfg: dict[str, Any]) -> list[Path]:
    base = Path(dcfg.get("wav_root") or manifest.parent)
    files = []
    for line in manifest.read_text().splitlines():
        try:
            wav = Path(json.loads(line)["wav"]) if line.strip() else None
        except (ValueError, KeyError, TypeError):
            wav = None  # malformed lines are reported by prepare, with file and line
        if wav is not None:
            files.append(wav if wav.is_absolute() else base / wav)
    return files


def dataset_fingerprint(dcfg: dict[str, Any]) -> str:
    """Hash of what the corpus holds (relative names and file contents), not where it lives.

    Part of the stage-1 cache key, so adding, replacing or editing utterances makes a new store instead of
    silently reusing statistics of the old corpus. For EmoBox manifests it covers the manifests and the
    audio files they list. A missing corpus hashes to "missing" (prepare reports it). Memoised per process.
    """
    return _dataset_fingerprint(dumps(dcfg), str(_hash_cache_file()))


def clear_caches() -> None:
    """Forget the per-process memos (for tests and long-lived processes that edit the corpus or the code)."""
    for memo in (code_version, _package_imports, _dataset_fingerprint):
        getattr(memo, "cache_clear", lambda: None)()  # a test may have replaced one with a spy


@functools.lru_cache(maxsize=64)
def _dataset_fingerprint(dcfg_json: str, _cache_file: str) -> str:
    dcfg = json.loads(dcfg_json)
    h = hashlib.sha256()
    if dcfg.get("format") == "esd":
        root = Path(dcfg["root"])
        if not root.is_dir():
            return "missing"
        root_abs = os.path.abspath(root)
        files: list[tuple[str, str, os.stat_result]] = []
        for spk in sorted({*dcfg.get("ident_speakers", []), *dcfg.get("eval_speakers", [])}):
            base = os.path.join(root_abs, spk)
            if os.path.isdir(base):
                files += _esd_files(base, f"{spk}.txt")
        digests = _file_digests([f[1] for f in files], [f[2] for f in files])
        for (rel, _, _), digest in zip(files, digests, strict=True):
            h.update(f"{rel}:{digest}\n".encode())
    else:
        for key in ("ident_manifest", "eval_manifest"):
            p = Path(dcfg.get(key, ""))
            if not p.is_file():
                h.update(b"missing")
                continue
            h.update(p.read_bytes())
            audio = _emobox_audio(p, dcfg)
            # one existence check per file: checking again after hashing could disagree with the first
            # (a file removed meanwhile) and misalign the digests with the manifest's order
            exists = [f.is_file() for f in audio]
            digests = iter(_file_digests([os.path.abspath(f) for f, e in zip(audio, exists, strict=True) if e]))
            for e in exists:  # the manifest fixes the order; a missing file hashes as such (prepare reports it)
                h.update((next(digests) if e else "missing").encode())
    return h.hexdigest()[:16]


#: task keys that never change stage-1 outputs (`spans` only matter from stage 3 on)
NOT_STAGE1_TASK_KEYS: tuple[str, ...] = ("enabled", "shards", "eval_shards", "spans")
#: model keys in the stage-1 key. `batch_size` is one: left padding and kernel choice make bf16 GPU outputs
#: depend on the batch composition (only the talker's random draws are seeded per instance). The decoding keys
#: are too: cuDNN attention (`deterministic`), the static cache, the compiled step and batched token2wav each
#: changed bf16 outputs on an H200 (bench/RESULTS-fastpath.md), so their statistics are never reused; the static
#: cache's length (`static_cache_bucket`) sets how many masked positions the decode attention reduces over.
STAGE1_MODEL_KEYS: tuple[str, ...] = (
    "adapter", "id", "revision", "dtype", "speaker", "batch_size",
    "deterministic", "cache_implementation", "compile", "token2wav_batch_size", "static_cache_bucket",
    "talker_compile",
)


def stage1_task_cfg(config: dict[str, Any], task: str) -> dict[str, Any]:
    """The task settings stage 0 and stage 1 depend on."""
    return {k: v for k, v in config["tasks"][task].items() if k not in NOT_STAGE1_TASK_KEYS}


def stage1_identity(config: dict[str, Any], task: str) -> dict[str, Any]:
    """Everything that determines stage-1 statistics: the cache key of a generate store."""
    model = {k: config["model"].get(k) for k in STAGE1_MODEL_KEYS}
    model["batch_size"] = int(model["batch_size"] or 1)
    return {
        "task": task,
        "model": model,
        "dataset": task_dataset(config, task),
        "dataset_content": dataset_fingerprint(task_dataset(config, task)),
        "data": config["data"],
        "task_cfg": stage1_task_cfg(config, task),
        "component": config["component"],
        "hook_site": config["hook_site"],
        "capture": config["capture"],
        "code": code_version("generate", config["model"]["adapter"]),
        "prepare_code": code_version("prepare"),
    }


def stage1_key(config: dict[str, Any], task: str) -> str:
    """Directory name of the cached statistics: readable prefix + hash of `stage1_identity`."""
    model = config["model"]["adapter"]
    return f"{task}-{model}-{short_hash(stage1_identity(config, task))}"


def adapter_input_window(adapter: str) -> float | None:
    """`max_audio_seconds` of an adapter, from its declaration (read without importing torch)."""
    from .models import entry

    return entry(adapter).max_audio_seconds


#: results/<run_name> must stay inside results/ and apart from the stage-1 cache
RESERVED_RUN_NAMES = {".", "..", "cache"}


def check_run_name(name: Any) -> str:
    """`run_name` is one plain folder name under results/: never `.`, `..`, `cache` or a path."""
    text = str(name)
    if not text or text in RESERVED_RUN_NAMES or "/" in text or "\\" in text or os.sep in text:
        raise ValueError(
            f"run_name {text!r} is not allowed: it names the folder results/<run_name>, so it must be one plain "
            f"name (letters, digits, '_', '.', '-'), not {sorted(RESERVED_RUN_NAMES)} or a path"
        )
    return text
