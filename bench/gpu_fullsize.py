"""Speed and memory of capture and intervention on FULL-SIZE model architectures (random bf16 weights).

No checkpoint can be downloaded on the GPU machines, so this builds the real transformers classes at the real
sizes with random weights directly on the GPU, plugs them into the real adapters and measures, per model and
batch size, plain generation against generation with stage-1 capture and generation under a steer
intervention. Speed and memory are representative of the real checkpoints; the generated tokens are not.

Models (sizes as published; the tiny tokenizers' special-token ids replace the real ones, the vocabulary
sizes stay the real ones, so the tokenizer ids are a subset of the embedding table):

(a) Qwen2.5-Omni-7B: `Qwen2_5OmniForConditionalGeneration` with `enable_audio_output=False`, i.e. the thinker
    only (audio encoder + vision encoder + text decoder, about 8.9 B parameters); talker and token2wav are not
    built. Text decoder: hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads, vocab 152064,
    rope theta 1e6, mrope_section [16, 24, 24], untied lm_head. Audio encoder: d_model 1280, 32 layers,
    20 heads, ffn 5120, 128 mel bins, output_dim 3584. Vision encoder (loaded but unused here): depth 32,
    hidden 1280, intermediate 3420, 16 heads, out_hidden_size 3584.
    Sources: transformers `models/qwen2_5_omni/configuration_qwen2_5_omni.py` (defaults documented as
    `Qwen/Qwen2.5-Omni-7B`: text 3584/18944/28/28/4, vocab 152064, audio 1280/32/20/5120/128 -> 3584);
    public config.json files of Qwen2.5-Omni-7B derivatives that keep its architecture, e.g.
    https://huggingface.co/VoiceNet/voiceclap-large/blob/main/config.json (thinker audio_config d_model 1280,
    encoder_layers 32, encoder_attention_heads 20, encoder_ffn_dim 5120, num_mel_bins 128, output_dim 3584;
    text_config hidden_size 3584, intermediate_size 18944) and
    https://huggingface.co/Duofu/EmotionThinker/blob/main/config.json (`Qwen2_5OmniForConditionalGeneration`,
    hidden_size 3584, talker from "Qwen2.5-Omni-7B/talker"); NVIDIA Megatron-Bridge's Qwen2.5-Omni provider
    (https://docs.nvidia.com/nemo/megatron-bridge/latest/apidocs/bridge/bridge.models.qwen_omni.qwen25_omni_provider.html:
    mrope_section [16, 24, 24], vocab 152064, separate `thinker.lm_head.weight`).
(b) Audio Flamingo 3 (`nvidia/audio-flamingo-3-hf`): `AudioFlamingo3ForConditionalGeneration` = Whisper-large-v3
    sized encoder (hidden 1280, 32 layers, 20 heads, ffn 5120, 128 mel bins) + projector + Qwen2.5-7B LM
    (hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads, rope theta 1e6, vocab 151672).
    Source: transformers `models/audioflamingo3/convert_audioflamingo3_to_hf.py` (the converter that wrote the
    -hf checkpoint: `Qwen2Config(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
    num_hidden_layers=28, num_key_value_heads=4, rope_theta=1000000.0, use_cache=False, vocab_size=151672)`
    and `AudioFlamingo3Config(text_config=...)` with the default `AudioFlamingo3EncoderConfig`, i.e.
    1280/32/20/5120/128).

Per model and batch size (1 and 4), over N synthetic ~5 s 16 kHz clips with the SER prompt, greedy,
max_new_tokens 20, after an untimed warm-up pass over every batch shape, in `--rounds` timed passes (order
of the modes alternated between rounds; one untimed warm-up batch before each mode's pass):
  plain    no hooks at all
  capture  SpanTracker + StatsRecorder on the thinker gate site (act_fn output), result copied to host once
           per batch (as `emotion_neurons.stages.generate.run` does)
  steer    SpanTracker + Intervention steer, alpha 1.0, a random 0.5 % of the neurons of every layer, all positions
  steer0   the same with alpha 0 (a check: its output must equal plain's)
Time per instance (torch.cuda.synchronize around each batch; split into input preparation and generation;
mean over rounds), peak GPU memory per mode (torch.cuda.max_memory_allocated, reset before each mode),
capture and steer overhead versus plain, and checks: captured token counts per span positive (audio count =
placeholders), steer0 text equal to plain's, and token ids of capture / steer0 / a repeated plain pass against
plain. Because greedy argmax over a random 150k vocabulary in bf16 is full of near-ties, any 1-ulp difference
flips tokens; a determinism report therefore compares probe-module outputs and logits of one prefill bitwise
(plain vs plain again, vs steer0, vs capture; default and deterministic algorithms) and generates the same
instance twice without hooks (default, with another generation in between, deterministic algorithms, SDPA
without the cuDNN backend, SDPA math only), comparing ids and per-step logits. On the H100 / torch 2.11 /
transformers 5.17 run, Qwen2.5-Omni's decode steps differed run to run under default SDPA and under
deterministic algorithms, and were bitwise reproducible once the cuDNN SDPA backend was excluded
(bench/RESULTS-gpu-fullsize.md).

Model builders, the timing loop and the result table come from `harness.py`, the determinism checks from
`determinism.py`; this script holds the modes, the summary over rounds and its table.

Run on a GPU machine:  PYTHONPATH=src python bench/gpu_fullsize.py --out DIR
Smoke test on CPU:     PYTHONPATH=src python bench/gpu_fullsize.py --tiny --out /tmp/bench_tiny
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
from determinism import determinism_report  # noqa: E402 - bench/ is on sys.path when run as a script
from harness import (  # noqa: E402
    Hooks,
    IdRecorder,
    build_model,
    build_tiny_dir,
    environment,
    load_adapter,
    log,
    md_table,
    pick_device,
    random_masks,
    synthetic,
    timed_batches,
    write_results,
)

from emotion_neurons import SPANS
from emotion_neurons.types import GenerationSettings, Instance

MODES = ("plain", "capture", "steer", "steer0")
LABELS = {"qwen2_5_omni": "Qwen2.5-Omni-7B", "audio_flamingo3": "AudioFlamingo3"}


def run_mode(
    adapter: Any,
    mode: str,
    bs: int,
    insts: list[Instance],
    audios: list[np.ndarray],
    settings: GenerationSettings,
    masks: torch.Tensor,
    ids: IdRecorder,
    device: torch.device,
    warmup: bool = True,
) -> dict[str, Any]:
    """Generate for all instances in batches of `bs` under `mode`; time, peak memory, ids and capture checks."""
    hooks = Hooks(adapter, mode, masks)
    rows: dict[str, dict[str, Any]] = {}
    checks: list[str] = []
    t_prep = t_gen = 0.0
    n_tokens = 0
    with hooks.attached():
        start_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for tb in timed_batches(adapter, hooks, insts, audios, bs, settings, device, warmup=warmup):
            t_prep += tb.prepare_seconds
            t_gen += tb.generate_seconds
            batch, stats = [insts[i] for i in tb.idx], tb.stats
            prompt_len = int(tb.prepared.inputs["input_ids"].shape[1])
            new = ids.last[:, prompt_len:]
            n_audio = (tb.prepared.span_codes == SPANS.index("audio")).sum(-1).tolist()
            for j, (inst, g) in enumerate(zip(batch, tb.outputs, strict=True)):
                n_tokens += g.n_generated
                row = {"ids": new[j].tolist(), "text": g.text, "n_generated": g.n_generated}
                if stats is not None:
                    tok = stats["tokens"][j].tolist()
                    row["tokens_per_span"] = dict(zip(SPANS, tok, strict=True))
                    if not all(t > 0 for t in tok):
                        checks.append(f"{inst.id}: a span has no captured tokens: {row['tokens_per_span']}")
                    if tok[SPANS.index("audio")] != n_audio[j]:
                        checks.append(f"{inst.id}: audio tokens {tok[0]} != placeholders {n_audio[j]}")
                    if not np.isfinite(stats["act_sum"][j]).all():
                        checks.append(f"{inst.id}: non-finite activation sums")
                rows[inst.id] = row
    n = len(insts)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "mode": mode,
        "batch_size": bs,
        "n": n,
        "seconds_per_instance": (t_prep + t_gen) / n,
        "prepare_seconds_per_instance": t_prep / n,
        "generate_seconds_per_instance": t_gen / n,
        "generated_tokens": n_tokens,
        "peak_gpu_gib": None if peak is None else round(peak / 2**30, 3),
        "peak_over_start_gib": None if peak is None else round((peak - start_bytes) / 2**30, 3),
        "check_failures": checks,
        "rows": rows,
    }


def bench_model(
    name: str, label: str, tiny_dir: Path, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    res: dict[str, Any] = {"model": label, "adapter": name}
    model, info = build_model(name, tiny_dir, args.tiny, device, dtype)
    res["build"] = info
    log(
        f"{label}: built {info['n_params'] / 1e9:.2f} B params, {info['weights_gib']} GiB "
        f"in {info['build_seconds']} s (allocated {info.get('allocated_after_build_gib')} GiB)"
    )

    adapter = load_adapter(name, model, tiny_dir, device)
    del model
    sites = adapter.resolve_sites("thinker", "gate")
    n_neurons = adapter.n_neurons("thinker")
    res["sites"] = {"n_layers": len(sites), "n_neurons": n_neurons, "first": sites[0].name}
    del sites
    masks = random_masks(res["sites"]["n_layers"], n_neurons, args.mask_frac, device)
    res["mask_neurons_per_layer"] = int(masks[0].sum())
    gen_modules = [adapter.model] + ([adapter.model.thinker] if hasattr(adapter.model, "thinker") else [])
    ids = IdRecorder(gen_modules)
    del gen_modules
    insts, audios = synthetic(args.n, args.seconds)
    res["prompt_example"] = insts[0].prompt
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    try:
        # warm-up: every batch shape once, untimed
        for bs in args.batch_sizes:
            run_mode(adapter, "plain", bs, insts, audios, settings, masks, ids, device, warmup=False)
        log(f"{label}: warm-up done")
        rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
        plan = [(bs, mode) for bs in args.batch_sizes for mode in MODES]
        for rnd in range(args.rounds):
            for bs, mode in plan if rnd % 2 == 0 else plan[::-1]:  # alternate the order against drift
                r = run_mode(adapter, mode, bs, insts, audios, settings, masks, ids, device)
                rounds.setdefault((mode, bs), []).append(r)
                log(
                    f"{label} round {rnd} bs={bs} {mode:7s}: {r['seconds_per_instance']:.3f} s/inst "
                    f"(prepare {r['prepare_seconds_per_instance']:.3f}, generate "
                    f"{r['generate_seconds_per_instance']:.3f}), peak {r['peak_gpu_gib']} GiB"
                )
        res["runs"], res["checks"] = summarise(rounds, args)
        log(f"{label}: checks {json.dumps(res['checks'])}")
        if not args.skip_determinism:
            res["determinism"] = determinism_report(
                adapter, insts, audios, masks, args.batch_sizes, args.max_new_tokens, args.repro_pairs
            )
            log(f"{label}: determinism {json.dumps(res['determinism'])}")
    finally:
        ids.remove()
        del adapter, ids, masks
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            res["allocated_after_release_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)
    return res


def summarise(
    rounds: dict[tuple[str, int], list[dict[str, Any]]], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Mean over rounds per (mode, batch size); ratios against plain; id comparisons within each round."""
    runs: list[dict[str, Any]] = []
    by: dict[tuple[str, int], dict[str, Any]] = {}
    for bs in args.batch_sizes:
        for mode in MODES:
            rs = rounds[(mode, bs)]
            s = [r["seconds_per_instance"] for r in rs]
            g = [r["generate_seconds_per_instance"] for r in rs]
            p = [r["prepare_seconds_per_instance"] for r in rs]
            tok = sum(r["generated_tokens"] for r in rs)
            row = {
                "mode": mode,
                "batch_size": bs,
                "n": rs[0]["n"],
                "rounds": len(rs),
                "seconds_per_instance": round(float(np.mean(s)), 4),
                "seconds_per_instance_rounds": [round(x, 4) for x in s],
                "prepare_seconds_per_instance": round(float(np.mean(p)), 4),
                "generate_seconds_per_instance": round(float(np.mean(g)), 4),
                "generated_tokens_per_round": [r["generated_tokens"] for r in rs],
                "generated_tokens_per_second": round(tok / (float(np.sum(g)) * rs[0]["n"]), 2),
                "peak_gpu_gib": max((r["peak_gpu_gib"] or 0) for r in rs)
                if rs[0]["peak_gpu_gib"] is not None
                else None,
                "peak_over_start_gib": (
                    max(r["peak_over_start_gib"] for r in rs)
                    if rs[0]["peak_over_start_gib"] is not None
                    else None
                ),
                "check_failures": sorted({c for r in rs for c in r["check_failures"]}),
                "n_generated": {k: v["n_generated"] for k, v in rs[0]["rows"].items()},
            }
            if mode == "plain":
                row["rows_round0"] = rs[0]["rows"]
            if mode == "capture":
                row["tokens_per_span"] = {k: v["tokens_per_span"] for k, v in rs[0]["rows"].items()}
            by[(mode, bs)] = row
            runs.append(row)
    checks: dict[str, Any] = {}
    for bs in args.batch_sizes:
        plain_rs = rounds[("plain", bs)]
        plain = by[("plain", bs)]
        for mode in ("capture", "steer", "steer0"):
            row, rs = by[(mode, bs)], rounds[(mode, bs)]
            row["overhead_vs_plain"] = round(row["seconds_per_instance"] / plain["seconds_per_instance"], 3)
            row["generate_overhead_vs_plain"] = round(
                row["generate_seconds_per_instance"] / plain["generate_seconds_per_instance"], 3
            )
            row["rows_equal_to_plain_ids"] = [
                int(sum(r["rows"][i]["ids"] == pr["rows"][i]["ids"] for i in pr["rows"]))
                for r, pr in zip(rs, plain_rs, strict=True)
            ]
            row["rows_equal_to_plain_text"] = [
                int(sum(r["rows"][i]["text"] == pr["rows"][i]["text"] for i in pr["rows"]))
                for r, pr in zip(rs, plain_rs, strict=True)
            ]
        plain["rows_equal_to_round0_ids"] = [
            int(sum(r["rows"][i]["ids"] == plain_rs[0]["rows"][i]["ids"] for i in r["rows"]))
            for r in plain_rs
        ]
        n = plain["n"]
        checks[f"bs{bs}_capture_token_counts_positive"] = not by[("capture", bs)]["check_failures"]
        checks[f"bs{bs}_steer0_text_equal_plain"] = all(
            x == n for x in by[("steer0", bs)]["rows_equal_to_plain_text"]
        )
        checks[f"bs{bs}_steer0_rows_equal_plain_ids"] = by[("steer0", bs)]["rows_equal_to_plain_ids"]
        checks[f"bs{bs}_capture_rows_equal_plain_ids"] = by[("capture", bs)]["rows_equal_to_plain_ids"]
        checks[f"bs{bs}_plain_rows_equal_plain_round0_ids"] = plain["rows_equal_to_round0_ids"]
        checks[f"bs{bs}_steer1_rows_changed"] = [n - x for x in by[("steer", bs)]["rows_equal_to_plain_ids"]]
    if len(args.batch_sizes) > 1:
        b0, b1 = args.batch_sizes[0], args.batch_sizes[-1]
        p0, p1 = rounds[("plain", b0)][0]["rows"], rounds[("plain", b1)][0]["rows"]
        checks[f"plain_rows_equal_bs{b0}_vs_bs{b1}"] = int(sum(p0[i]["ids"] == p1[i]["ids"] for i in p0))
    cap = rounds[("capture", args.batch_sizes[0])][0]["rows"]
    checks["tokens_per_span_example"] = cap[next(iter(cap))]["tokens_per_span"]
    return runs, checks


# -- report --------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    lines = []
    env = result["environment"]
    a = result["args"]
    lines.append(
        f"Device: {env.get('nvidia_smi') or env.get('gpu') or env.get('cpu')}; torch {env['torch']}, "
        f"transformers {env['transformers']}; {env['date_utc']}; N={a['n']} instances of ~{a['seconds']} s, "
        f"max_new_tokens {a['max_new_tokens']}, greedy; mean of {a['rounds']} rounds per cell"
    )
    lines.append("")
    header = ["model", "bs", "mode", "s/instance (rounds)", "prepare s/inst", "generate s/inst", "gen tok/s",
              "peak GPU GiB", "peak over start GiB", "vs plain", "ids = plain (per round)"]  # fmt: skip
    table = []
    for m in result["models"]:
        if "error" in m:
            table.append([m["model"], "-", "ERROR", m["error"].splitlines()[-1], *[""] * 7])
            continue
        for r in m["runs"]:
            ov = r.get("overhead_vs_plain")
            eq = r.get("rows_equal_to_plain_ids", r.get("rows_equal_to_round0_ids"))
            n = r["n"]
            per = "/".join(f"{x:.3f}" for x in r["seconds_per_instance_rounds"])
            table.append([
                m["model"], r["batch_size"], r["mode"], f"{r['seconds_per_instance']:.3f} ({per})",
                f"{r['prepare_seconds_per_instance']:.3f}", f"{r['generate_seconds_per_instance']:.3f}",
                r["generated_tokens_per_second"], r["peak_gpu_gib"], r["peak_over_start_gib"],
                "-" if ov is None else f"{ov:.3f}x", "-" if eq is None else ", ".join(f"{x}/{n}" for x in eq),
            ])  # fmt: skip
    lines += md_table(header, table)
    lines.append("")
    for m in result["models"]:
        if "error" in m:
            continue
        b = m["build"]
        lines.append(
            f"- {m['model']}: {b['built']}; {b['n_params'] / 1e9:.2f} B params, {b['weights_gib']} GiB "
            f"{'/'.join(b['param_dtypes'])} on {'/'.join(b['param_devices'])}, built in {b['build_seconds']} s; "
            f"text {b['text_hidden']}/{b['text_intermediate']}/{b['text_layers']} layers/{b['text_heads']} heads/"
            f"{b['text_kv_heads']} KV, vocab {b['vocab']}; audio encoder {b['audio_encoder_layers']} layers; "
            f"attention {b['attn_implementation']}; hooks on {m['sites']['n_layers']} x {m['sites']['n_neurons']} "
            f"gate neurons, steer mask {m['mask_neurons_per_layer']} per layer"
        )
        lines.append(f"  - checks: {json.dumps(m['checks'])}")
        if "determinism" in m:
            d = m["determinism"]
            for key in ("forward", "forward_deterministic"):
                summary = {
                    mode: {p: (v["equal"] if isinstance(v, dict) else v) for p, v in probes.items()}
                    for mode, probes in d[key].items()
                }
                lines.append(
                    f"  - {key} (bs {d['forward_batch_size']}), bitwise equal to plain: {json.dumps(summary)}"
                )
            for setting, v in d["generate_twice_bs1"].items():
                if setting == "deterministic_mode_warnings":
                    lines.append(f"  - warnings under deterministic algorithms: {json.dumps(v)}")
                else:
                    lines.append(f"  - same instance generated twice (bs 1), {setting}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test of this script)")
    ap.add_argument("--models", nargs="+", default=["qwen2_5_omni", "audio_flamingo3"])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument(
        "--rounds", type=int, default=3, help="timed passes per (mode, batch size), order alternated"
    )
    ap.add_argument("--mask-frac", type=float, default=0.005)
    ap.add_argument("--repro-pairs", type=int, default=4, help="instances generated twice per setting")
    ap.add_argument(
        "--skip-determinism", action="store_true", help="skip the bitwise no-op / reproducibility checks"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    args = ap.parse_args(argv)

    device, dtype = pick_device(args.device, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    if not args.tiny and device.type != "cuda":
        print("full-size models need a CUDA device; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "args": {**vars(args), "dtype": str(dtype)},
        "environment": environment(device),
        "models": [],
    }
    log(json.dumps(result["environment"]))
    with tempfile.TemporaryDirectory(prefix="bench_tiny_") as tmp:
        for name in args.models:
            gc.collect()
            t0 = time.perf_counter()
            label = LABELS.get(name, name) + (" (tiny)" if args.tiny else "")
            try:
                tiny_dir = build_tiny_dir(name, Path(tmp))  # tokenizer, feature extractor/processor, ids
                log(f"{name}: tiny tokenizer/processor dir built in {time.perf_counter() - t0:.1f} s")
                res = bench_model(name, label, tiny_dir, args, device, dtype)
            except Exception:  # noqa: BLE001 - report and go on with the next model
                res = {"model": label, "adapter": name, "error": traceback.format_exc()}
                log(res["error"])
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            res["total_seconds"] = round(time.perf_counter() - t0, 1)
            result["models"].append(res)
            write_results(out_dir, result, markdown)
    print(markdown(result), flush=True)
    failed = [m["model"] for m in result["models"] if "error" in m]
    bad = [
        f"{m['model']}: {k}"
        for m in result["models"]
        if "error" not in m
        for k, v in m["checks"].items()
        if isinstance(v, bool) and not v
    ]
    if failed or bad:
        log(f"FAILED models {failed}; failed checks {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
