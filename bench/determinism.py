"""Determinism checks shared by the GPU benchmarks: are hooks exact no-ops, is the model run-to-run reproducible?

`determinism_report` compares probe-module outputs and logits of one prefill bitwise (plain vs plain again,
vs steer0, vs capture; default and deterministic algorithms) and generates the same instance twice without
hooks under several settings (`repro_setting`), comparing ids and per-step logits.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from harness import Hooks, deterministic  # noqa: E402 - bench/ is on sys.path when run as a script

from emotion_neurons.types import Instance


@contextlib.contextmanager
def repro_setting(name: str, caught: list[str]):
    """default(_interleaved) | deterministic | sdpa_no_cudnn (flash, efficient, math) | sdpa_math (math only)."""
    if name in ("default", "default_interleaved"):
        yield
    elif name == "deterministic":
        with deterministic(True, caught):
            yield
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.MATH]
        if name == "sdpa_no_cudnn":
            backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(backends):
            yield


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = list(out.values()) if isinstance(out, dict) else list(out.to_tuple())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def probe_modules(adapter: Any) -> dict[str, torch.nn.Module]:
    """Modules whose outputs the forward-determinism check compares, from the audio input to the logits."""
    sites = adapter.resolve_sites("thinker", "gate")
    names = dict(adapter.model.named_modules())
    wanted: dict[str, torch.nn.Module] = {}
    for name in names:
        for suffix in ("audio_tower.conv1", "audio_tower.layers.0", "audio_tower"):
            if name.endswith(suffix) and suffix not in wanted:
                wanted[suffix] = names[name]
    layer0 = sites[0].name.rsplit(".mlp.", 1)[0]
    wanted["lm.layers.0"] = names[layer0]
    wanted["lm.layers.0.act_fn"] = sites[0].module
    wanted[f"lm.layers.{len(sites) - 1}.act_fn"] = sites[-1].module
    return wanted


def forward_outputs(adapter: Any, mode: str, prepared: Any, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """One prefill forward of the decoder root (no cache) under `mode`; probe outputs + last-position logits."""
    hooks = Hooks(adapter, mode, masks)
    got: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str):
        def hook(module, args, output):
            t = _first_tensor(output)
            if t is not None and name not in got:
                got[name] = t.detach().clone()

        return hook

    try:
        with hooks.attached():
            for name, module in probe_modules(adapter).items():
                handles.append(module.register_forward_hook(keep(name)))
            hooks.arm(prepared)
            with torch.inference_mode():
                out = hooks.root(**prepared.inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    got["logits[:, -1]"] = out.logits[:, -1].detach().clone()
    del out
    return got


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    res = {}
    for k in a:
        x, y = a[k], b.get(k)
        if y is None or x.shape != y.shape:
            res[k] = "missing or shape differs"
            continue
        res[k] = {
            "equal": bool(torch.equal(x, y)),
            "max_abs_diff": float((x.float() - y.float()).abs().max()),
        }
    return res


def raw_generate(adapter: Any, prepared: Any, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation with per-step logits, called the way the adapter calls it (new ids, [B, steps, V])."""
    common: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=adapter.stop_token_ids,
        pad_token_id=adapter.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        if hasattr(adapter.model, "thinker"):  # Qwen2.5-Omni without speakers: the adapter calls the thinker
            out = adapter.model.thinker.generate(**prepared.inputs, use_audio_in_video=False, **common)
        else:
            out = adapter.model.generate(
                **prepared.inputs, use_cache=True, repetition_penalty=1.0, temperature=None, top_p=None,
                top_k=None, **common,
            )  # fmt: skip
    new = out.sequences[:, prepared.inputs["input_ids"].shape[1] :].cpu()
    return new, torch.stack(list(out.logits), 1).float()


def generation_repro(
    adapter: Any, insts: list[Instance], audios: list[np.ndarray], max_new_tokens: int, k: int
) -> dict[str, Any]:
    """Generate each of the first `k` instances twice (bs 1) per setting; compare ids and per-step logits.

    `default_interleaved` runs a bs-4 generation of other instances between the two runs (allocator and
    kernel state change in between), the other settings run the two generations back to back.
    """
    out: dict[str, Any] = {}
    caught: list[str] = []
    other = adapter.prepare(insts[-4:], audios[-4:])
    for setting in ("default", "default_interleaved", "deterministic", "sdpa_no_cudnn", "sdpa_math"):
        res: dict[str, Any] = {"rows_equal_ids": 0, "first_logit_diff_step": [], "first_id_diff_step": []}
        step0, anydiff = 0.0, 0.0
        try:
            with repro_setting(setting, caught):
                for i in range(k):
                    prepared = adapter.prepare(insts[i : i + 1], audios[i : i + 1])
                    ids_a, log_a = raw_generate(adapter, prepared, max_new_tokens)
                    if setting == "default_interleaved":
                        raw_generate(adapter, other, max_new_tokens)
                    ids_b, log_b = raw_generate(adapter, prepared, max_new_tokens)
                    res["rows_equal_ids"] += int(bool(torch.equal(ids_a, ids_b)))
                    n = min(log_a.shape[1], log_b.shape[1])
                    diff = (log_a[:, :n] - log_b[:, :n]).abs().amax(dim=(0, 2))  # per step
                    steps = torch.nonzero(diff > 0).flatten().tolist()
                    res["first_logit_diff_step"].append(steps[0] if steps else -1)
                    id_steps = torch.nonzero(ids_a[0, :n] != ids_b[0, :n]).flatten().tolist()
                    res["first_id_diff_step"].append(id_steps[0] if id_steps else -1)
                    step0 = max(step0, float(diff[0]))
                    # compare only up to the first id divergence: later steps see different inputs
                    upto = id_steps[0] + 1 if id_steps else n
                    anydiff = max(anydiff, float(diff[:upto].max()))
        except Exception as e:  # noqa: BLE001 - a backend may not support these shapes
            res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["step0_max_abs_logit_diff"] = step0
        res["max_abs_logit_diff_before_divergence"] = anydiff
        res["pairs"] = k
        out[setting] = res
    out["deterministic_mode_warnings"] = caught[:20]
    return out


def determinism_report(
    adapter: Any,
    insts: list[Instance],
    audios: list[np.ndarray],
    masks: torch.Tensor,
    batch_sizes: list[int],
    max_new_tokens: int,
    k: int,
) -> dict[str, Any]:
    """Are hooks exact no-ops (capture, steer alpha 0), and is the model itself run-to-run reproducible?

    Forward level: outputs of probe modules and the last-position logits of one prefill (the largest batch),
    plain vs plain again, vs steer0, vs capture, with default and with deterministic algorithms.
    Generation level (no hooks): the same instance generated twice, under default settings, with another
    generation in between, with deterministic algorithms, and with restricted SDPA backends.
    """
    bs = max(batch_sizes)
    prepared = adapter.prepare(insts[:bs], audios[:bs])
    report: dict[str, Any] = {"forward_batch_size": bs}
    for det in (False, True):
        with deterministic(det):
            base = forward_outputs(adapter, "plain", prepared, masks)
            report[f"forward{'_deterministic' if det else ''}"] = {
                m: compare(base, forward_outputs(adapter, "plain" if m == "plain2" else m, prepared, masks))
                for m in ("plain2", "steer0", "capture")
            }
            del base
    report["generate_twice_bs1"] = generation_repro(adapter, insts, audios, max_new_tokens, k)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report
