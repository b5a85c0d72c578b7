"""Corpus readers (ESD layout, EmoBox jsonl) and task instance builders (stage 0: prepare)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .io import AudioError, load_audio, write_jsonl, write_table
from .prompts import evc_prompt, option_order, ser_prompt
from .types import Instance

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset problem, with the file or config key named."""


def read_esd(cfg: dict[str, Any]) -> list[dict[str, str]]:
    """Utterances of an ESD-layout corpus: <root>/<spk>/<spk>.txt and <root>/<spk>/<Emotion>/**/<id>.wav."""
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
        wavs = {p.stem: p for p in (root / spk).rglob("*.wav")}
        raw = txt.read_bytes()
        for enc in ("utf-8", "utf-16", "gbk"):
            try:
                lines = raw.decode(enc).splitlines()
                break
            except UnicodeDecodeError:
                continue
        else:
            raise DataError(f"{txt}: cannot decode transcript")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise DataError(f"{txt}:{n}: expected 'id<TAB>text<TAB>Emotion', got {line!r}")
            uid, text, emo = (p.strip() for p in parts)
            if emo not in emotions:
                raise DataError(f"{txt}:{n}: emotion {emo!r} not in datasets.*.emotions {sorted(emotions)}")
            if uid not in wavs:
                raise DataError(f"{txt}:{n}: no wav file for utterance {uid} under {root / spk}")
            rows.append({"key": uid, "wav": str(wavs[uid]), "speaker": spk, "emotion": emotions[emo], "text": text})
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


def read_emobox(cfg: dict[str, Any]) -> list[dict[str, str]]:
    """EmoBox-style jsonl manifests (`key, wav, emo, ...`): one for identification, one for evaluation."""
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
                }
            )
    return rows


READERS = {"esd": read_esd, "emobox": read_emobox}


def read_dataset(cfg: dict[str, Any]) -> list[dict[str, str]]:
    rows = READERS[cfg["format"]](cfg)
    if not rows:
        raise DataError(f"dataset at {cfg.get('root') or cfg.get('ident_manifest')} has no utterances")
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


def check_audio(instances: list[Instance], dcfg: dict[str, Any]) -> tuple[list[Instance], list[dict[str, str]]]:
    """Open every distinct wav once; bad ones are reported and skipped (or fatal, per data.on_bad_audio)."""
    bad: dict[str, str] = {}
    for wav in sorted({i.wav for i in instances}):
        try:
            load_audio(
                wav, 16000, expected_sr=dcfg.get("expected_sample_rate"), min_seconds=float(dcfg.get("min_seconds", 0.1))
            )
        except AudioError as e:
            if dcfg.get("on_bad_audio", "skip") == "error":
                raise
            log.warning("skipping bad audio: %s", e)
            bad[wav] = str(e)
    kept = [i for i in instances if i.wav not in bad]
    return kept, [{"wav": w, "error": m} for w, m in sorted(bad.items())]


def main(argv: list[str] | None = None) -> int:
    from .config import load_params

    ap = argparse.ArgumentParser(description="Stage 0: build the task's instance manifest")
    ap.add_argument("--params", required=True, help="JSON with task, task config, dataset config, data config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bad", required=True, help="TSV of skipped utterances")
    a = ap.parse_args(argv)
    p = load_params(a.params)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    rows = read_dataset(p["dataset"])
    inst = build_instances(p["task"], p["task_cfg"], rows)
    inst, bad = check_audio(inst, p["data"])
    if not inst:
        raise DataError("every utterance was rejected; see the bad-audio table")
    import pandas as pd

    write_table(a.bad, pd.DataFrame(bad, columns=["wav", "error"]))
    write_jsonl(a.out, [i.to_dict() for i in inst])
    n_id = sum(i.split == "ident" for i in inst)
    log.info("%d instances (%d identification, %d evaluation), %d bad files", len(inst), n_id, len(inst) - n_id, len(bad))
    return 0


if __name__ == "__main__":
    sys.exit(main())
