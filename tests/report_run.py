"""A hand-made run directory for the report tests: metric tables with planted numbers, judged rows, masks, wavs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from emotion_neurons.io import write_table, write_wav
from emotion_neurons.selectors import save_mask

EMOS = ["angry", "happy", "neutral", "sad"]
#: Planted headline numbers (points): the SER best selector's paired difference to its random control.
PLANTED = {"ESS": 12.5, "ESS_lo": 3.3, "ESS_hi": 20.7}
NASTY = '<script>alert("x")</script> & <b>bold</b>'


def _cond(sel: str, r: float, iv: str, alpha: float = 1.0, seed: int = 0, ctl: str = "") -> dict:
    head = f"random-{ctl}" if sel == "random" else sel
    cid = f"{head}-r{r:g}-{iv}" + (f"-a{alpha:g}" if iv == "steer" else "")
    return {"condition": cid, "selector": sel, "r": r, "intervention": iv, "alpha": alpha, "mask_seed": seed,
            "control_of": ctl}


def _tone(path: Path, freq: float) -> None:
    t = np.arange(1600) / 16000
    write_wav(path, (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)


def make_run(root: Path, rs: tuple[float, ...] = (0.05,), wa_correct: int = 300, n_ser: int = 400,
             bad_rows: int = 1) -> dict:
    """Write run `root/results/demo` and return the report params for it."""
    run = root / "results" / "demo"
    stage1 = {t: root / "cache" / t for t in ("ser", "evc")}
    # ---------------- SER
    ser = run / "ser"
    eff, vr, change = [], [], []
    for r in rs:
        for sel in ("cas", "mad"):
            c = _cond(sel, r, "deactivate")
            rc = _cond("random", r, "deactivate", seed=-1, ctl=sel) | {"condition": f"random-{sel}-r{r:g}-deactivate"}
            for cond, ess in ((c, 10.0 + 100 * r), (rc, 1.0)):
                for e in [*EMOS, "mean"]:
                    eff.append({**cond, "mask_emotion": e, "SE": ess, "SE_lo": ess - 2, "SE_hi": ess + 2, "ACE": 0.0,
                                "ACE_lo": -1.0, "ACE_hi": 1.0, "ESS": ess, "ESS_lo": ess - 3, "ESS_hi": ess + 3,
                                "n_seeds": 1})
                for e in EMOS:
                    change.append({**cond, "mask_emotion": e, **{g: (-ess if g == e else 0.0) for g in EMOS}})
            planted = sel == "cas" and r == rs[0]
            for e in [*EMOS, "mean"]:
                stats = PLANTED if planted else {"ESS": 2.0, "ESS_lo": -1.0, "ESS_hi": 5.0}
                vr.append({**{k: v for k, v in c.items() if k != "control_of"},
                           "random_condition": rc["condition"], "mask_emotion": e, "SE": 1.0, "SE_lo": 0.0,
                           "SE_hi": 2.0, "ACE": 0.5, "ACE_lo": 0.0, "ACE_hi": 1.0, **stats, "n_seeds": 2})
    write_table(ser / "metrics" / "effects_by_selector.tsv", pd.DataFrame(eff))
    write_table(ser / "metrics" / "vs_random.tsv", pd.DataFrame(vr))
    write_table(ser / "metrics" / "change.tsv", pd.DataFrame(change))
    write_table(ser / "metrics" / "summary.tsv", pd.DataFrame(
        [{**_cond("none", 0.0, "none"), "condition": "baseline", "mask_emotion": "", "n": n_ser,
          "WA": wa_correct / n_ser, "UAR": wa_correct / n_ser}]))
    base = pd.DataFrame({
        "id": [f"u{i}" for i in range(n_ser)], "status": "ok", "mask_emotion": "",
        "emotion": [EMOS[i % 4] for i in range(n_ser)],
        "correct": [1 if i < wa_correct else 0 for i in range(n_ser)],  # planted WA
    })
    write_table(ser / "eval" / "group-0" / "judged-0" / "baseline.tsv", base)
    write_table(ser / "filter" / "summary.tsv", pd.DataFrame({"emotion": EMOS, "kept": [7, 7, 7, 7]}))
    # ---------------- EVC
    evc = run / "evc"
    src = root / "audio"
    rows, steer = [], []
    for i, spk in enumerate(["0016", "0017"]):
        for j, tgt in enumerate(EMOS):
            wav = src / f"{spk}_{j}.wav"
            _tone(wav, 200 + 50 * j + 10 * i)
            rid = f"{spk}_{j}->{tgt}"
            common = {"id": rid, "status": "ok", "speaker": spk, "split": "eval", "emotion": "neutral", "target": tgt,
                      "wav": str(wav), "text": "kids are talking by the door", "output_wav": f"wavs/{rid.replace('>', '')}.wav"}
            # the judge's columns; emotion_ok and success are decided from them as the metrics stage does
            rows.append({**common, "pred": "neutral", "target_prob": 0.2, "asr_text": NASTY, "empty": False,
                         "refusal": False, "wer": 2 / 6, "wer_edits": 2, "ref_words": 6})
            steer.append({**common, "pred": tgt, "target_prob": 0.9, "asr_text": "kids are talking", "empty": False,
                          "refusal": False, "wer": 3 / 6, "wer_edits": 3, "ref_words": 6})
    c = _cond("cas", rs[0], "steer")
    for cond, table in (("baseline", rows), (c["condition"], steer)):
        # the grouped layout (emotion_neurons.group); the group number does not matter to the report
        write_table(evc / "eval" / "group-1" / "judged-0" / f"{cond}.tsv", pd.DataFrame(table))
        for row in table:
            _tone(evc / "eval" / "group-1" / "shard-0" / cond / row["output_wav"], 440)
    dl = []
    for r in rs:
        for sel in ("cas",):
            cc = _cond(sel, r, "steer")
            dl.append({**cc, "target": "all", "metric": "target_acc", "n": 8, "value": 1.0, "baseline": 0.0,
                       "delta": 1.0, "ci_lo": 0.8, "ci_hi": 1.0, "n_seeds": 1, "delta_seed_sd": np.nan})
    write_table(evc / "metrics" / "deltas_by_selector.tsv", pd.DataFrame(dl))
    write_table(evc / "metrics" / "vs_random.tsv", pd.DataFrame(
        [{**{k: v for k, v in c.items() if k != "control_of"}, "random_condition": f"random-cas-r{rs[0]:g}-steer-a1",
          "target": "all", "metric": "target_acc", "n": 8, "value": 1.0, "random": 0.25, "delta": 0.75,
          "ci_lo": 0.5, "ci_hi": 0.95, "n_seeds": 2}]))
    write_table(evc / "filter" / "summary.tsv", pd.DataFrame({"emotion": EMOS, "kept": [3, 3, 3, 3]}))
    # ---------------- masks: cas and mad share 1 of 3 neurons of emotion 0 in layer 0
    for task in ("ser", "evc"):
        m = np.zeros((4, 2, 8), bool)
        m[:, 0, :2] = True
        m2 = np.zeros((4, 2, 8), bool)
        m2[:, 0, 1:3] = True
        for r in rs:
            save_mask(run / task / "masks" / f"cas-r{r:g}.safetensors", m, EMOS, {"selector": "cas", "r": r})
            save_mask(run / task / "masks" / f"mad-r{r:g}.safetensors", m2 if task == "ser" else m, EMOS,
                      {"selector": "mad", "r": r})
    # ---------------- stage-1 bad audio
    for d in stage1.values():
        write_table(d / "bad_audio.tsv", pd.DataFrame(
            {"wav": [f"/data/broken{i}.wav" for i in range(bad_rows)], "reason": ["empty"] * bad_rows}))
    return {"tasks": ["evc", "ser"], "run": str(run), "report": {"title": "Test report", "audio_per_emotion": 1},
            "evaluate": {"bootstrap": 500, "seed": 0, "ci": 0.95}, "stage1": {t: str(d) for t, d in stage1.items()},
            "filter": {"wer_max": 0.4}, "model": "tiny", "config": {"run_name": "demo"}, "code": "abc123"}
