"""Issue 14 on a GPU: capture/steer overhead, decoding against the weight-read floor, batched speech, determinism.

Full-size Qwen2.5-Omni-7B (thinker + the 7B talker + token2wav; `harness.qwen_config`) with random bf16
weights, through the real adapter and hooks, greedy, fixed token counts (`thinker_min_new_tokens` =
`max_new_tokens`, `talker_min_new_tokens` = `talker_max_new_tokens`, so no row stops early). One command prints
the table of every goal and writes `results.json` / `results.md` under `--out`:

1. capture / steer (alpha 1, 0.5 % of the gate neurons of every layer) / steer0 (alpha 0) time over plain at
   batch sizes 1, 8, 32, per decoding path (`eager`: dynamic cache, today's default; `graph`: static KV cache
   with the decode step captured as CUDA graphs by `emotion_neurons.cudagraphs`, i.e.
   `model.cache_implementation: static`, `model.compile: cudagraphs`; `graph_stock`: torch's own cudagraphs
   backend; `inductor`; `inductor_exact`: inductor emulating eager's bf16 rounding), with the rows whose ids
   equal plain's.
2. decode time per token at bs 1 (and 8): (t(T tokens) - t(1 token)) / (T - 1) per generate call, against the
   floor = bytes of the language-model weights read per step (decoder layers + final norm + lm_head; the
   embedding table is not read) / device-to-device copy bandwidth measured here; ids and the first steps'
   logits against the eager path.
3. speech (thinker + talker + token2wav, `want_audio`) seconds per utterance and peak memory per batch size,
   with token2wav per row (upstream) and batched (`model.token2wav_batch_size`), waves compared row by row,
   with the upstream eager talker and with the compiled one (`--talker-compiles`, `model.talker_compile`;
   its waves compared with the eager talker's, bitwise).
4. `model.deterministic` (cuDNN SDPA off) against cuDNN SDPA on: time and ids; plain ids at bs 1 vs 8 vs 32.

Run:        PYTHONPATH=src python bench/gpu_fastpath.py --out DIR
CPU smoke:  PYTHONPATH=src python bench/gpu_fastpath.py --tiny --out /tmp/fast_tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import (  # noqa: E402 - bench/ is on sys.path when run as a script
    Hooks,
    IdRecorder,
    add_random_speaker,
    build_random,
    clamp_token2wav_codes,
    environment,
    load_adapter,
    log,
    quiet_transformers,
    qwen_config,
    random_masks,
    sync,
    synthetic,
)

from emotion_neurons.types import GenerationSettings

MODES = ("plain", "capture", "steer", "steer0")
DECODINGS = {"eager": ("dynamic", "off"), "static": ("static", "off"), "graph": ("static", "cudagraphs"),
             "inductor": ("static", "inductor"),
             # bench-only references: torch's stock cudagraphs backend (run 1's `graph`), inductor emulating
             # eager's bf16 rounding of intermediates
             "graph_stock": ("static", "stock_cudagraphs"), "inductor_exact": ("static", "inductor_exact")}  # fmt: skip


def decoding_args(name: str) -> tuple[str, Any]:
    """`adapter.set_decoding` arguments of a decoding name (bench-only names become a CompileConfig)."""
    cache, comp = DECODINGS[name]
    if comp in ("stock_cudagraphs", "inductor_exact"):
        from transformers import CompileConfig

        if comp == "stock_cudagraphs":
            return cache, CompileConfig(fullgraph=False, dynamic=False, backend="cudagraphs", mode=None)
        return cache, CompileConfig(
            fullgraph=False, dynamic=False, backend="inductor", mode=None,
            options={"triton.cudagraphs": True, "emulate_precision_casts": True},
        )  # fmt: skip
    return cache, comp
KEEP_LOGITS = 4
SAVE: list = []  # callbacks that write the partial result (set by main)


def save() -> None:
    for fn in SAVE:
        fn()


T_START = time.perf_counter()


def over_budget(args: argparse.Namespace, cell: str, res: dict) -> bool:
    """True (and the cell noted as skipped) once the run is past `--budget-s`: the run then still ends inside
    the device tool's 10-minute limit and prints its table."""
    spent = time.perf_counter() - T_START
    if spent <= args.budget_s:
        return False
    res.setdefault("skipped_for_budget", []).append(f"{cell} (at {spent:.0f} s)")
    log(f"skipping {cell}: {spent:.0f} s spent, budget {args.budget_s} s")
    return True


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float | None:
    """Device-to-device copy, bytes read + written per second (median of 10 after 3 warm-ups)."""
    if device.type != "cuda":
        return None
    n = int(gib * 2**30) // 2
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n * 2 / float(np.median(times))


def lm_read_bytes(adapter: Any) -> int:
    """Bytes of the weights one decode step reads: decoder layers, final norm, lm_head (not the embedding)."""
    thinker = adapter.model.thinker
    embed = thinker.get_input_embeddings().weight
    sites = adapter.resolve_sites("thinker", "gate")
    names = dict(adapter.model.named_modules())
    layers_name = sites[0].name.rsplit(".layers.", 1)[0]
    lm = names[layers_name]
    total = sum(p.numel() * p.element_size() for p in lm.parameters() if p.data_ptr() != embed.data_ptr())
    total += sum(p.numel() * p.element_size() for p in thinker.lm_head.parameters())
    return int(total)


def run_batches(
    adapter: Any, hooks: Hooks, insts: list, audios: list, bs: int, settings: GenerationSettings,
    ids: IdRecorder, device: torch.device, warmup: bool = True, keep_wavs: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Generate all instances in batches of `bs` (one untimed warm-up batch first); time per generate call."""
    batches = [list(range(b, min(b + bs, len(insts)))) for b in range(0, len(insts), bs)]
    plan = ([(True, batches[0])] if warmup else []) + [(False, b) for b in batches]
    t_gen, t_res, rows, logits = [], [], {}, {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with hooks.attached():
        for warm, idx in plan:
            prepared = adapter.prepare([insts[i] for i in idx], [audios[i] for i in idx])
            hooks.arm(prepared)
            ids.logits = None
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = adapter.generate(prepared, settings)
            sync(device)
            t1 = time.perf_counter()
            stats = hooks.rec.result() if hooks.rec is not None else None
            sync(device)
            dt = time.perf_counter() - t0
            if warm:
                continue
            t_gen.append(dt)
            t_res.append(time.perf_counter() - t1)
            plen = int(prepared.inputs["input_ids"].shape[1])
            new = ids.last[:, plen:]
            for j, i in enumerate(idx):
                if keep_wavs is not None and gen[j].wav is not None:
                    keep_wavs[insts[i].id] = gen[j].wav
                rows[insts[i].id] = {
                    "ids": new[j].tolist(),
                    "n_generated": gen[j].n_generated,
                    "tokens": None if stats is None else stats["tokens"][j].tolist(),
                    "wav_samples": None if gen[j].wav is None else int(gen[j].wav.size),
                }
                if ids.logits is not None:
                    logits[insts[i].id] = ids.logits[j].detach()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "batch_size": bs,
        "n": len(insts),
        "seconds_per_call": t_gen,
        "result_seconds_per_call": t_res,  # the recorder's host copy (part of seconds_per_call)
        "seconds_per_instance": float(np.sum(t_gen)) / len(insts),
        "peak_gib": None if peak is None else round(peak, 2),
        "rows": rows,
        "logits": logits,
    }


def equal_rows(a: dict, b: dict) -> int:
    return int(sum(a["rows"][k]["ids"] == b["rows"][k]["ids"] for k in a["rows"]))


def logit_gap(a: dict, b: dict) -> float | None:
    """Max |logit difference| over the kept steps before the first differing id, over rows."""
    worst = 0.0
    for k, la in a["logits"].items():
        lb = b["logits"].get(k)
        if lb is None:
            return None
        ia, ib = a["rows"][k]["ids"], b["rows"][k]["ids"]
        n = next((t for t, (x, y) in enumerate(zip(ia, ib, strict=False)) if x != y), len(ia))
        n = max(1, min(n + 1, la.shape[0]))  # include the step whose argmax differs
        worst = max(worst, float((la[:n].float() - lb[:n].float()).abs().max()))
    return worst


def profile_cells(args, adapter, masks, insts, audios, ids, device, st, decoding, res) -> None:
    """torch.profiler over one timed batch per decoding x mode: where the time of a mode goes (CPU ops and
    kernels, CUDA-graph launches), written to profile.txt; dynamo's counters (graph breaks, cudagraph skips)
    go to the result."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lines, summary = [], []
    for dec, bs, mode in [(d, b, m) for d in args.profile_decodings for b in args.profile_batch_sizes
                          for m in args.profile_modes]:  # fmt: skip
        sub, aud = insts[:bs], audios[:bs]
        decoding(dec)
        hooks = Hooks(adapter, mode, masks)
        t0 = time.perf_counter()
        try:
            run_batches(adapter, hooks, sub, aud, bs, st, ids, device, warmup=False)  # compile, warm up
            with profile(activities=acts) as prof:
                r = run_batches(adapter, hooks, sub, aud, bs, st, ids, device, warmup=False)
            plain = run_batches(adapter, hooks, sub, aud, bs, st, ids, device, warmup=False)
        except Exception as e:  # noqa: BLE001 - report the cell, go on
            summary.append({"decoding": dec, "mode": mode, "batch_size": bs, "error": f"{type(e).__name__}: {e}"[:400]})
            log(f"profile {dec} {mode} failed: {e}")
            continue
        ka = prof.key_averages()
        launches = {k: sum(e.count for e in ka if e.key == k) for k in ("cudaGraphLaunch", "cudaLaunchKernel")}
        row = {"decoding": dec, "mode": mode, "batch_size": bs, "s_per_call_profiled": r["seconds_per_call"],
               "s_per_call_unprofiled": plain["seconds_per_call"],
               "result_s_per_call": plain["result_seconds_per_call"], **launches,
               "setup_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        summary.append(row)
        log(f"profile: {json.dumps(row)}")
        lines.append(f"===== {json.dumps(row)}")
        for key in ("self_cpu_time_total", "self_device_time_total"):
            try:
                lines.append(ka.table(sort_by=key, row_limit=25, max_name_column_width=70))
            except Exception as e:  # noqa: BLE001 - older torch names the column differently
                lines.append(f"(no table by {key}: {e})")
        res["profile"] = summary
        res["dynamo_counters"] = {k: {str(a): b for a, b in v.items()} for k, v in counters.items()}
        Path(args.out, "profile.txt").write_text("\n".join(lines))
        save()


def talker_mode(name: str, device: torch.device) -> Any:
    """`model.talker_compile`; on CPU (the --tiny smoke run) a compiled mode runs dynamo's eager backend."""
    if name == "off" or device.type == "cuda":
        return name
    from transformers import CompileConfig

    return CompileConfig(fullgraph=False, dynamic=False, backend="eager", mode=None)


def text_settings(n_tokens: int, cache_len: int, logits: bool = True) -> GenerationSettings:
    extra: dict[str, Any] = {"thinker_min_new_tokens": n_tokens}
    if logits:
        extra.update(thinker_output_logits=True, thinker_return_dict_in_generate=True)
    return GenerationSettings(max_new_tokens=n_tokens, extra=extra)


def bench(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tmp: Path, res: dict) -> None:
    """Fill `res` section by section (what was measured survives a later failure)."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    from emotion_neurons.tiny import qwen_omni as tiny_qwen

    with quiet_transformers():
        tiny_dir = tiny_qwen.build(tmp / "qwen")
    speech = bool(args.speech_batch_sizes)
    cfg = qwen_config(tiny_dir, args.tiny, audio_output=speech)
    model, info = build_random(Qwen2_5OmniForConditionalGeneration, cfg, device, dtype)
    if speech:
        add_random_speaker(model, tiny_dir)
        clamp_token2wav_codes(model)
    adapter = load_adapter("qwen2_5_omni", model, tiny_dir, device)
    info["lm_read_gib"] = round(lm_read_bytes(adapter) / 2**30, 3)
    bw = copy_bandwidth(device)
    info["copy_bandwidth_tb_s"] = None if bw is None else round(bw / 1e12, 3)
    floor_ms = None if bw is None else lm_read_bytes(adapter) / bw * 1e3
    info["floor_ms_per_step"] = None if floor_ms is None else round(floor_ms, 3)
    res["build"] = info
    log(f"built: {json.dumps(info)}")
    sites = adapter.resolve_sites("thinker", "gate")
    masks = random_masks(len(sites), adapter.n_neurons("thinker"), args.mask_frac, device)
    ids = IdRecorder([model, model.thinker], keep_logits=KEEP_LOGITS)
    n_max = max(args.n_per_bs.get(bs, bs) for bs in args.batch_sizes + [1])
    insts, audios = synthetic(max(n_max, max(args.speech_batch_sizes or [1]) * 2), args.seconds)
    T = args.new_tokens
    st = text_settings(T, 0)
    st1 = text_settings(1, 0, logits=False)

    def decoding(name: str) -> None:
        adapter.set_decoding(*decoding_args(name))

    if args.profile_decodings:
        profile_cells(args, adapter, masks, insts, audios, ids, device, st, decoding, res)

    def speech_section() -> None:
        """Goal 3 cells; first with --speech-first (a run cut at its time limit keeps them)."""
        # -- goal 3: speech ----------------------------------------------------------------------------------------
        sp_rows: list[dict[str, Any]] = []
        res["speech"] = sp_rows
        if speech:
            ss = GenerationSettings(
                max_new_tokens=args.speech_tokens, want_audio=True, speaker=adapter.resolve_speaker() or "",
                extra={"thinker_min_new_tokens": args.speech_tokens, "talker_do_sample": False,
                       "talker_min_new_tokens": args.codec_tokens, "talker_max_new_tokens": args.codec_tokens},
            )  # fmt: skip
            wav_ref: dict[int, dict] = {}  # bs -> per-row token2wav waveforms, the reference of the batched ones
            talker_ref: dict[tuple, dict] = {}  # (t2w, bs) -> the eager talker's waveforms
            cells = [(dec, tc, t2w, bs) for dec in args.speech_decodings for tc in args.talker_compiles
                     for t2w in args.token2wav_batch_sizes for bs in args.speech_batch_sizes]  # fmt: skip
            current = None
            for dec, tc, t2w, bs in cells:
                if dec != current:
                    decoding(dec)
                    current = dec
                if (t2w > 1 and bs == 1) or (t2w == 1 and bs > args.per_row_max_bs):
                    continue
                if tc != "off" and t2w == 1 and bs > 1:  # the compiled talker with batched token2wav only
                    continue
                if over_budget(args, f"speech {dec} talker={tc} t2w={t2w} bs={bs}", res):
                    continue
                adapter.set_speech(min(t2w, bs) if t2w > 1 else 1, talker_mode(tc, device))
                steps0 = adapter._talker_step.steps if adapter._talker_step is not None else 0
                sub, aud = insts[: max(bs, args.speech_min_n)], audios[: max(bs, args.speech_min_n)]
                t0 = time.perf_counter()
                wavs: dict = {}
                try:
                    r = run_batches(adapter, Hooks(adapter, "plain", masks), sub, aud, bs, ss, ids, device,
                                    keep_wavs=wavs)  # fmt: skip
                except Exception as e:  # noqa: BLE001 - report the cell, go on
                    sp_rows.append({"decoding": dec, "talker_compile": tc, "token2wav_batch": t2w,
                                    "batch_size": bs, "error": f"{type(e).__name__}: {e}"[:400]})  # fmt: skip
                    log(f"speech {dec} t2w={t2w} bs={bs} failed: {e}")
                    gc.collect()
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                    continue
                wav = [v["wav_samples"] for v in r["rows"].values()]
                audio_s = float(np.mean(wav)) / adapter.output_sample_rate
                row = {
                    "decoding": dec, "talker_compile": tc, "token2wav_batch": min(t2w, bs), "batch_size": bs,
                    "n": len(sub),
                    "talker_compiled_steps": (adapter._talker_step.steps if adapter._talker_step is not None
                                              else 0) - steps0,
                    "s_per_utterance": round(r["seconds_per_instance"], 4),
                    "utterances_per_s": round(1 / r["seconds_per_instance"], 3),
                    "audio_seconds_per_utterance": round(audio_s, 3),
                    "real_time_factor": round(r["seconds_per_instance"] / audio_s, 4) if audio_s else None,
                    "peak_gib": r["peak_gib"], "seconds": round(time.perf_counter() - t0, 1),
                }  # fmt: skip
                if tc == "off":
                    talker_ref[(t2w, bs)] = wavs
                elif (t2w, bs) in talker_ref:  # same codes = same waves (same seeds, same token2wav calls)
                    tref = talker_ref[(t2w, bs)]
                    common = [k for k in wavs if k in tref]
                    row["wav_rows_equal_eager_talker"] = (
                        f"{sum(tref[k].shape == wavs[k].shape and np.array_equal(tref[k], wavs[k]) for k in common)}"
                        f"/{len(common)}"
                    )
                if dec == args.speech_decodings[0] and t2w == 1 and tc == "off":
                    wav_ref[bs] = {"wavs": wavs, "ids": {k: v["ids"] for k, v in r["rows"].items()}}
                ref = wav_ref.get(bs)
                if ref is not None and t2w > 1:
                    common = [k for k in wavs if k in ref["wavs"]]
                    same_len = [k for k in common if ref["wavs"][k].shape == wavs[k].shape]
                    row["wav_rows_same_length_as_per_row"] = f"{len(same_len)}/{len(common)}"
                    row["thinker_ids_equal_per_row"] = sum(ref["ids"][k] == r["rows"][k]["ids"] for k in common)
                    if same_len:
                        row["wav_max_abs_diff_vs_per_row"] = float(
                            max(np.abs(ref["wavs"][k] - wavs[k]).max() for k in same_len)
                        )
                        row["wav_min_corr_vs_per_row"] = float(
                            min(np.corrcoef(ref["wavs"][k], wavs[k])[0, 1] for k in same_len)
                        )
                sp_rows.append(row)
                save()
                log(f"speech {dec} talker={tc} bs={bs}: {json.dumps(row)}")
            adapter.set_speech(1)
            base = next((r for r in sp_rows if r.get("batch_size") == 1 and "error" not in r), None)
            for r in sp_rows:
                if base and "error" not in r:
                    r["throughput_vs_bs1_eager"] = round(base["s_per_utterance"] / r["s_per_utterance"], 3)
        res["speech"] = sp_rows

    if args.profile_only:
        return
    if args.speech_first:
        speech_section()
    # -- goal 1 + 2: modes x batch sizes x decodings --------------------------------------------------------
    grid: dict[str, Any] = {}
    for dec in args.decodings:
        decoding(dec)
        for bs in args.batch_sizes:
            if over_budget(args, f"grid {dec} bs={bs}", res):
                continue
            sub = insts[: args.n_per_bs.get(bs, bs)]
            aud = audios[: len(sub)]
            t0 = time.perf_counter()
            modes = ("plain",) if dec in args.plain_only else MODES
            rounds = 1 if dec in args.plain_only else args.rounds
            cell: dict[str, list] = {m: [] for m in modes}
            hooks = {m: Hooks(adapter, m, masks) for m in modes}  # one per mode, reused (as per shard)
            for rnd in range(rounds):
                for mode in modes if rnd % 2 == 0 else modes[::-1]:
                    r = run_batches(adapter, hooks[mode], sub, aud, bs, st, ids, device,
                                    warmup=rnd == 0)  # fmt: skip
                    cell[mode].append(r)
            one = run_batches(adapter, Hooks(adapter, "plain", masks), sub, aud, bs, st1, ids, device, warmup=False)
            plain = cell["plain"]
            s_plain = float(np.mean([r["seconds_per_instance"] for r in plain]))
            row = {
                "decoding": dec, "batch_size": bs, "n": len(sub), "rounds": rounds,
                "plain_s_per_instance": round(s_plain, 4),
                "peak_gib": {m: max(r["peak_gib"] or 0 for r in cell[m]) for m in modes},
                "plain_rows_equal_across_rounds": [equal_rows(r, plain[0]) for r in plain],
            }  # fmt: skip
            for m in modes[1:]:
                s = float(np.mean([r["seconds_per_instance"] for r in cell[m]]))
                per_round = [r["seconds_per_instance"] / p["seconds_per_instance"] for r, p in zip(cell[m], plain, strict=True)]
                # the median of the per-round ratios (modes interleaved, order reversed every round): robust to
                # a slow round, which the ratio of means is not
                row[f"{m}_ratio"] = round(float(np.median(per_round)), 4)
                row[f"{m}_ratio_of_means"] = round(s / s_plain, 4)
                row[f"{m}_ratio_rounds"] = [round(x, 4) for x in per_round]
                row[f"{m}_result_s_per_call"] = round(float(np.median([t for r in cell[m] for t in r["result_seconds_per_call"]] or [0])), 4)
                row[f"{m}_rows_equal_plain"] = [equal_rows(r, p) for r, p in zip(cell[m], plain, strict=True)]
            t_call = float(np.median([t for r in plain for t in r["seconds_per_call"]]))
            t_one = float(np.median(one["seconds_per_call"]))
            row["ms_per_token"] = round((t_call - t_one) / (T - 1) * 1e3, 3)
            row["prefill_plus_1_s"] = round(t_one, 4)
            if floor_ms:
                row["x_floor"] = round(row["ms_per_token"] / floor_ms, 3)
            if "capture" in cell:
                cap = cell["capture"][0]["rows"]
                row["capture_tokens_example"] = cap[next(iter(cap))]["tokens"]
            row["seconds"] = round(time.perf_counter() - t0, 1)
            grid[f"{dec}/{bs}"] = {"row": row, "plain0": plain[0]}
            res["grid"] = [v["row"] for v in grid.values()]
            save()
            log(f"{dec} bs={bs}: {json.dumps(row)}")
    # cross-decoding comparisons against eager
    for key, v in grid.items():
        dec, bs = key.split("/")
        for ref_name in ("eager", "static"):
            ref = grid.get(f"{ref_name}/{bs}")
            if ref is not None and dec != ref_name:
                v["row"][f"rows_equal_{ref_name}"] = equal_rows(v["plain0"], ref["plain0"])
                v["row"][f"max_logit_gap_vs_{ref_name}"] = logit_gap(v["plain0"], ref["plain0"])
    res["grid"] = [v["row"] for v in grid.values()]
    ordered = [d for d in args.decodings if d not in args.plain_only]
    # goal 4b: plain ids across batch sizes, per decoding (rows of the smaller batch size's instances)
    cross = {}
    for d0 in args.decodings:
        b_ = [bs for bs in args.batch_sizes if f"{d0}/{bs}" in grid]
        for bs in b_[1:]:
            a, b = grid[f"{d0}/{b_[0]}"]["plain0"], grid[f"{d0}/{bs}"]["plain0"]
            common = [k for k in a["rows"] if k in b["rows"]]
            same = sum(a["rows"][k]["ids"] == b["rows"][k]["ids"] for k in common)
            cross[f"{d0} bs{b_[0]}_vs_bs{bs}"] = f"{same}/{len(common)}"
    res["ids_across_batch_sizes"] = cross
    save()
    del grid
    gc.collect()

    # -- goal 4a: deterministic (cuDNN SDPA off, the default) against cuDNN SDPA on ----------------------------
    det = {}
    bs = args.det_batch_size
    sub, aud = insts[: args.n_per_bs.get(bs, bs)], audios[: args.n_per_bs.get(bs, bs)]
    for dec in [d for d in ordered if d in args.det_decodings]:
        if over_budget(args, f"deterministic {dec}", res):
            continue
        decoding(dec)
        runs = {}
        for setting in ("cudnn_on", "cudnn_off", "cudnn_on", "cudnn_off"):
            torch.backends.cuda.enable_cudnn_sdp(setting == "cudnn_on")
            r = run_batches(adapter, Hooks(adapter, "plain", masks), sub, aud, bs, st, ids, device)
            runs.setdefault(setting, []).append(r)
        torch.backends.cuda.enable_cudnn_sdp(False)
        on = float(np.mean([r["seconds_per_instance"] for r in runs["cudnn_on"]]))
        off = float(np.mean([r["seconds_per_instance"] for r in runs["cudnn_off"]]))
        det[dec] = {
            "batch_size": bs, "n": len(sub),
            "cudnn_on_s_per_instance": round(on, 4), "deterministic_s_per_instance": round(off, 4),
            "deterministic_cost": round(off / on, 4),
            "rows_equal_run_to_run_cudnn_on": equal_rows(runs["cudnn_on"][1], runs["cudnn_on"][0]),
            "rows_equal_run_to_run_deterministic": equal_rows(runs["cudnn_off"][1], runs["cudnn_off"][0]),
            "rows_equal_on_vs_off": equal_rows(runs["cudnn_on"][0], runs["cudnn_off"][0]),
        }  # fmt: skip
        log(f"deterministic {dec}: {json.dumps(det[dec])}")
    res["deterministic"] = det
    save()

    if not args.speech_first:
        speech_section()
    from torch._dynamo.utils import counters

    res["dynamo_counters"] = {k: {str(a): b for a, b in v.items()} for k, v in counters.items()}
    ids.remove()
    adapter.set_decoding("dynamic", "off")


def goals(result: dict[str, Any]) -> list[str]:
    """The table of issue 14's goals, read off this run's cells (ratios are medians over interleaved rounds)."""
    a = result["args"]
    dec = a.get("goal_decoding", "graph")
    grid = {(r["decoding"], r["batch_size"]): r for r in result.get("grid", [])}
    out = [f"Goals (issue 14), fast path `{dec}`; met = every listed number within its bound", "",
           "| goal | bound | measured | met |", "|---|---|---|---|"]  # fmt: skip
    cells = [grid[(dec, bs)] for bs in a["batch_sizes"] if (dec, bs) in grid and "capture_ratio" in grid[(dec, bs)]]
    for m, what in (("capture", "capture"), ("steer", "steer alpha 1"), ("steer0", "steer alpha 0")):
        vals = [f"bs {r['batch_size']}: {r[f'{m}_ratio']:.3f}x ({min(r[f'{m}_ratio_rounds']):.2f}-"
                f"{max(r[f'{m}_ratio_rounds']):.2f})" for r in cells]  # fmt: skip
        ok = bool(cells) and len(cells) == len(a["batch_sizes"]) and all(r[f"{m}_ratio"] <= 1.03 for r in cells)
        out.append(f"| 1 {what} / plain | <= 1.03x at bs {a['batch_sizes']} | {'; '.join(vals) or 'not run'} | {'yes' if ok else 'no'} |")
    same = [f"bs {r['batch_size']}: {sum(r['steer0_rows_equal_plain'])}/{r['n'] * len(r['steer0_rows_equal_plain'])}" for r in cells]
    ok = bool(cells) and all(x == r["n"] for r in cells for x in r["steer0_rows_equal_plain"])
    out.append(f"| 1 alpha 0 ids = plain | all rows, every round | {'; '.join(same) or 'not run'} | {'yes' if ok else 'no'} |")
    r1 = grid.get((dec, 1))
    if r1 is not None and r1.get("x_floor") is not None:
        eq = [f"{r1.get(f'rows_equal_{ref}', '-')}/{r1['n']} = {ref} (gap {r1.get(f'max_logit_gap_vs_{ref}', '-')})"
              for ref in ("static", "eager") if f"rows_equal_{ref}" in r1]  # fmt: skip
        ok = r1["x_floor"] <= 2.0 and r1.get("rows_equal_static") == r1["n"]
        out.append(f"| 2 bs-1 decode / weight-read floor | <= 2x, ids = eager | {r1['ms_per_token']} ms/token = "
                   f"{r1['x_floor']}x of {result.get('build', {}).get('floor_ms_per_step')} ms; ids {'; '.join(eq)} "
                   f"| {'yes' if ok else 'no'} |")  # fmt: skip
    else:
        out.append("| 2 bs-1 decode / weight-read floor | <= 2x, ids = eager | not run | no |")
    sp = [r for r in result.get("speech", []) if "error" not in r]
    base = next((r for r in sp if r["batch_size"] == 1), None)
    if base and sp:
        best = min(sp, key=lambda r: r["s_per_utterance"])
        gain = base["s_per_utterance"] / best["s_per_utterance"]
        ok = gain >= 8 and best["s_per_utterance"] <= 0.6
        out.append(f"| 3 speech utterances/s over bs 1 | >= 8x, <= 0.6 s per 4-s utterance | {gain:.2f}x: "
                   f"{best['s_per_utterance']} s at bs {best['batch_size']} ({best['decoding']}, talker "
                   f"{best.get('talker_compile', 'off')}, token2wav "
                   f"{best['token2wav_batch']} rows/call, peak {best['peak_gib']} GiB) vs {base['s_per_utterance']} s "
                   f"| {'yes' if ok else 'no'} |")  # fmt: skip
    else:
        out.append("| 3 speech utterances/s over bs 1 | >= 8x | not run | no |")
    det = result.get("deterministic", {})
    for d, r in det.items():
        out.append(f"| 4 model.deterministic cost ({d}, bs {r['batch_size']}) | measured | {r['deterministic_cost']:.3f}x; "
                   f"run-to-run ids {r['rows_equal_run_to_run_deterministic']}/{r['n']}; cuDNN on vs off "
                   f"{r['rows_equal_on_vs_off']}/{r['n']} | measured |")  # fmt: skip
    cross = result.get("ids_across_batch_sizes") or {}
    out.append(f"| 4 plain ids across batch sizes | measured | {'; '.join(f'{k}: {v}' for k, v in cross.items()) or 'not run'} "
               f"| {'measured' if cross else 'no'} |")  # fmt: skip
    if result.get("skipped_for_budget"):
        out.append(f"\nSkipped for the time budget: {'; '.join(result['skipped_for_budget'])}")
    return out + [""]


def markdown(result: dict[str, Any]) -> str:
    env, a = result["environment"], result["args"]
    b = result.get("build", {})
    out = [
        f"Device: {env.get('nvidia_smi') or env.get('gpu') or env.get('cpu')}; torch {env['torch']}, transformers "
        f"{env['transformers']}; {env['date_utc']}; {a['new_tokens']} new tokens per row (fixed), ~{a['seconds']} s "
        f"clips, greedy; {a['rounds']} rounds; command: `{result['command']}`",
        f"Weights read per decode step {b.get('lm_read_gib')} GiB; copy bandwidth {b.get('copy_bandwidth_tb_s')} TB/s;"
        f" floor {b.get('floor_ms_per_step')} ms/step; total {result.get('total_seconds')} s",
        "",
        *goals(result),
        "Goals 1-2 (time ratios over plain, same decoding and batch size; ids = rows equal to plain per round)",
        "",
        "| decoding | bs | plain s/inst | ms/token | x floor | capture | steer | steer0 | steer0 ids = plain | capture ids = plain | ids = eager (max logit gap) | ids = static (gap) | peak GiB (plain/capture) | capture host copy s/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result.get("grid", []):
        n = r["n"]
        if "capture_ratio" not in r:
            out.append(
                f"| {r['decoding']} (plain only) | {r['batch_size']} | {r['plain_s_per_instance']:.4f} "
                f"| {r['ms_per_token']} | {r.get('x_floor', '-')} | | | | | "
                f"| {r.get('rows_equal_eager', '-')}/{n} ({r.get('max_logit_gap_vs_eager', '-')}) | "
                f"| {r['peak_gib']['plain']} | |"
            )
            continue
        out.append(
            f"| {r['decoding']} | {r['batch_size']} | {r['plain_s_per_instance']:.4f} | {r['ms_per_token']} "
            f"| {r.get('x_floor', '-')} | {r['capture_ratio']:.3f}x | {r['steer_ratio']:.3f}x | {r['steer0_ratio']:.3f}x "
            f"| {', '.join(f'{x}/{n}' for x in r['steer0_rows_equal_plain'])} "
            f"| {', '.join(f'{x}/{n}' for x in r['capture_rows_equal_plain'])} "
            f"| {r.get('rows_equal_eager', '-')}/{n} ({r.get('max_logit_gap_vs_eager', '-')}) "
            f"| {r.get('rows_equal_static', '-')}/{n} ({r.get('max_logit_gap_vs_static', '-')}) "
            f"| {r['peak_gib']['plain']}/{r['peak_gib']['capture']} | {r.get('capture_result_s_per_call', '-')} |"
        )
    out += ["", f"Plain ids across batch sizes: {json.dumps(result.get('ids_across_batch_sizes'))}", ""]
    out += ["Goal 4 (model.deterministic = cuDNN SDPA off)", "",
            "| decoding | bs | cuDNN on s/inst | deterministic s/inst | cost | run-to-run ids (on / det) | on vs det ids |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for dec, d in result.get("deterministic", {}).items():
        n = d["n"]
        out.append(
            f"| {dec} | {d['batch_size']} | {d['cudnn_on_s_per_instance']} | {d['deterministic_s_per_instance']} "
            f"| {d['deterministic_cost']:.3f}x | {d['rows_equal_run_to_run_cudnn_on']}/{n} / "
            f"{d['rows_equal_run_to_run_deterministic']}/{n} | {d['rows_equal_on_vs_off']}/{n} |"
        )
    out += ["", "Goal 3 (speech: thinker + talker + token2wav)", "",
            "| thinker decoding | talker compile (steps) | token2wav rows/call | bs | s/utterance | utterances/s | x bs-1 | audio s | RTF | peak GiB | thinker ids = per-row | wav max abs diff / min corr vs per-row | waves = eager talker |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result.get("speech", []):
        if "error" in r:
            out.append(f"| {r['decoding']} | {r.get('talker_compile', 'off')} | {r.get('token2wav_batch')} | {r['batch_size']} | ERROR {r['error'][:120]} | | | | | | | | |")
            continue
        diff = (f"{r['wav_max_abs_diff_vs_per_row']:.2e} / {r['wav_min_corr_vs_per_row']:.6f}"
                if "wav_max_abs_diff_vs_per_row" in r else "-")  # fmt: skip
        out.append(
            f"| {r['decoding']} | {r.get('talker_compile', 'off')} ({r.get('talker_compiled_steps', 0)}) "
            f"| {r.get('token2wav_batch', 1)} | {r['batch_size']} | {r['s_per_utterance']} "
            f"| {r['utterances_per_s']} | {r.get('throughput_vs_bs1_eager', '-')} | {r['audio_seconds_per_utterance']} "
            f"| {r['real_time_factor']} | {r['peak_gib']} | {r.get('thinker_ids_equal_per_row', '-')} | {diff} "
            f"| {r.get('wav_rows_equal_eager_talker', '-')} |"
        )
    if result.get("profile"):
        out += ["", "Profile (one batch per cell; profile.txt has the tables)", "",
                "| decoding | mode | bs | s/call profiled | s/call | cudaGraphLaunch | cudaLaunchKernel |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["profile"]:
            if "error" in r:
                out.append(f"| {r['decoding']} | {r['mode']} | | ERROR {r['error'][:120]} | | | |")
                continue
            out.append(
                f"| {r['decoding']} | {r['mode']} | {r['batch_size']} | {r['s_per_call_profiled']} "
                f"| {r['s_per_call_unprofiled']} | {r['cudaGraphLaunch']} | {r['cudaLaunchKernel']} |"
            )
        skips = result.get("dynamo_counters", {}).get("inductor", {}).get("cudagraph_skips")
        out += ["", f"dynamo counters: cudagraph_skips {skips}; graph breaks "
                f"{json.dumps(result.get('dynamo_counters', {}).get('graph_break', {}))[:600]}"]  # fmt: skip
    if "error" in result:
        out += ["", "ERROR: " + result["error"].splitlines()[-1]]
    return "\n".join(out) + "\n"


def parse_n(spec: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (p.split(":") for p in spec.split(",") if p)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--n-per-bs", type=parse_n, default=parse_n("1:4,8:16,32:32"), help="instances per batch size")
    ap.add_argument("--decodings", nargs="*", default=["eager", "static", "graph"], choices=sorted(DECODINGS))
    ap.add_argument(
        "--plain-only", nargs="*", default=["eager", "static"], help="decodings timed in plain mode only (references)"
    )
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--mask-frac", type=float, default=0.005)
    ap.add_argument("--det-batch-size", type=int, default=8)
    ap.add_argument("--det-decodings", nargs="*", default=["graph"], choices=sorted(DECODINGS),
                    help="decodings (of --decodings, not plain-only) timed with cuDNN SDPA on and off")
    ap.add_argument("--budget-s", type=float, default=470.0,
                    help="skip the remaining cells once this many seconds have passed since start")
    ap.add_argument("--speech-batch-sizes", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--speech-decodings", nargs="+", default=["eager"], choices=sorted(DECODINGS))
    ap.add_argument("--speech-min-n", type=int, default=2)
    ap.add_argument("--speech-tokens", type=int, default=32)
    ap.add_argument("--codec-tokens", type=int, default=200)
    ap.add_argument("--token2wav-batch-sizes", type=int, nargs="+", default=[1, 32],
                    help="model.token2wav_batch_size per speech cell (capped at the batch size; 1 = upstream)")
    ap.add_argument("--talker-compiles", nargs="+", default=["off", "cudagraphs"], choices=["off", "cudagraphs", "inductor"],
                    help="model.talker_compile per speech cell (compiled: bs 1 and batched token2wav cells only)")
    ap.add_argument("--per-row-max-bs", type=int, default=8, help="largest bs timed with per-row token2wav")
    ap.add_argument("--speech-first", action=argparse.BooleanOptionalAction, default=True,
                    help="speech cells before the text grid (their cost is known; the grid's budget adapts)")
    ap.add_argument("--goal-decoding", default="graph", help="the fast path the goals table reads (goals 1-2)")
    ap.add_argument("--profile-decodings", nargs="*", default=[], choices=sorted(DECODINGS),
                    help="torch.profiler tables of one timed batch per decoding x mode (profile.txt under --out)")
    ap.add_argument("--profile-modes", nargs="+", default=["plain", "capture"], choices=MODES)
    ap.add_argument("--profile-batch-sizes", type=int, nargs="+", default=[8])
    ap.add_argument("--profile-only", action="store_true", help="stop after the profile")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not args.tiny and device.type != "cuda":
        print("full-size models need a CUDA device; use --tiny", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)
        for d in ("graph", "inductor", "graph_stock", "inductor_exact"):  # CUDA graphs need a GPU; the CPU smoke test runs the static cache eagerly
            args.decodings = ["static" if x == d else x for x in args.decodings]
            args.speech_decodings = ["static" if x == d else x for x in args.speech_decodings]
    # every (mode, batch size) is its own compiled decode step; the default limit of 8 would fall back to eager
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    torch.backends.cuda.enable_cudnn_sdp(False)  # model.deterministic: true (config.yaml default)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "args": {k: (v if k != "n_per_bs" else {str(a): b for a, b in v.items()}) for k, v in vars(args).items()},
        "environment": environment(device),
    }
    log(json.dumps(result["environment"]))
    t0 = time.perf_counter()
    code = 0

    def write() -> None:
        (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
        (out_dir / "results.md").write_text(markdown(result))

    SAVE.append(write)
    with tempfile.TemporaryDirectory(prefix="fast_") as tmp:
        try:
            bench(args, device, dtype, Path(tmp), result)
        except Exception:  # noqa: BLE001 - keep what was measured
            result["error"] = traceback.format_exc()
            log(result["error"])
            code = 1
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
