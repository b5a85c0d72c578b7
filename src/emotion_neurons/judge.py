"""Stage 2 (and the judging half of stage 4): score generated outputs with external judges.

Judges record raw measures only (predicted emotion and probabilities, WER/CER, refusal, empty output); the
thresholds that turn them into success live in `filter.decide`, so changing `filter.wer_max` never re-runs a
judge.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from .io import AudioError, load_audio, read_table, write_table
from .prompts import parse_answer

log = logging.getLogger(__name__)


def judge_ser(outputs: pd.DataFrame) -> pd.DataFrame:
    """Parse each answer (digit -> number word -> emotion word) and compare with the gold label."""
    df = outputs.copy()
    ok = df["status"].eq("ok")
    texts = df["output_text"].fillna("").astype(str)
    opts = df["options"].fillna("").astype(str).str.split("|")
    df["pred"] = [parse_answer(t, o) if good else "" for t, o, good in zip(texts, opts, ok, strict=True)]
    df["correct"] = df["pred"].eq(df["emotion"]) & ok
    return df


class EvcJudge:
    """emotion2vec (target emotion) + faster-whisper (content) + refusal detection for EVC outputs."""

    def __init__(self, cfg: dict[str, Any], labels: list[str]) -> None:
        from .judges import EMOTION2VEC_LABELS, AsrJudge, EmotionJudge

        ecfg, acfg = cfg["emotion"], cfg["asr"]
        label_map: dict[str, str] = ecfg["label_map"]
        missing = [e for e in labels if e not in label_map]
        if missing:
            raise KeyError(f"judges.emotion.label_map has no entry for dataset emotions {missing}")
        bad = [v for v in label_map.values() if v not in EMOTION2VEC_LABELS]
        if bad:
            raise KeyError(f"judges.emotion.label_map maps to unknown emotion2vec labels {bad}")
        self.labels = labels
        self.e2v_index = [EMOTION2VEC_LABELS.index(label_map[e]) for e in labels]
        self.restrict = bool(ecfg.get("restrict_to_dataset_labels", True))
        self.all_labels = list(EMOTION2VEC_LABELS)
        self.inverse = {v: k for k, v in label_map.items()}
        self.emotion = EmotionJudge(ecfg["model"], device=_device(ecfg.get("device", "auto")))
        self.asr = AsrJudge(
            acfg["model"],
            device=_device(acfg.get("device", "auto")),
            compute_type=acfg.get("compute_type", "default"),
            language=acfg.get("language"),
            beam_size=int(acfg.get("beam_size", 5)),
            max_new_tokens=acfg.get("max_new_tokens"),
        )

    def __call__(self, outputs: pd.DataFrame, base_dir: Path) -> pd.DataFrame:
        from .judges import cer, is_refusal, wer

        records = []
        for row in tqdm(outputs.to_dict("records"), desc="judge", file=sys.stderr, mininterval=5):
            rec = {"pred": "", "target_prob": 0.0, "wer": 1.0, "cer": 1.0, "asr_text": "", "empty": True}
            text = str(row.get("output_text") or "")
            rec["refusal"] = is_refusal(text)
            wav_rel = row.get("output_wav")
            if row.get("status") == "ok" and isinstance(wav_rel, str) and wav_rel:
                try:
                    wav = load_audio(base_dir / wav_rel, 16000, min_seconds=0.05)
                except AudioError as e:
                    log.warning("%s: output audio unusable: %s", row["id"], e)
                else:
                    rec["empty"] = False
                    probs = self.emotion.score([wav], [16000])[0]
                    if self.restrict:
                        sub = probs[self.e2v_index]
                        sub = sub / max(float(sub.sum()), 1e-12)
                        rec["pred"] = self.labels[int(np.argmax(sub))]
                        rec["target_prob"] = float(sub[self.labels.index(row["target"])])
                    else:
                        e2v = self.all_labels[int(np.argmax(probs))]
                        rec["pred"] = self.inverse.get(e2v, e2v)
                        rec["target_prob"] = float(probs[self.e2v_index[self.labels.index(row["target"])]])
                    rec["asr_text"] = self.asr.transcribe(wav, 16000)
                    rec["wer"] = wer(str(row["text"]), rec["asr_text"])
                    rec["cer"] = cer(str(row["text"]), rec["asr_text"])
                    rec["refusal"] = rec["refusal"] or is_refusal(rec["asr_text"])
            records.append(rec)
        return pd.concat([outputs.reset_index(drop=True), pd.DataFrame(records)], axis=1)


def _device(dev: str) -> str:
    if dev != "auto":
        return dev
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def judge_table(task: str, outputs_path: str | Path, cfg: dict[str, Any], labels: list[str]) -> pd.DataFrame:
    outputs = read_table(outputs_path)
    if outputs.empty:
        return outputs
    if task == "ser":
        return judge_ser(outputs)
    return EvcJudge(cfg, labels)(outputs, Path(outputs_path).parent)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stage 2: judge generated outputs")
    ap.add_argument("--params", required=True)
    ap.add_argument("--outputs", required=True, help="outputs.tsv of a shard")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from .config import load_params

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    df = judge_table(p["task"], a.outputs, p["judges"], p["labels"])
    for k, v in (p.get("condition") or {}).items():
        df[k] = v
    write_table(a.out, df)
    log.info("judged %d outputs", len(df))
    return 0


if __name__ == "__main__":
    from .retry import run_stage

    sys.exit(run_stage(main))
