"""Corpus readers (ESD layout, EmoBox jsonl) and task instance builders (stage 0: prepare)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ..io import AudioError, TooLongAudio, write_jsonl, write_table
from ..prompts import evc_prompt, option_order, ser_prompt
from ..types import Instance

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset problem, with the file or config key named."""


def _unmatched(what: str, where: str, uid: str, on_unmatched: str, notes: list[dict[str, str]] | None) -> None:
    """A wav without a transcript line or a line without a wav: fatal under `error`, else listed and skipped."""
    msg = f"{where}: {what} ({uid})"
    if on_unmatched == "error":
        raise DataError(msg + "; fix the corpus or set data.on_unmatched: warn to skip it")
    log.warning("skipping %s", msg)
    if notes is not None:
        notes.append({"kind": what.replace(" ", "_"), "where": where, "id": uid, "detail": ""})


def read_esd(
    cfg: dict[str, Any], *, on_unmatched: str = "warn", notes: list[dict[str, str]] | None = None
) -> list[dict[str, str]]:
    """Utterances of an ESD-layout corpus: <root>/<spk>/<spk>.txt and <root>/<spk>/<Emotion>/**/<id>.wav.

    Two wavs with one stem are refused (which one is the utterance is unknowable). A wav with no transcript
    line and a line with no wav are skipped and appended to `notes` (`on_unmatched: warn`) or refused.
    """
    root = Path(cfg["root"])
    if not root.is_dir():
        raise DataError(f"datasets: ESD root {root} is not a directory")
    emotions: dict[str, str] = cfg["emotions"]
    speakers = list(cfg["ident_speakers"]) + list(cfg["eval_speakers"])
    rows = []
    for spk in speakers:
        txt = root / spk / f"{spk}.txt"
        if not txt.exists():
            raise DataError(f"ESD transcript {txt} is missing (speaker {spk} from the config)")
        wavs: dict[str, Path] = {}
        for p in sorted((root / spk).rglob("*.wav")):
            if p.stem in wavs:
                raise DataError(
                    f"ESD utterance {p.stem} has two wav files, {wavs[p.stem]} and {p}; keep one "
                    "(the reader cannot tell which emotion folder is right)"
                )
            wavs[p.stem] = p
        raw = txt.read_bytes()
        for enc in ("utf-8-sig", "utf-16", "gbk"):  # -sig: a byte-order mark is not part of the first id
            try:
                lines = raw.decode(enc).splitlines()
                break
            except UnicodeDecodeError:
                continue
        else:
            raise DataError(f"{txt}: cannot decode transcript")
        named: set[str] = set()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise DataError(f"{txt}:{n}: expected 'id<TAB>text<TAB>Emotion', got {line!r}")
            uid, text, emo = (p.strip() for p in parts)
            if emo not in emotions:
                raise DataError(f"{txt}:{n}: emotion {emo!r} not in datasets.*.emotions {sorted(emotions)}")
            named.add(uid)
            if uid not in wavs:
                _unmatched("transcript without wav", f"{txt}:{n}", uid, on_unmatched, notes)
                continue
            rows.append(
                {"key": uid, "wav": str(wavs[uid]), "speaker": spk, "emotion": emotions[emo], "text": text,
                 "source": f"{txt}:{n}"}
            )
        for uid in sorted(set(wavs) - named):
            _unmatched("wav without transcript", str(wavs[uid]), uid, on_unmatched, notes)
        limit = cfg.get("max_utterances_per_emotion")
        if limit:
            kept, seen = [], {}
            for r in rows:
                if r["speaker"] == spk:
                    seen[r["emotion"]] = seen.get(r["emotion"], 0) + 1
                    if seen[r["emotion"]] > limit:
                        continue
                kept.append(r)
            rows = kept
    for r in rows:
        r["split"] = "ident" if r["speaker"] in cfg["ident_speakers"] else "eval"
    return rows


def read_emobox(cfg: dict[str, Any], **_: Any) -> list[dict[str, str]]:
    """EmoBox-style jsonl manifests (`key, wav, emo, ...`): one for identification, one for evaluation.

    A line whose wav is missing reaches `check_audio` and is reported there as bad audio.
    """
    label_map: dict[str, str] = cfg["emotions"]
    rows = []
    for split, key in (("ident", "ident_manifest"), ("eval", "eval_manifest")):
        path = Path(cfg[key])
        if not path.exists():
            raise DataError(f"datasets: {key} {path} does not exist")
        base = Path(cfg.get("wav_root") or path.parent)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n}: not valid JSON") from None
            for field in ("key", "wav", "emo"):
                if field not in d:
                    raise DataError(f"{path}:{n}: missing field {field!r}")
            if d["emo"] not in label_map:
                raise DataError(f"{path}:{n}: emotion {d['emo']!r} not in datasets.*.emotions {sorted(label_map)}")
            wav = Path(d["wav"])
            rows.append(
                {
                    "key": d["key"],
                    "wav": str(wav if wav.is_absolute() else base / wav),
                    "speaker": str(d.get("speaker", d["key"].rsplit("_", 1)[0])),
                    "emotion": label_map[d["emo"]],
                    "text": d.get("text", ""),
                    "split": split,
                    "source": f"{path}:{n}",
                }
            )
        if split == "eval" and cfg.get("eval_per_emotion"):
            ev = [r for r in rows if r["split"] == "eval"]
            rows = [r for r in rows if r["split"] != "eval"] + balanced_sample(
                ev, cfg["eval_per_emotion"], int(cfg.get("eval_sample_seed") or 0), str(path),
                cfg.get("on_too_few", "error"), sorted(set(label_map.values())),
            )
    return rows


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def balanced_sample(
    rows: list[dict[str, str]],
    per_emotion: int | dict[str, int],
    seed: int,
    where: str,
    on_too_few: str = "error",
    emotions: list[str] | None = None,
) -> list[dict[str, str]]:
    """A balanced test set (Paper B: 200/200/500 per emotion on IEMOCAP/MELD/MSP-Podcast): `per_emotion`
    utterances of each emotion (one size for all, or a size per emotion; emotions not named are dropped),
    drawn with `seed` and spread over speakers round-robin (speakers and utterances in seeded hash order, so
    the draw depends on neither manifest order nor sort order).

    An emotion with fewer utterances than asked is a DataError naming the manifest and the emotion, or, with
    `on_too_few: warn`, a logged warning and all of its utterances.
    """
    by_emo: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_emo.setdefault(r["emotion"], []).append(r)
    if isinstance(per_emotion, dict):
        sizes = {str(e): int(n) for e, n in per_emotion.items()}
        known = set(emotions or by_emo)
        unknown = sorted(set(sizes) - known)
        if unknown:
            raise DataError(f"eval_per_emotion names {unknown}, which are not emotions of {where} ({sorted(known)})")
    else:
        sizes = dict.fromkeys(sorted(emotions or by_emo), int(per_emotion))
    kept: list[dict[str, str]] = []
    for emo, n in sizes.items():
        have = by_emo.get(emo, [])
        if len(have) < n:
            msg = f"{where}: emotion {emo!r} has {len(have)} utterances but eval_per_emotion asks for {n}"
            if on_too_few != "warn":
                raise DataError(msg + "; lower eval_per_emotion or set on_too_few: warn to keep all of them")
            log.warning("%s; keeping all %d", msg, len(have))
        spk: dict[str, list[dict[str, str]]] = {}
        for r in have:
            spk.setdefault(r["speaker"], []).append(r)
        queues = [sorted(v, key=lambda r: (_rank(seed, r["key"]), r["key"])) for _, v in
                  sorted(spk.items(), key=lambda kv: (_rank(seed, f"speaker:{kv[0]}"), kv[0]))]
        picked: list[dict[str, str]] = []
        depth = 0
        while len(picked) < min(n, len(have)):
            for q in queues:
                if depth < len(q) and len(picked) < n:
                    picked.append(q[depth])
            depth += 1
        kept.extend(picked)
    return kept


READERS = {"esd": read_esd, "emobox": read_emobox}


def read_dataset(
    cfg: dict[str, Any], *, on_unmatched: str = "warn", notes: list[dict[str, str]] | None = None
) -> list[dict[str, str]]:
    """Rows of the configured corpus; an utterance id given twice is refused naming both lines."""
    rows = READERS[cfg["format"]](cfg, on_unmatched=on_unmatched, notes=notes)
    if not rows:
        raise DataError(f"dataset at {cfg.get('root') or cfg.get('ident_manifest')} has no utterances")
    first: dict[str, str] = {}
    for r in rows:
        if r["key"] in first:
            raise DataError(
                f"utterance id {r['key']!r} appears twice: {first[r['key']]} and {r['source']}; ids must be unique"
            )
        first[r["key"]] = r["source"]
    return rows


def build_instances(task: str, tcfg: dict[str, Any], rows: list[dict[str, str]]) -> list[Instance]:
    """EVC: each source-emotion utterance x each target emotion. SER: each utterance, shuffled options."""
    out: list[Instance] = []
    if task == "evc":
        words = tcfg.get("emotion_words") or {}
        src = tcfg["source_emotion"]
        targets = tcfg["target_emotions"]
        for r in rows:
            if r["emotion"] != src:
                continue
            if not r["text"]:
                raise DataError(f"utterance {r['key']} has no transcript; EVC needs one for the content judge")
            for t in targets:
                out.append(
                    Instance(
                        id=f"{r['key']}->{t}", task="evc", wav=r["wav"], speaker=r["speaker"], emotion=r["emotion"],
                        split=r["split"], prompt=evc_prompt(tcfg["prompt"], words.get(t, t)), text=r["text"], target=t,
                    )
                )
    elif task == "ser":
        labels = tcfg["labels"]
        for r in rows:
            if r["emotion"] not in labels:
                continue
            opts = option_order(labels, r["key"], int(tcfg.get("option_seed", 0)))
            out.append(
                Instance(
                    id=r["key"], task="ser", wav=r["wav"], speaker=r["speaker"], emotion=r["emotion"],
                    split=r["split"], prompt=ser_prompt(tcfg["prompt"], opts), text=r["text"], options=opts,
                )
            )
    else:
        raise DataError(f"task {task!r} unknown; expected evc or ser")
    if not out:
        raise DataError(f"task {task}: no instances built (check emotions/labels against the dataset)")
    return out


def shard_of(instance_id: str, n_shards: int) -> int:
    """Stable hash sharding: adding utterances never moves existing ones to another shard."""
    return int(hashlib.sha1(instance_id.encode()).hexdigest(), 16) % n_shards


def check_audio(
    instances: list[Instance],
    dcfg: dict[str, Any],
    *,
    max_seconds: float | None = None,
    notes: list[dict[str, str]] | None = None,
) -> tuple[list[Instance], list[dict[str, str]]]:
    """Open every distinct wav once; bad ones are reported and skipped (or fatal, per data.on_bad_audio).

    Audio longer than `max_seconds` (the model's input window) follows data.on_too_long instead; clipped
    audio (a share of full-scale samples above data.clip_warn_fraction) is kept, warned about and noted.
    """
    from ..io import read_checked

    bad: dict[str, tuple[str, str]] = {}
    clip_warn = dcfg.get("clip_warn_fraction", 0.001)
    for wav in sorted({i.wav for i in instances}):
        try:
            _, _, chk = read_checked(
                wav, expected_sr=dcfg.get("expected_sample_rate"), min_seconds=float(dcfg.get("min_seconds", 0.1)),
                max_seconds=max_seconds,
            )
        except TooLongAudio as e:
            if dcfg.get("on_too_long", "skip") == "error":
                raise DataError(f"{e}; set data.on_too_long: skip to skip such files") from None
            log.warning("skipping audio longer than the model's input window: %s", e)
            bad[wav] = ("too_long", str(e))
            continue
        except AudioError as e:
            if dcfg.get("on_bad_audio", "skip") == "error":
                raise
            log.warning("skipping bad audio: %s", e)
            bad[wav] = ("bad_audio", str(e))
            continue
        if clip_warn is not None and chk.clipped_fraction > float(clip_warn):
            detail = f"{chk.clipped_fraction:.2%} of samples clipped (data.clip_warn_fraction {float(clip_warn):g})"
            log.warning("clipped audio (kept): %s: %s", wav, detail)
            if notes is not None:
                notes.append({"kind": "clipped", "where": wav, "id": "", "detail": detail})
    kept = [i for i in instances if i.wav not in bad]
    return kept, [{"wav": w, "error": m, "kind": k} for w, (k, m) in sorted(bad.items())]


BAD_COLUMNS = ["wav", "error", "kind"]  # kind: bad_audio | too_long
NOTE_COLUMNS = ["kind", "where", "id", "detail"]  # kind: wav_without_transcript | transcript_without_wav | clipped


def issue_counts(bad_audio: str | Path, notes: str | Path | None = None) -> dict[str, int]:
    """Counts for the console and the report: skipped files (too long apart) and notes by kind."""
    from ..io import read_table

    bad = read_table(bad_audio)
    too_long = int((bad["kind"] == "too_long").sum()) if "kind" in bad else 0
    out = {"bad_audio": len(bad) - too_long, "too_long": too_long}
    if notes is not None and Path(notes).exists():
        n = read_table(notes)
        for kind in ("wav_without_transcript", "transcript_without_wav", "clipped"):
            out[kind] = int((n["kind"] == kind).sum()) if "kind" in n else 0
    return out


def issue_summary(tables: dict[str, list[str]]) -> pd.DataFrame:
    """One row per task from its [bad_audio.tsv, warnings.tsv] (missing tables are left out)."""
    rows = []
    for task, paths in tables.items():
        if Path(paths[0]).exists():
            rows.append({"task": task, **issue_counts(*paths), "tables": " ".join(map(str, paths))})
    return pd.DataFrame(rows)


def issue_message(tables: dict[str, list[str]]) -> str:
    """End-of-run console lines: per task, how many files were skipped and how many warnings were noted."""
    df = issue_summary(tables)
    lines = []
    for r in df.to_dict("records"):
        skipped = r["bad_audio"] + r["too_long"]
        unmatched = r.get("wav_without_transcript", 0) + r.get("transcript_without_wav", 0)
        lines.append(
            f"emotion-neurons {r['task']}: {skipped} audio file(s) skipped ({r['bad_audio']} bad, {r['too_long']} "
            f"longer than the model's input window), {unmatched} wav/transcript line(s) without a partner skipped, "
            f"{r.get('clipped', 0)} clipped file(s) kept; see {r['tables']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..config import load_params

    ap = argparse.ArgumentParser(description="Stage 0: build the task's instance manifest")
    ap.add_argument("--params", required=True, help="JSON with task, task config, dataset config, data config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bad", required=True, help="TSV of skipped utterances")
    ap.add_argument("--warnings", default=None, help="TSV of unmatched wavs/lines and clipped audio")
    a = ap.parse_args(argv)
    p = load_params(a.params)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    notes: list[dict[str, str]] = []
    rows = read_dataset(p["dataset"], on_unmatched=p["data"].get("on_unmatched", "warn"), notes=notes)
    inst = build_instances(p["task"], p["task_cfg"], rows)
    inst, bad = check_audio(inst, p["data"], max_seconds=p.get("max_audio_seconds"), notes=notes)
    if not inst:
        raise DataError("every utterance was rejected; see the bad-audio table")
    write_table(a.bad, pd.DataFrame(bad, columns=BAD_COLUMNS))
    if a.warnings:
        write_table(a.warnings, pd.DataFrame(notes, columns=NOTE_COLUMNS))
    write_jsonl(a.out, [i.to_dict() for i in inst])
    n_id = sum(i.split == "ident" for i in inst)
    log.info(
        "%d instances (%d identification, %d evaluation), %d bad files skipped, %d warnings",
        len(inst), n_id, len(inst) - n_id, len(bad), len(notes),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
