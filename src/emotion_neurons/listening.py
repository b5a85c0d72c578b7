"""A blinded A/B listening test of EVC steering (Paper A's human evaluation), offline in a browser (issue 12).

`export` samples (source, target) pairs of unseen speakers, puts the baseline and the steered conversion of
each in random order and writes a self-contained page (audio embedded) plus the answer key in a separate file.
A listener plays both, says which better expresses the target emotion and whether the words of the chosen clip
are preserved, and downloads the answers as a JSON file (progress survives a reload, in localStorage).
`analyse` merges answer files with the key: the rate at which the steered clip was preferred, per emotion and
overall, with a Clopper-Pearson 95% interval, and the agreement between listeners (Fleiss' kappa, pairwise).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import read_table, write_table, write_text

log = logging.getLogger(__name__)

KEY_COLUMNS = ("item", "target", "steered", "source_id", "speaker", "baseline_condition", "steered_condition")


# ------------------------------------------------------------------------------------------ export


def _pairs(run: Path, condition: str | None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    from .stages.report import _read_judged, best_setting

    tdir = run / "evc"
    if condition is None:
        vr = tdir / "metrics" / "vs_random.tsv"
        best = best_setting("evc", {"vs_random": read_table(vr)}) if vr.exists() else None
        if best is None:
            raise ValueError(f"{vr}: no selector condition with a random control; pass --condition")
        condition = str(best["condition"])
    base, steer = _read_judged(tdir, "baseline"), _read_judged(tdir, condition)
    for name, t in (("baseline", base), (condition, steer)):
        if t is None:
            raise FileNotFoundError(f"{tdir / 'eval'}: no group-*/judged-*/{name}.tsv; run the pipeline first")
    return base, steer, condition


def export(run: str | Path, out: str | Path, condition: str | None = None, per_emotion: int = 4,
           seed: int = 0, title: str = "Which voice sounds more like the emotion?") -> pd.DataFrame:
    """Write `out/listening.html` (the blinded page) and `out/key.tsv` (the answer key); return the key."""
    from .stages.report import _out_wav, stratified_sample

    base, steer, cond = _pairs(Path(run), condition)
    b = base[base["status"].eq("ok")]
    if "split" in b.columns:
        b = b[b["split"].astype(str).eq("eval")]
    st = steer[steer["status"].eq("ok")].set_index("id")
    b = b[b["id"].isin(st.index)]
    b = b[[(_out_wav(r) is not None and _out_wav(r).is_file()
            and _out_wav(st.loc[r["id"]]) is not None and _out_wav(st.loc[r["id"]]).is_file())
           for _, r in b.iterrows()]]
    if b.empty:
        raise ValueError(f"{run}: no unseen-speaker source has both a baseline and a {cond!r} conversion with audio")
    sample = stratified_sample(b.reset_index(drop=True), per_emotion, seed)
    rng = np.random.default_rng(seed + 1)
    sample = sample.iloc[rng.permutation(len(sample))]
    items, key = [], []
    for k, (_, r) in enumerate(sample.iterrows()):
        s = st.loc[r["id"]]
        steered_first = bool(rng.integers(0, 2))
        clips = [_out_wav(s), _out_wav(r)] if steered_first else [_out_wav(r), _out_wav(s)]
        item = f"item-{k + 1:03d}"
        items.append({"item": item, "target": str(r["target"]),
                      "a": "data:audio/wav;base64," + base64.b64encode(clips[0].read_bytes()).decode(),
                      "b": "data:audio/wav;base64," + base64.b64encode(clips[1].read_bytes()).decode()})
        key.append({"item": item, "target": str(r["target"]), "steered": "A" if steered_first else "B",
                    "source_id": str(r["id"]), "speaker": str(r["speaker"]), "baseline_condition": "baseline",
                    "steered_condition": cond})
    set_id = hashlib.sha256(json.dumps([(i["item"], i["a"], i["b"]) for i in items]).encode()).hexdigest()[:12]
    key_df = pd.DataFrame(key, columns=list(KEY_COLUMNS)).assign(set=set_id)
    out = Path(out)
    write_text(out / "listening.html", page(items, set_id, title))
    write_table(out / "key.tsv", key_df)
    log.info("listening set %s: %d items -> %s (answer key %s)", set_id, len(items), out / "listening.html",
             out / "key.tsv")
    return key_df


_JS = r"""
const SET = document.body.dataset.set, STORE = 'listening:' + SET;
const state = JSON.parse(localStorage.getItem(STORE) || '{"listener":"","answers":{}}');
const save = () => localStorage.setItem(STORE, JSON.stringify(state));
const who = document.getElementById('listener');
who.value = state.listener;
who.addEventListener('input', () => { state.listener = who.value; save(); });
function progress() {
  const done = ITEMS.filter(it => (state.answers[it.item] || {}).choice).length;
  document.getElementById('progress').textContent = done + ' of ' + ITEMS.length + ' answered';
}
const list = document.getElementById('items');
ITEMS.forEach((it, k) => {
  const a = state.answers[it.item] = state.answers[it.item] || {played: []};
  const div = document.createElement('div');
  div.className = 'item'; div.id = it.item;
  div.innerHTML = '<h3>' + (k + 1) + '. Target emotion: <b></b></h3>' +
    '<p>A <audio controls preload="auto" data-clip="A"></audio> B <audio controls preload="auto" data-clip="B"></audio></p>' +
    '<p>Which better expresses the target emotion? ' +
    '<label><input type="radio" name="' + it.item + '-choice" value="A"> A</label> ' +
    '<label><input type="radio" name="' + it.item + '-choice" value="B"> B</label></p>' +
    '<p>Are the words of the sentence preserved in the clip you chose? ' +
    '<label><input type="radio" name="' + it.item + '-words" value="yes"> yes</label> ' +
    '<label><input type="radio" name="' + it.item + '-words" value="no"> no</label></p>';
  div.querySelector('b').textContent = it.target;
  div.querySelectorAll('audio').forEach(au => {
    au.src = au.dataset.clip === 'A' ? it.a : it.b;
    au.addEventListener('play', () => { if (!a.played.includes(au.dataset.clip)) a.played.push(au.dataset.clip); save(); });
  });
  for (const q of ['choice', 'words']) {
    div.querySelectorAll('input[name="' + it.item + '-' + q + '"]').forEach(inp => {
      if (a[q] === inp.value) inp.checked = true;
      inp.addEventListener('change', () => { a[q] = inp.value; save(); progress(); });
    });
  }
  list.appendChild(div);
});
progress();
document.getElementById('download').addEventListener('click', () => {
  const answers = ITEMS.map(it => ({item: it.item, choice: state.answers[it.item].choice || '',
    words: state.answers[it.item].words || '', played: state.answers[it.item].played || []}));
  const blob = new Blob([JSON.stringify({set: SET, listener: state.listener, answers: answers,
    saved: new Date().toISOString()}, null, 1)], {type: 'application/json'});
  const link = document.createElement('a');
  link.href = URL.createObjectURL(blob);
  link.download = 'answers-' + (state.listener || 'anonymous').replace(/[^A-Za-z0-9_-]/g, '_') + '.json';
  document.body.appendChild(link); link.click(); link.remove();
});
"""


def page(items: list[dict[str, Any]], set_id: str, title: str) -> str:
    """The listener's page: everything inline, no network."""
    data = json.dumps(items).replace("</", "<\\/")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:900px;margin:auto}}"
        ".item{border-bottom:1px solid #ddd;padding:4px 0} audio{vertical-align:middle;width:260px}</style></head>"
        f"<body data-set='{html.escape(set_id)}'><h1>{html.escape(title)}</h1>"
        "<p>For each pair, play A and B, choose the one that better expresses the emotion named, and say whether "
        "the words of that clip are preserved. Your answers stay in this browser if you reload; when done, press "
        "<i>Download answers</i> and send the file.</p>"
        "<p>Your name or code: <input id='listener' autocomplete='off'/> <span id='progress'></span></p>"
        "<div id='items'></div><p><button id='download'>Download answers</button></p>"
        f"<script>const ITEMS = {data};</script><script>{_JS}</script></body></html>"
    )


# ------------------------------------------------------------------------------------------ analyse


def clopper_pearson(k: int, n: int, ci: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of k successes in n trials (NaN for n = 0)."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    p = binomtest(int(k), int(n)).proportion_ci(confidence_level=ci, method="exact")
    return float(p.low), float(p.high)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of an [items, categories] count table with the same number of raters per item."""
    counts = np.asarray(counts, dtype=float)
    n = counts.sum(axis=1)
    if counts.size == 0 or n.min() < 2 or not np.all(n == n[0]):
        raise ValueError("Fleiss' kappa needs >= 2 raters and the same number of raters for every item")
    n0 = n[0]
    p_i = ((counts ** 2).sum(axis=1) - n0) / (n0 * (n0 - 1))
    p_j = counts.sum(axis=0) / counts.sum()
    pe = float((p_j ** 2).sum())
    return float("nan") if pe == 1.0 else float((p_i.mean() - pe) / (1 - pe))


def load_answers(paths: list[str | Path], key: pd.DataFrame) -> pd.DataFrame:
    """One row per (listener, item) with a choice; errors name the file and the item."""
    items = set(key["item"])
    set_id = str(key["set"].iloc[0]) if "set" in key.columns and len(key) else None
    rows, seen = [], set()
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not a JSON answer file ({e})") from None
        if set_id is not None and str(doc.get("set")) != set_id:
            raise ValueError(f"{p}: answers are for listening set {doc.get('set')!r}, the key is for {set_id!r}")
        who = str(doc.get("listener") or Path(p).stem)
        if who in seen:
            raise ValueError(f"{p}: listener {who!r} appears in more than one answer file")
        seen.add(who)
        for a in doc.get("answers", []):
            if a.get("item") not in items:
                raise ValueError(f"{p}: item {a.get('item')!r} is not in the answer key")
            if a.get("choice") not in ("A", "B"):
                continue  # not answered
            if a.get("words", "") not in ("", "yes", "no"):
                raise ValueError(f"{p}: item {a['item']!r} has words answer {a.get('words')!r} (yes, no or empty)")
            rows.append({"listener": who, "item": a["item"], "choice": a["choice"], "words": a.get("words", "")})
    ans = pd.DataFrame(rows, columns=["listener", "item", "choice", "words"])
    ans = ans.merge(key[["item", "target", "steered"]], on="item", how="left")
    ans["prefers_steered"] = ans["choice"].eq(ans["steered"])
    return ans


def analyse(key: pd.DataFrame, answers: pd.DataFrame, ci: float = 0.95) -> dict[str, pd.DataFrame]:
    """Preference for the steered clip per emotion and overall (each judgment a trial; Clopper-Pearson),
    "words preserved" rates, and agreement (items every listener answered)."""
    rows = []
    groups = [(str(t), g) for t, g in answers.groupby("target", sort=True)] + [("all", answers)]
    for tgt, g in groups:
        k, n = int(g["prefers_steered"].sum()), len(g)
        lo, hi = clopper_pearson(k, n, ci)
        w = g[g["words"].ne("")]
        wk = int(w["words"].eq("yes").sum())
        wlo, whi = clopper_pearson(wk, len(w), ci)
        rows.append({"target": tgt, "n": n, "steered_preferred": k, "rate": k / n if n else float("nan"),
                     "ci_lo": lo, "ci_hi": hi, "n_listeners": g["listener"].nunique(), "n_words": len(w),
                     "words_preserved": wk / len(w) if len(w) else float("nan"), "words_ci_lo": wlo, "words_ci_hi": whi})
    pref = pd.DataFrame(rows)
    listeners = sorted(answers["listener"].unique())
    wide = answers.pivot_table(index="item", columns="listener", values="prefers_steered", aggfunc="first")
    full = wide.dropna() if len(listeners) >= 2 else wide.iloc[0:0]
    kappa = float("nan")
    if len(full):
        c = full.astype(bool).sum(axis=1).to_numpy()
        kappa = fleiss_kappa(np.stack([c, len(listeners) - c], axis=1))
    pair = []
    for a, b in itertools.combinations(listeners, 2):
        both = wide[[a, b]].dropna()
        if len(both):
            pair.append(float((both[a] == both[b]).mean()))
    agree = pd.DataFrame([{"n_listeners": len(listeners), "n_items_all_listeners": len(full), "fleiss_kappa": kappa,
                           "pairwise_agreement": float(np.mean(pair)) if pair else float("nan"), "n_pairs": len(pair)}])
    return {"preference": pref, "agreement": agree}


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Blinded A/B listening test of EVC steering")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write the blinded page and its answer key")
    ex.add_argument("--run", required=True, help="run folder, e.g. results/demo")
    ex.add_argument("--out", required=True, help="folder for listening.html and key.tsv")
    ex.add_argument("--condition", help="steered condition id (default: the best selector against random)")
    ex.add_argument("--per-emotion", type=int, default=4)
    ex.add_argument("--seed", type=int, default=0)
    an = sub.add_parser("analyse", help="merge answer files and report preference and agreement")
    an.add_argument("--key", required=True)
    an.add_argument("--answers", nargs="+", required=True)
    an.add_argument("--out", help="folder for preference.tsv and agreement.tsv")
    an.add_argument("--ci", type=float, default=0.95)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if a.cmd == "export":
        key = export(a.run, a.out, a.condition, a.per_emotion, a.seed)
        print(f"listening page: {(Path(a.out) / 'listening.html').resolve()} ({len(key)} items); "
              f"answer key (keep it from listeners): {(Path(a.out) / 'key.tsv').resolve()}")
        return 0
    key = pd.read_csv(a.key, sep="\t", dtype=str)  # item ids and the set id are names, not numbers
    res = analyse(key, load_answers(a.answers, key), a.ci)
    if a.out:
        for name, df in res.items():
            write_table(Path(a.out) / f"{name}.tsv", df)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        for name, df in res.items():
            print(f"{name}:\n{df.to_string(index=False)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
