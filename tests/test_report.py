"""The report shows the numbers of the tables it is given, escapes what it did not write, and says why a
section is missing (issue 12)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from report_run import NASTY, PLANTED, make_run

from emotion_neurons.stages import report


def _section(page: str, fid: str) -> str:
    m = re.search(rf'<section class="fig[^"]*" id="{re.escape(fid)}">(.*?)</section>', page, re.S)
    assert m, f"section {fid} missing"
    return m.group(1)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return report.build(make_run(root), root / "results" / "demo" / "report.html")


def test_headline_shows_planted_causal_signature(page):
    head = _section(page, "ser-headline")
    # the best selector is the one with the largest ESS over its random control: the planted cas row
    assert "cas r=0.05 deactivate" in head
    assert f"ΔESS {PLANTED['ESS']:.1f} [{PLANTED['ESS_lo']:.1f}, {PLANTED['ESS_hi']:.1f}]" in head
    assert "(mean of 2 seeds)" in head
    evc = _section(page, "evc-headline")
    assert "paired difference <span class='num' data-key='best-vs-random'>75.0 [50.0, 95.0]</span> points" in evc
    # corpus WER of the baseline: 16 edits / 48 words
    assert re.search(r"corpus WER: <b class='num' data-key='baseline-corpus WER'>0\.333 \[", evc)
    # target realised only where the target is the judged "neutral": 2 of 8 sources, WER 1/3 <= wer_max 0.4
    assert "target accuracy: <b class='num' data-key='baseline-target accuracy'>25.0 [" in evc
    assert "success: <b class='num' data-key='baseline-success'>25.0 [" in evc


def test_baseline_interval_from_utterances(page):
    head = _section(page, "ser-headline")
    m = re.search(r"data-key='baseline-WA'>([\d.]+) \[([\d.]+), ([\d.]+)\]", head)
    assert m
    v, lo, hi = map(float, m.groups())
    assert v == 75.0
    # binomial standard error of 300/400 is 2.17 points: the 95% bootstrap interval is about +-4.2
    se = 100 * np.sqrt(0.75 * 0.25 / 400)
    assert abs((v - lo) - 1.96 * se) < 1.0 and abs((hi - v) - 1.96 * se) < 1.0


def test_bootstrap_degenerate_and_known():
    y = np.ones(50)
    lo, hi = report.bootstrap_ci(lambda i: float(y[i].mean()), 50, 200, 0)
    assert lo == hi == 1.0
    assert np.isnan(report.bootstrap_ci(lambda i: 0.0, 0, 10, 0)[0])


def test_transcript_is_escaped(page):
    audio = _section(page, "evc-audio")
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in audio
    assert NASTY not in page


def test_audio_is_embedded_and_stratified(page):
    audio = _section(page, "evc-audio")
    # one source per target emotion (audio_per_emotion 1): 4 rows x (source, baseline, steered)
    assert audio.count("<audio controls") == 12
    assert audio.count('src="data:audio/wav;base64,') == 12
    assert "(p<sub>target</sub> = 0.90)" in audio and "(p<sub>target</sub> = 0.20)" in audio
    # spread over both unseen speakers
    assert "<td>0016</td>" in audio and "<td>0017</td>" in audio


def test_section_without_data_is_absent_and_says_why(page):
    r = _section(page, "ser-sens-r")
    assert "<img" not in r and "this run has 1 value(s) of r (0.05)" in r and "select.r" in r
    c = _section(page, "ser-sens-c")
    assert "Not shown" in c and "no c_sweep table" in c
    assert "<img" not in _section(page, "ser-sens-alpha")


def test_r_sweep_is_drawn_when_present(tmp_path):
    page = report.build(make_run(tmp_path, rs=(0.02, 0.05)), tmp_path / "r.html")
    sec = _section(page, "ser-sens-r")
    assert "Not shown" not in sec and sec.count("data:image/png;base64") == 1


def test_selector_comparison_and_change_matrices(page):
    sel = _section(page, "ser-selectors")
    assert sel.count("data:image/png") == 1
    # every paired difference with its interval, the planted one included
    assert "<td>12.5 [3.3, 20.7]</td>" in sel and "<td>2.0 [-1.0, 5.0]</td>" in sel
    assert "<td>75.0 [50.0, 95.0]</td>" in _section(page, "evc-selectors")
    assert "Selector comparison" in page
    # change matrices: cas, mad and their random controls
    assert _section(page, "ser-change").count("data:image/png") == 4


def test_overlap_between_tasks_is_hand_computed(page):
    sec = _section(page, "overlap")
    # mad: ser picks neurons {1, 2}, evc {0, 1} of layer 0 -> Jaccard 1/3; cas is identical -> 1
    assert "<td>mad-r0.05</td>\n      <td>angry</td>\n      <td>0.333</td>" in sec
    assert "<td>cas-r0.05</td>\n      <td>angry</td>\n      <td>1.000</td>" in sec


def test_jaccard():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([0, 1, 1, 0], bool)
    assert report.jaccard(a, b) == pytest.approx(1 / 3)
    assert report.jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 0.0


def test_provenance_lists_skipped_audio_and_kept(page):
    prov = page[page.index("id='provenance'"):]
    assert "1 file(s) skipped." in prov and "/data/broken0.wav" in prov
    assert "identification instances kept per emotion" in prov
    assert "abc123" in prov and "numpy" in prov


def test_raw_tables_collapsed_with_links(page):
    raw = page[page.index("id='raw'"):]
    assert raw.count("<details>") == 6  # ser: 4 tables, evc: 2
    assert "<a href='ser/metrics/vs_random.tsv'>" in raw


def test_main_writes_page(tmp_path, capsys):
    from emotion_neurons.config import dumps

    params = make_run(tmp_path)
    out = tmp_path / "results" / "demo" / "report.html"
    assert report.main(["--params", dumps(params), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert str(out.resolve()) in capsys.readouterr().out


def test_interval_table_shows_new_statistics_and_row_kinds():
    import pandas as pd

    base = {"condition": "cas-r0.1-deactivate", "selector": "cas", "r": 0.1, "intervention": "deactivate",
            "alpha": 1.0, "mask_seed": 0, "random_condition": "random-cas-r0.1-deactivate", "mask_emotion": "mean",
            "n_seeds": 5}
    vr = pd.DataFrame([{**base, "measure": m, "RCE": v, "RCE_lo": v - 1, "RCE_hi": v + 1} for m, v in
                       (("accuracy", -4.0), ("gold_prob", -7.5))])
    html = report.interval_table("ser", vr)
    assert "<td>accuracy</td>" in html and "<td>gold_prob</td>" in html
    assert "<td>-4.0 [-5.0, -3.0]</td>" in html and "<td>-7.5 [-8.5, -6.5]</td>" in html and "ΔRCE" in html


def test_only_the_configs_masks_are_shown(tmp_path):
    params = make_run(tmp_path) | {"masks": ["cas-r0.05"]}  # mad-r0.05 is a leftover of another grid
    page = report.build(params, tmp_path / "r.html")
    layers = _section(page, "ser-layers")
    assert 'alt="cas-r0.05"' in layers and "mad-r0.05" not in layers


def test_empty_transcript_is_empty_not_nan(tmp_path):
    import pandas as pd

    from emotion_neurons.io import write_table

    d = tmp_path / "evc" / "eval" / "group-3" / "judged-0"
    write_table(d / "baseline.tsv", pd.DataFrame({"id": ["0016_1->sad"], "speaker": ["0016"], "asr_text": [""],
                                                  "pred": [""], "text": ["hi"]}))
    t = report._read_judged(tmp_path / "evc", "baseline")
    assert t.loc[0, "asr_text"] == "" and t.loc[0, "pred"] == "" and t.loc[0, "speaker"] == "0016"
    assert report.fmt_ci(-0.0001, -0.0002, 0.0, 100) == "0.0 [0.0, 0.0]"


def test_injection_section_renders_the_metrics_table():
    import pandas as pd

    inj = pd.DataFrame([{"condition": "lap-r0.05-two_pass-a1", "selector": "lap", "r": 0.05, "intervention": "two_pass",
                         "alpha": 1.0, "mask_seed": 0, "control_of": "", "n": 4, "WA": 0.75, "UAR": 0.75,
                         "WA_base": 0.25, "UAR_base": 0.25, "dWA": 0.5, "dWA_lo": 0.25, "dWA_hi": 0.75, "dUAR": 0.5,
                         "dUAR_lo": 0.2, "dUAR_hi": 0.8, "first_pred_acc": 0.75, "first_from_answer": 0.5},
                        {"condition": "lap-r0.05-union-a1", "selector": "lap", "r": 0.05, "intervention": "union",
                         "alpha": 1.0, "mask_seed": 0, "control_of": "", "n": 4, "WA": 0.5, "UAR": 0.5,
                         "WA_base": 0.25, "UAR_base": 0.25, "dWA": 0.25, "dWA_lo": 0.0, "dWA_hi": 0.5, "dUAR": 0.25,
                         "dUAR_lo": 0.0, "dUAR_hi": 0.5, "first_pred_acc": float("nan"),
                         "first_from_answer": float("nan")}])
    html = report.injections({"tables": {"injections": inj}})
    assert 'id="ser-agnostic"' in html and "absent" not in html
    assert "lap r=0.05 two_pass a=1" in html and "lap r=0.05 union a=1" in html
    assert re.search(r"<td>75\.0</td>\s*<td>50\.0 \[25\.0, 75\.0\]</td>", html)  # WA, then its change
    assert "50.0 [20.0, 80.0]" in html and "75.0 %" in html and "50.0 %" in html and "n/a" in html
    none = report.injections({"tables": {}})
    assert "absent" in none and "evaluate.interventions" in none


def _stacked(t, settings):
    """`t` once per (ident, c, filtered, ESS shift): tables as emotion_neurons.stages.sweep writes them."""
    import pandas as pd

    return pd.concat([t.assign(ident=i, c=c, filtered=f, ESS=t["ESS"] + d) for i, c, f, d in settings], ignore_index=True)


def test_c_sweep_and_filter_ablation_are_drawn_when_present(tmp_path):
    from emotion_neurons.io import read_table, write_table

    params = make_run(tmp_path)
    m = tmp_path / "results" / "demo" / "ser" / "metrics"
    eff = read_table(m / "effects_by_selector.tsv")
    write_table(m / "c_sweep.tsv", _stacked(eff, [("c10-filtered", 10, True, 0.0), ("c50-filtered", 50, True, 5.0)]))
    write_table(m / "filter_ablation.tsv", _stacked(eff, [("c10-filtered", 10, True, 0.0),
                                                         ("c10-unfiltered", 10, False, -7.0)]))
    page = report.build(params, tmp_path / "c.html")
    c = _section(page, "ser-sens-c")
    assert "Not shown" not in c and c.count("data:image/png;base64") == 1
    f = _section(page, "ser-sens-filter")
    # cas r=0.05 deactivate: ESS 15 [12, 18] filtered; the unfiltered row planted 7 lower (interval unshifted)
    assert "<td>15 [12, 18]</td>" in f and "<td>8 [12, 18]</td>" in f
    assert "Not shown" in _section(page, "evc-sens-c")


def test_main_sections_show_the_primary_setting_only(tmp_path):
    from emotion_neurons.io import read_table, write_table

    params = make_run(tmp_path)
    m = tmp_path / "results" / "demo" / "ser" / "metrics"
    for name in ("vs_random", "effects_by_selector"):
        t = read_table(m / f"{name}.tsv")
        write_table(m / f"{name}.tsv", _stacked(t, [("c10-unfiltered", 10, False, 70.0), ("c10-filtered", 10, True, 0.0)]))
    page = report.build({**params, "ident": "c10-filtered"}, tmp_path / "p.html")
    sel = _section(page, "ser-selectors")
    assert "<td>12.5 [3.3, 20.7]</td>" in sel and "82.5" not in sel
    page = report.build({**params, "ident": "c10-unfiltered"}, tmp_path / "u.html")
    assert "82.5" in _section(page, "ser-selectors")


def test_task_transfer_section(tmp_path):
    from emotion_neurons.io import read_table, write_table

    params = make_run(tmp_path)
    page = report.build(params, tmp_path / "a.html")
    assert "transfer.tasks: false" in _section(page, "ser-transfer-task")
    m = tmp_path / "results" / "demo" / "ser" / "metrics"
    eff = read_table(m / "effects_by_selector.tsv")
    t = _stacked(eff, [("from-evc-c10-filtered", 10, True, -4.0)]).assign(masks_from="evc")
    write_table(m / "task_transfer.tsv", t)
    sec = _section(report.build(params, tmp_path / "b.html"), "ser-transfer-task")
    # cas r=0.05 deactivate: ESS 15 - 4 = 11, interval unshifted
    assert "Not shown" not in sec and "<td>11 [12, 18]</td>" in sec and "<td>evc</td>" in sec


def test_skipped_input_listed_once_in_provenance(tmp_path):
    """Stage 0's skipped input appears in one place (provenance), its counts for every task and transfer
    dataset, the file list collapsed: before, a counts table above the task sections repeated the listing."""
    params = make_run(tmp_path)
    stage1 = params["stage1"]
    params["data_tables"] = {t: [f"{d}/bad_audio.tsv", f"{d}/warnings.tsv"] for t, d in stage1.items()}
    page = report.build(params, tmp_path / "results" / "demo" / "report.html")
    assert page.count("Input skipped or warned about") == 1
    assert page.index("Input skipped or warned about") > page.index("id='provenance'")
    prov = page[page.index("id='provenance'"):page.index("id='raw'")]
    assert "<td>ser</td>" in prov and "<td>evc</td>" in prov  # the counts table
    assert prov.count("1 file(s) skipped.") == 2 and prov.count("/data/broken0.wav") == 2
