"""Stage 2 (and the judging half of stage 4): score generated outputs with external judges.

Judges record raw measures only (predicted emotion and probabilities, WER/CER with the word edit and
reference word counts behind the WER, refusal, empty output); the thresholds that turn them into success live
in `filter.decide`, so changing `filter.wer_max` never re-runs a judge.

The EVC emotion judge decides among ALL of the dataset's emotions, the source emotion included
(:func:`judge_labels`, METHOD.md section 3.2): an unconverted, neutral-sounding output is judged "neutral"
and fails, whatever its target.
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

from ..config import code_version, task_dataset
from ..io import AudioError, load_audio, read_table, write_table
from ..judges import JUDGES
from ..prompts import parse_answer

log = logging.getLogger(__name__)


@JUDGES.register("ser")
class SerJudge:
    """SER: the parsed answer against the gold label (no model needed)."""

    def __init__(self, cfg: dict[str, Any], labels: list[str]) -> None:
        self.labels = list(labels)

    def __call__(self, outputs: pd.DataFrame, base_dir: Path) -> pd.DataFrame:
        return judge_ser(outputs)


def judge_ser(outputs: pd.DataFrame) -> pd.DataFrame:
    """Parse each answer (digit -> number word -> emotion word) and compare with the gold label."""
    df = outputs.copy()
    ok = df["status"].eq("ok")
    texts = df["output_text"].fillna("").astype(str)
    opts = df["options"].fillna("").astype(str).str.split("|")
    df["pred"] = [parse_answer(t, o) if good else "" for t, o, good in zip(texts, opts, ok, strict=True)]
    df["correct"] = df["pred"].eq(df["emotion"]) & ok
    return df


def judge_labels(config: dict[str, Any], task: str) -> list[str]:
    """The emotions a task's judge decides among.

    EVC: every emotion of the task's dataset -- the source emotion first, then the targets, then any other
    emotion of the dataset -- never the targets alone (METHOD.md 3.2, issue 7 defect 1: with the targets
    only, an output scored 0.90 neutral was judged a successful conversion). SER: the task's labels.
    """
    tcfg = config["tasks"][task]
    if task != "evc":
        return list(tcfg["labels"])
    dataset = task_dataset(config, task)
    return list(dict.fromkeys([tcfg["source_emotion"], *tcfg["target_emotions"], *dataset["emotions"].values()]))


def params(config: dict[str, Any], task: str, cond: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameters of a judge job (the judge rules pass them as sorted JSON); EVC label map checked here."""
    labels = judge_labels(config, task)
    if task == "evc":
        from ..judges import check_label_map

        check_label_map(labels, config["judges"]["emotion"]["label_map"])
    return {
        "task": task,
        "judges": config["judges"] if task == "evc" else {},
        "labels": labels,
        "condition": cond,
        "code": code_version("judge"),
    }


@JUDGES.register("evc")
class EvcJudge:
    """emotion2vec (target emotion) + faster-whisper (content) + refusal detection for EVC outputs.

    ``labels``: all of the dataset's emotions (:func:`judge_labels`); every row's source emotion and
    target must be among them, or the judge refuses to run (naming the instance).
    """

    def __init__(self, cfg: dict[str, Any], labels: list[str]) -> None:
        from ..judges import AsrJudge, EmotionJudge, check_label_map

        ecfg, acfg = cfg["emotion"], cfg["asr"]
        self.label_map: dict[str, str] = dict(ecfg["label_map"])
        self.labels = list(labels)
        self.e2v_index = check_label_map(self.labels, self.label_map)
        self.restrict = bool(ecfg.get("restrict_to_dataset_labels", True))
        self.inverse = {self.label_map[e]: e for e in self.labels}
        self.emotion = EmotionJudge(ecfg["model"], device=_device(ecfg.get("device", "auto")))
        self.asr = AsrJudge(
            acfg["model"],
            device=_device(acfg.get("device", "auto")),
            compute_type=acfg.get("compute_type", "default"),
            language=acfg.get("language"),
            beam_size=int(acfg.get("beam_size", 5)),
            max_new_tokens=acfg.get("max_new_tokens"),
        )

    def _check_row(self, row: dict[str, Any]) -> None:
        for key, what in (("target", "target"), ("emotion", "source emotion")):
            value = row.get(key)
            if value not in self.labels:
                raise ValueError(
                    f"instance {row.get('id')!r}: its {what} {value!r} is not among the judge's labels "
                    f"{self.labels}; the emotion judge must decide among all of the dataset's emotions, the "
                    "source emotion included (METHOD.md 3.2), or an unconverted output could pass"
                )

    def emotion_decision(self, probs: np.ndarray, target: str) -> tuple[str, float]:
        """(predicted dataset emotion, probability of the target) from one [9] emotion2vec vector."""
        from ..judges import EMOTION2VEC_LABELS, restricted_argmax

        if self.restrict:
            winners, renorm = restricted_argmax(probs[None, :], self.labels, self.label_map)
            return winners[0], float(renorm[0, self.labels.index(target)])
        e2v = EMOTION2VEC_LABELS[int(np.argmax(probs))]
        return self.inverse.get(e2v, e2v), float(probs[self.e2v_index[self.labels.index(target)]])

    def __call__(self, outputs: pd.DataFrame, base_dir: Path) -> pd.DataFrame:
        from ..judges import cer, is_refusal, word_errors

        records = []
        for row in tqdm(outputs.to_dict("records"), desc="judge", file=sys.stderr, mininterval=5):
            self._check_row(row)
            rec: dict[str, Any] = {"pred": "", "target_prob": 0.0, "asr_text": "", "empty": True}
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
                    rec["pred"], rec["target_prob"] = self.emotion_decision(probs, str(row["target"]))
                    rec["asr_text"] = self.asr.transcribe(wav, 16000)
                    rec["refusal"] = rec["refusal"] or is_refusal(rec["asr_text"])
            # No usable output = the empty hypothesis: every reference word deleted, WER exactly 1.0. Real
            # WER is never capped (insertions can take it above 1), so the two are on one scale.
            try:
                edits, n_ref = word_errors(str(row["text"]), rec["asr_text"])
                rec["cer"] = cer(str(row["text"]), rec["asr_text"])
            except ValueError as e:
                raise ValueError(f"instance {row.get('id')!r}: {e}") from None
            rec.update(wer=edits / n_ref, wer_edits=edits, ref_words=n_ref)
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


def judge_table(
    task: str, outputs_path: str | Path, cfg: dict[str, Any], labels: list[str], evc: EvcJudge | None = None
) -> pd.DataFrame:
    """Judged rows of one outputs.tsv; `evc`: judges already loaded (a grouped judge job loads them once)."""
    outputs = read_table(outputs_path)
    if outputs.empty:
        return outputs
    judge = evc if evc is not None else JUDGES[task](cfg, labels)
    return judge(outputs, Path(outputs_path).parent)


def main(argv: list[str] | None = None, evc: EvcJudge | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["group"]:  # the rule's entry point: a group of conditions, one model load
        from ..config import load_params
        from ..group import parse_group_args

        a = parse_group_args("judge", argv[1:])
        judge_group(load_params(a.params), a.evaluated, a.cache, a.out)
        return 0
    ap = argparse.ArgumentParser(description="Stage 2: judge generated outputs")
    ap.add_argument("--params", required=True)
    ap.add_argument("--outputs", required=True, help="outputs.tsv of a shard")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from ..config import load_params

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_params(a.params)
    df = judge_table(p["task"], a.outputs, p["judges"], p["labels"], evc)
    for k, v in (p.get("condition") or {}).items():
        df[k] = v
    write_table(a.out, df)
    log.info("judged %d outputs", len(df))
    return 0


def judge_group(p: dict[str, Any], evaluated: str, cache: str, out: str) -> dict[str, int]:
    """Judge `evaluated/<condition>/outputs.tsv` of every condition into `out/<condition>.tsv`."""
    from ..config import dumps, short_hash
    from ..group import check_unique, link_tree, result_params, tree_sha
    from ..io import atomic_dir

    conds = p["conditions"]
    check_unique(conds, "judge group params")
    evc = None
    n = {"conditions": len(conds), "cached": 0, "computed": 0, "judge_loads": 0}
    with atomic_dir(out) as tmp:
        for cond in conds:
            cp = {**p["common"], "condition": cond}
            src = Path(evaluated) / cond["condition"]
            if not (src / "outputs.tsv").exists():
                raise FileNotFoundError(f"condition {cond['condition']!r}: {src}/outputs.tsv does not exist")
            hit = Path(cache) / f"{short_hash({'params': result_params(cp), 'evaluated': tree_sha(src)}, 32)}.tsv"
            if hit.is_file():
                n["cached"] += 1
            else:
                if cp["task"] == "evc" and evc is None:
                    evc = EvcJudge(cp["judges"], cp["labels"])
                    n["judge_loads"] += 1
                main(["--params", dumps(cp), "--outputs", str(src / "outputs.tsv"), "--out", str(hit)], evc=evc)
                n["computed"] += 1
            link_tree(hit, tmp / f"{cond['condition']}.tsv")
    log.info("group done: %s", n)
    return n


if __name__ == "__main__":
    from ..retry import run_stage

    sys.exit(run_stage(main))
