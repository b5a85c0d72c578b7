"""The listening-test kit: a blinded export with a separate key, and an analysis with hand-computed numbers."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from report_run import make_run
from scipy.stats import beta

from emotion_neurons import listening


@pytest.fixture
def exported(tmp_path):
    params = make_run(tmp_path)
    out = tmp_path / "listen"
    key = listening.export(params["run"], out, per_emotion=2, seed=3)
    return out, key


def _answers(path, set_id, who, choices, words=None):
    doc = {"set": set_id, "listener": who,
           "answers": [{"item": i, "choice": c, "words": (words or {}).get(i, "")} for i, c in choices.items()]}
    path.write_text(json.dumps(doc))
    return path


def test_export_is_blinded_with_separate_key(exported):
    out, key = exported
    page = (out / "listening.html").read_text()
    assert len(key) == 8 and set(key["target"]) == {"angry", "happy", "neutral", "sad"}
    assert set(key["steered"]) <= {"A", "B"} and key["steered"].nunique() == 2  # both orders occur
    assert key["source_id"].nunique() == 8
    # nothing on the page tells which clip is which or where it came from
    for leak in ("steer", "baseline", "0016_", "cas-r"):
        assert leak not in page.split("<script>const ITEMS")[1].split("</script>")[0]
    assert page.count("data:audio/wav;base64,") == 16
    assert pd.read_csv(out / "key.tsv", sep="\t")["item"].tolist() == key["item"].tolist()


def test_analysis_hand_computed(exported, tmp_path):
    out, key = exported
    set_id = key["set"].iloc[0]
    steered = dict(zip(key["item"], key["steered"], strict=True))
    other = {i: "B" if s == "A" else "A" for i, s in steered.items()}
    items = list(key["item"])
    # listener 1 prefers steered on 6 of 8, listener 2 on all 8
    c1 = {i: (steered[i] if k < 6 else other[i]) for k, i in enumerate(items)}
    c2 = dict(steered)
    f1 = _answers(tmp_path / "a1.json", set_id, "ann", c1, {items[0]: "yes", items[1]: "no"})
    f2 = _answers(tmp_path / "a2.json", set_id, "bob", c2)
    ans = listening.load_answers([f1, f2], key)
    res = listening.analyse(key, ans)
    allrow = res["preference"].set_index("target").loc["all"]
    k, n = 14, 16
    assert allrow["n"] == n and allrow["steered_preferred"] == k and allrow["rate"] == pytest.approx(k / n)
    # Clopper-Pearson from the beta quantiles
    assert allrow["ci_lo"] == pytest.approx(beta.ppf(0.025, k, n - k + 1), abs=1e-9)
    assert allrow["ci_hi"] == pytest.approx(beta.ppf(0.975, k + 1, n - k), abs=1e-9)
    assert allrow["n_words"] == 2 and allrow["words_preserved"] == 0.5
    per = res["preference"].set_index("target")
    for t in ("angry", "happy", "neutral", "sad"):
        its = [i for i in items if key.set_index("item").loc[i, "target"] == t]
        exp = sum(c1[i] == steered[i] for i in its) + len(its)
        assert per.loc[t, "steered_preferred"] == exp and per.loc[t, "n"] == 2 * len(its)
    ag = res["agreement"].iloc[0]
    assert ag["n_items_all_listeners"] == 8 and ag["pairwise_agreement"] == pytest.approx(6 / 8)
    # 6 items both "steered", 2 split: P_bar = 6/8, p = (14/16, 2/16), P_e = 200/256 -> kappa = -1/7
    assert ag["fleiss_kappa"] == pytest.approx((6 / 8 - 200 / 256) / (1 - 200 / 256))


def test_fleiss_kappa_hand_example():
    assert listening.fleiss_kappa([[2, 0], [2, 0], [1, 1]]) == pytest.approx(-0.2)
    assert listening.fleiss_kappa([[3, 0], [0, 3]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same number of raters"):
        listening.fleiss_kappa([[2, 0], [1, 0]])


def test_bad_answer_files_are_named(exported, tmp_path):
    _, key = exported
    set_id = key["set"].iloc[0]
    wrong = _answers(tmp_path / "w.json", "other", "x", {})
    with pytest.raises(ValueError, match="w.json: answers are for listening set 'other'"):
        listening.load_answers([wrong], key)
    unknown = _answers(tmp_path / "u.json", set_id, "x", {"item-999": "A"})
    with pytest.raises(ValueError, match="u.json: item 'item-999' is not in the answer key"):
        listening.load_answers([unknown], key)
    a = _answers(tmp_path / "d1.json", set_id, "same", {})
    b = _answers(tmp_path / "d2.json", set_id, "same", {})
    with pytest.raises(ValueError, match="d2.json: listener 'same' appears in more than one"):
        listening.load_answers([a, b], key)


def test_cli_roundtrip(exported, tmp_path, capsys):
    out, key = exported
    f = _answers(tmp_path / "a.json", key["set"].iloc[0], "ann", dict(zip(key["item"], key["steered"], strict=True)))
    assert listening.main(["analyse", "--key", str(out / "key.tsv"), "--answers", str(f), "--out", str(tmp_path / "res")]) == 0
    pref = pd.read_csv(tmp_path / "res" / "preference.tsv", sep="\t").set_index("target")
    assert pref.loc["all", "rate"] == 1.0 and pref.loc["all", "n"] == 8
