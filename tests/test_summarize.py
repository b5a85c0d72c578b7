"""Stage 4c (summarize): EVC summary tables from a hand-computed judged table."""

from __future__ import annotations

import pandas as pd
import pytest

from emotion_neurons.stages.metrics import summarize

BASE = {"condition": "baseline", "selector": "none", "r": 0.0, "intervention": "none", "alpha": 0.0, "mask_seed": 0}
STEER = {
    "condition": "lap-r0.005-steer-a1", "selector": "lap", "r": 0.005, "intervention": "steer", "alpha": 1.0,
    "mask_seed": 0,
}
# (source, target, pred, empty, word edits, reference words, refusal, target_prob)
ROWS = {
    "baseline": [
        ("0016_000001", "angry", "angry", False, 0, 6, False, 0.7),  # success
        ("0016_000001", "happy", "neutral", False, 1, 6, False, 0.2),  # not converted
        ("0016_000002", "angry", "angry", False, 1, 2, False, 0.6),  # content lost (WER 0.5)
        ("0016_000002", "happy", "", True, 2, 2, False, 0.0),  # no audio: all deletions, WER 1.0
    ],
    "steer": [
        ("0016_000001", "angry", "angry", False, 0, 6, False, 0.9),  # success
        ("0016_000001", "happy", "happy", False, 9, 6, False, 0.8),  # long hypothesis: WER 1.5, not capped
        ("0016_000002", "angry", "angry", False, 0, 2, True, 0.9),  # refusal
        ("0016_000002", "happy", "happy", False, 0, 2, False, 0.7),  # success
    ],
}


def _judged() -> pd.DataFrame:
    recs = []
    for name, cond in (("baseline", BASE), ("steer", STEER)):
        for src, tgt, pred, empty, edits, n_ref, refusal, prob in ROWS[name]:
            recs.append(
                {
                    **cond, "id": f"{src}->{tgt}", "task": "evc", "wav": f"/d/{src}.wav", "speaker": src[:4],
                    "emotion": "neutral", "split": "eval", "text": "x", "target": tgt, "status": "ok",
                    "pred": pred, "empty": empty, "wer_edits": edits, "ref_words": n_ref,
                    "wer": edits / n_ref, "cer": edits / n_ref, "refusal": refusal, "target_prob": prob,
                }
            )
    bad = {**recs[0], "id": "0016_000003->angry", "status": "bad_audio: x.wav: silent"}  # never summarised
    return pd.DataFrame([*recs, bad])


def test_evc_summary_hand_computed() -> None:
    tables = summarize("evc", _judged(), wer_max=0.1, n_boot=50, seed=0)
    s = tables["summary"].set_index(["condition", "target"])
    cols = list(tables["summary"].columns)
    assert cols.index("corpus_wer") == cols.index("wer") + 1  # reported side by side
    expected = {
        # target: (n, target_acc, target_prob, wer mean, corpus wer, refusal rate, joint success rate)
        ("baseline", "angry"): (2, 1.0, 0.65, 0.25, 1 / 8, 0.0, 0.5),
        ("baseline", "happy"): (2, 0.0, 0.1, (1 / 6 + 1.0) / 2, 3 / 8, 0.0, 0.0),
        ("baseline", "all"): (4, 0.5, 0.375, (0 + 1 / 6 + 0.5 + 1.0) / 4, 4 / 16, 0.0, 0.25),
        ("lap-r0.005-steer-a1", "angry"): (2, 1.0, 0.9, 0.0, 0.0, 0.5, 0.5),
        ("lap-r0.005-steer-a1", "happy"): (2, 1.0, 0.75, 0.75, 9 / 8, 0.0, 0.5),
        ("lap-r0.005-steer-a1", "all"): (4, 1.0, 0.825, 0.375, 9 / 16, 0.25, 0.5),
    }
    assert sorted(s.index) == sorted(expected)
    metrics = ["n", "target_acc", "target_prob", "wer", "corpus_wer", "refusal_rate", "success_rate"]
    for key, values in expected.items():
        got = tuple(s.loc[key, m] for m in metrics)
        assert got == pytest.approx(values), key


def test_summarize_main_writes_tables_and_names_bad_file(tmp_path) -> None:
    import json

    from emotion_neurons.io import read_table, write_table
    from emotion_neurons.stages import metrics as summarize_mod

    judged = _judged()
    write_table(tmp_path / "judged-0.tsv", judged)
    params = json.dumps({"task": "evc", "wer_max": 0.1, "bootstrap": 20, "seed": 0})
    out = tmp_path / "metrics"
    assert summarize_mod.main(["--params", params, "--judged", str(tmp_path / "judged-0.tsv"), "--outdir", str(out)]) == 0
    s = read_table(out / "summary.tsv").set_index(["condition", "target"])
    assert s.loc[("lap-r0.005-steer-a1", "all"), "corpus_wer"] == pytest.approx(9 / 16)
    assert s.loc[("lap-r0.005-steer-a1", "all"), "wer"] == pytest.approx(0.375)

    # A judged table without edit counts cannot give a corpus WER: say so, naming the file.
    write_table(tmp_path / "judged-1.tsv", judged.drop(columns=["wer_edits"]))
    with pytest.raises(ValueError, match=r"judged-1\.tsv.*wer_edits"):
        summarize_mod.main(["--params", params, "--judged", str(tmp_path / "judged-1.tsv"), "--outdir", str(out)])
    with pytest.raises(ValueError, match="wer_edits"):
        summarize("evc", judged.drop(columns=["wer_edits"]), wer_max=0.1, n_boot=10, seed=0)
