"""Shared pieces of the GPU benchmarks: full-size model builders (random weights, real classes, real adapters),
synthetic SER inputs, timing helpers and the environment record.

Each benchmark script (`gpu_fullsize.py`, `gpu_fastpath.py`) imports what it needs from here, so a new
measurement adds its own timing loop and table and nothing else. Run the scripts as `python bench/NAME.py`
(this folder is then on `sys.path`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from emotion_neurons.hooks import Intervention, InterventionSpec, SpanTracker, StatsRecorder
from emotion_neurons.prompts import option_order, ser_prompt
from emotion_neurons.types import Instance

SR = 16000


LABELS = ["neutral", "angry", "happy", "sad", "surprise"]


#: tasks.ser.prompt of config.yaml at the time of writing (read from config.yaml when it is there)
SER_TEMPLATE = (
    "What emotion does the speaker express in this audio? Choose one option.\n{options}\n"
    "Answer with the number of the option only."
)


QWEN_OMNI_7B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=False,
    initializer_range=0.02,
)


QWEN_OMNI_7B_AUDIO = dict(
    d_model=1280,
    encoder_layers=32,
    encoder_attention_heads=20,
    encoder_ffn_dim=5120,
    num_mel_bins=128,
    output_dim=3584,
    n_window=100,
    max_source_positions=1500,
    initializer_range=0.02,
)


QWEN_OMNI_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    initializer_range=0.02,
)


#: thinker-level keys taken over from the tiny checkpoint (token ids of the tiny tokenizer, TMRoPE timing)
QWEN_THINKER_ID_KEYS = (
    "audio_token_index",
    "image_token_index",
    "video_token_index",
    "audio_start_token_id",
    "audio_end_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "user_token_id",
    "pad_token_id",
    "eos_token_id",
    "position_id_per_seconds",
    "seconds_per_chunk",
)


AF3_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=151672,
    max_position_embeddings=32768,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    tie_word_embeddings=False,
    use_cache=False,  # as the converter writes it; the adapter forces the cache on
    initializer_range=0.02,
)


AF3_AUDIO = dict(  # Whisper-large-v3 encoder
    num_mel_bins=128,
    num_hidden_layers=32,
    num_attention_heads=20,
    intermediate_size=5120,
    hidden_size=1280,
    max_source_positions=1500,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def build_random(
    cls: Any, config: Any, device: torch.device, dtype: torch.dtype
) -> tuple[Any, dict[str, Any]]:
    """Instantiate `cls(config)` with its tensors allocated on `device` in `dtype` (no CPU copy, no download).

    The module constructors allocate straight on the device (torch.device context) and the constructors'
    and transformers' weight initialisation draw the random values there, so a 7-8 B model takes about a
    second; every parameter and floating buffer is checked finite. RoPE and sinusoid buffers are computed by
    the constructors as in `from_pretrained`.
    """
    sync(device)
    t0 = time.perf_counter()
    with quiet_transformers(), torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    model.eval()
    sync(device)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    bad += [
        n for n, b in model.named_buffers() if b.is_floating_point() and not bool(torch.isfinite(b).all())
    ]
    if bad:
        raise RuntimeError(f"non-finite random tensors: {bad[:10]}")
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    devices = sorted({str(p.device) for p in model.parameters()})
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    info = {
        "class": cls.__name__,
        "build_seconds": round(build_s, 2),
        "finite_check_seconds": round(time.perf_counter() - t0, 2),
        "n_params": int(n_params),
        "weights_gib": round(n_bytes / 2**30, 3),
        "param_devices": devices,
        "param_dtypes": dtypes,
    }
    return model, info


def qwen_config(tiny_dir: Path, tiny: bool, audio_output: bool = False) -> Any:
    """Qwen2.5-Omni-7B config with the tiny tokenizer's ids; `audio_output` adds the 7B talker and token2wav."""
    from transformers import Qwen2_5OmniConfig

    with quiet_transformers():
        tiny_cfg = Qwen2_5OmniConfig.from_pretrained(tiny_dir)
        if tiny:
            tiny_cfg.enable_audio_output = audio_output
            return tiny_cfg
        th = tiny_cfg.thinker_config
        thinker: dict[str, Any] = {
            k: getattr(th, k) for k in QWEN_THINKER_ID_KEYS if getattr(th, k, None) is not None
        }
        text = dict(QWEN_OMNI_7B_TEXT)
        text.update(pad_token_id=th.text_config.pad_token_id, eos_token_id=th.text_config.eos_token_id)
        thinker.update(
            text_config=text, audio_config=dict(QWEN_OMNI_7B_AUDIO), vision_config=dict(QWEN_OMNI_7B_VISION)
        )
        if not audio_output:
            # talker/token2wav configs keep their defaults: with enable_audio_output=False they are not built
            return Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)
        tk = tiny_cfg.talker_config
        talker = dict(QWEN_OMNI_7B_TALKER)
        talker.update({k: getattr(tk, k) for k in QWEN_TALKER_ID_KEYS if getattr(tk, k, None) is not None})
        # token2wav: transformers' DiT / BigVGAN defaults are the 7B checkpoint's sizes
        return Qwen2_5OmniConfig(
            thinker_config=thinker, talker_config=talker, token2wav_config={}, enable_audio_output=True
        )


#: Qwen2.5-Omni-7B talker (config.json `talker_config`; about 1.35 B parameters): codec vocabulary 8448 with
#: the default codec pad/bos/eos/mask ids 8292-8296, embedding_size = thinker hidden size
QWEN_OMNI_7B_TALKER = dict(
    vocab_size=8448,
    embedding_size=3584,
    hidden_size=896,
    intermediate_size=18944,
    num_hidden_layers=24,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=32768,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    initializer_range=0.02,
)
#: talker keys that are thinker-vocabulary ids (tts text tokens, placeholders): taken from the tiny checkpoint
QWEN_TALKER_ID_KEYS = (
    "tts_text_start_token_id",
    "tts_text_end_token_id",
    "tts_text_pad_token_id",
    "audio_token_index",
    "image_token_index",
    "video_token_index",
    "audio_start_token_id",
    "audio_end_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "position_id_per_seconds",
    "seconds_per_chunk",
)


def add_random_speaker(model: Any, tiny_dir: Path, ref_frames: int = 300, seed: int = 0) -> None:
    """A `speaker_map` entry per tiny speaker with full-size random `cond` / `ref_mel` (spk_dict.pt format)."""
    spk = torch.load(Path(tiny_dir) / "spk_dict.pt", weights_only=True)
    dit = model.config.token2wav_config.dit_config
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.speaker_map = {
        name: {
            "cond": torch.randn(1, dit.enc_emb_dim, generator=gen).to(dev),
            "ref_mel": torch.randn(1, ref_frames, dit.mel_dim, generator=gen).to(dev),
            "bos_token": int(v["bos_token"]),
        }
        for name, v in spk.items()
    }


def clamp_token2wav_codes(model: Any) -> None:
    """A random talker emits codec ids up to 8447 while token2wav embeds 8193: clamp (else a device assert).

    At the DiT's codec embedding, the only reader of the codes, so the per-row and the batched token2wav
    paths (`model.token2wav_batch_size`) both see the clamped codes.
    """
    embed = model.token2wav.code2wav_dit_model.text_embed
    n = int(model.config.token2wav_config.dit_config.num_embeds)
    forward = embed.forward

    def clamped(code, *args, **kwargs):
        return forward(code.clamp(0, n - 1), *args, **kwargs)

    embed.forward = clamped


def af3_config(tiny_dir: Path, tiny: bool) -> Any:
    from transformers import AudioFlamingo3Config, AudioFlamingo3EncoderConfig, Qwen2Config

    tiny_cfg = AudioFlamingo3Config.from_pretrained(tiny_dir)
    if tiny:
        return tiny_cfg
    tt = tiny_cfg.text_config
    text = Qwen2Config(
        **AF3_TEXT, bos_token_id=tt.bos_token_id, eos_token_id=tt.eos_token_id, pad_token_id=tt.pad_token_id
    )
    return AudioFlamingo3Config(
        audio_config=AudioFlamingo3EncoderConfig(**AF3_AUDIO),
        text_config=text,
        audio_token_id=tiny_cfg.audio_token_id,
    )


def load_adapter(name: str, model: Any, tiny_dir: Path, device: torch.device) -> Any:
    """Run the adapter's real `load()` on the tiny directory, with `from_pretrained` returning `model`.

    So tokenizer, feature extractor / processor, stop ids, pad id, device and every consistency check are set
    exactly as for a real checkpoint; only the weights come from `model` instead of the disk.
    """
    from emotion_neurons.models import get_adapter

    adapter = get_adapter(name)
    if name == "qwen2_5_omni":
        from transformers import Qwen2_5OmniForConditionalGeneration as cls
    else:
        from transformers import AudioFlamingo3ForConditionalGeneration as cls
    with mock.patch.object(cls, "from_pretrained", staticmethod(lambda *a, **k: model)):
        adapter.load(
            str(tiny_dir), device=str(device), dtype=str(next(model.parameters()).dtype).split(".")[-1]
        )
    if adapter.model is not model:
        raise RuntimeError("adapter did not take the prebuilt model")
    return adapter


def ser_template() -> str:
    try:
        import yaml

        cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
        tmpl = cfg["tasks"]["ser"]["prompt"]
        if "{options}" in tmpl:
            return tmpl
    except Exception:  # noqa: BLE001 - the constant is the fallback
        pass
    return SER_TEMPLATE


def synthetic(n: int, seconds: float) -> tuple[list[Instance], list[np.ndarray]]:
    """N SER instances with ~`seconds` of 16 kHz audio (a tone plus noise, lengths varied +-8 %)."""
    template = ser_template()
    rng = np.random.default_rng(0)
    insts, audios = [], []
    for i in range(n):
        dur = seconds * (0.92 + 0.16 * i / max(1, n - 1))
        t = np.arange(int(dur * SR)) / SR
        freq = 150.0 + 40.0 * i
        wav = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
        wav = (wav + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        iid = f"bench/{i:02d}"
        options = option_order(LABELS, iid, 0)
        insts.append(
            Instance(
                id=iid, task="ser", wav="", speaker="s", emotion=LABELS[i % len(LABELS)], split="ident",
                prompt=ser_prompt(template, options), options=options,
            )
        )  # fmt: skip
        audios.append(wav)
    return insts, audios


class IdRecorder:
    """Keeps the token ids `generate` returned last (the adapters only hand back decoded text)."""

    def __init__(self, modules: list[Any], keep_logits: int = 0) -> None:
        self.last: torch.Tensor | None = None
        #: [B, K, V] float32 logits of the first `keep_logits` steps, when generate returned them
        self.logits: torch.Tensor | None = None
        self.keep_logits = keep_logits
        self.modules = list(modules)
        for m in self.modules:
            m.generate = self._wrap(m.generate)

    def _wrap(self, fn):
        def generate(*args, **kwargs):
            out = fn(*args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out  # speech: (sequences, audio)
            seq = first if isinstance(first, torch.Tensor) else first.sequences
            self.last = seq.detach().cpu()
            logits = getattr(first, "logits", None)
            if self.keep_logits and logits:
                self.logits = torch.stack([x.float() for x in logits[: self.keep_logits]], 1)
            return out

        return generate

    def remove(self) -> None:
        """Drop the wrappers (they close over bound methods, a reference cycle that keeps the model alive)."""
        for m in self.modules:
            if "generate" in m.__dict__:
                del m.__dict__["generate"]
        self.modules = []


def random_masks(
    n_layers: int, n_neurons: int, frac: float, device: torch.device, seed: int = 0
) -> torch.Tensor:
    """[L, N] bool: `round(frac * N)` random neurons per layer (at least one)."""
    k = max(1, int(round(frac * n_neurons)))
    gen = torch.Generator().manual_seed(seed)
    m = torch.zeros(n_layers, n_neurons, dtype=torch.bool)
    for layer in range(n_layers):
        m[layer, torch.randperm(n_neurons, generator=gen)[:k]] = True
    return m.to(device)


@contextlib.contextmanager
def deterministic(enabled: bool, caught: list[str] | None = None):
    """cuDNN deterministic algorithms and torch's deterministic implementations (warn only), restored after.

    Ops without a deterministic implementation still run (warn_only); their warnings go to `caught`.
    """
    if not enabled:
        yield
        return
    prev = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    prev_alg = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            yield
        if caught is not None:
            for w in ws:
                msg = f"{w.category.__name__}: {str(w.message)[:300]}"
                if msg not in caught:
                    caught.append(msg)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev
        torch.use_deterministic_algorithms(prev_alg, warn_only=prev_warn)


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_total_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 2)
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=False,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env




class Hooks:
    """The hook set of one mode: none (plain), tracker + recorder (capture), tracker + steer (steer, steer0).

    The recorder and the intervention are made once and re-attached for every `attached()` (as
    `generate.run` keeps one per shard): their device buffers keep their addresses, so a compiled / CUDA-graph
    decode step is not re-recorded on every timed call.
    """

    def __init__(self, adapter: Any, mode: str, masks: torch.Tensor) -> None:
        self.adapter, self.mode, self.masks = adapter, mode, masks
        self.sites = adapter.resolve_sites("thinker", "gate")
        self.tracker = SpanTracker(adapter.component_stop_token_ids("thinker"))
        self.root = adapter.decoder_root("thinker")
        self.iv: Intervention | None = None
        self.rec: StatsRecorder | None = None
        if mode in ("steer", "steer0"):
            spec = InterventionSpec("steer", alpha=1.0 if mode == "steer" else 0.0, positions="all")
            self.iv = Intervention(self.sites, self.tracker, spec)
        if mode == "capture":
            self.rec = StatsRecorder(self.sites, self.tracker)

    @contextlib.contextmanager
    def attached(self):
        with contextlib.ExitStack() as stack:
            if self.mode != "plain":
                stack.enter_context(self.tracker.attached(self.root))
            for part in (self.iv, self.rec):
                if part is not None:
                    stack.enter_context(part.attached())
            yield self

    def arm(self, prepared: Any) -> None:
        """Per batch, as `emotion_neurons.stages.generate.run` does before `adapter.generate`."""
        self.tracker.start(self.adapter.prefill_span_codes("thinker", prepared))
        n = int(prepared.inputs["input_ids"].shape[0])
        if self.rec is not None:
            self.rec.reset(n)
        if self.iv is not None:
            self.iv.set_masks(self.masks.unsqueeze(0).expand(n, -1, -1))


# -- shared by the benchmark scripts: device choice, model builders by adapter name, the timing loop, results --


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto`: CUDA when present; bfloat16 on CUDA, float32 on CPU."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


def build_tiny_dir(name: str, root: Path) -> Path:
    """The tiny checkpoint directory of adapter `name` (tokenizer, processor, token ids; `emotion_neurons.tiny`)."""
    from emotion_neurons.tiny import audio_flamingo3 as tiny_af3
    from emotion_neurons.tiny import qwen_omni as tiny_qwen

    builders = {"qwen2_5_omni": tiny_qwen, "audio_flamingo3": tiny_af3}
    if name not in builders:
        raise KeyError(f"no benchmark builder for adapter {name!r}; have {sorted(builders)}")
    with quiet_transformers():
        return builders[name].build(Path(root) / name)


def build_model(
    name: str, tiny_dir: Path, tiny: bool, device: torch.device, dtype: torch.dtype, audio_output: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Random-weight model of adapter `name` at full size (or the tiny config): the model and its build record.

    Qwen2.5-Omni is the thinker only unless `audio_output`; Audio Flamingo 3 gets the checkpoint's sampling
    generation config (the adapter overrides it for greedy decoding).
    """
    from transformers import (
        AudioFlamingo3ForConditionalGeneration,
        GenerationConfig,
        Qwen2_5OmniForConditionalGeneration,
    )

    if name == "qwen2_5_omni":
        cfg = qwen_config(tiny_dir, tiny, audio_output=audio_output)
        model, info = build_random(Qwen2_5OmniForConditionalGeneration, cfg, device, dtype)
        text_cfg = cfg.thinker_config.text_config
        audio_layers = cfg.thinker_config.audio_config.encoder_layers
        info["built"] = "Qwen2_5OmniForConditionalGeneration(enable_audio_output=False): thinker only"
        if audio_output:
            info["built"] = "Qwen2_5OmniForConditionalGeneration: thinker + talker + token2wav"
        info["has_talker"] = bool(getattr(model, "has_talker", False))
    elif name == "audio_flamingo3":
        cfg = af3_config(tiny_dir, tiny)
        model, info = build_random(AudioFlamingo3ForConditionalGeneration, cfg, device, dtype)
        model.generation_config = GenerationConfig.from_pretrained(tiny_dir)
        text_cfg = cfg.text_config
        audio_layers = cfg.audio_config.num_hidden_layers
        info["built"] = "AudioFlamingo3ForConditionalGeneration (encoder + projector + Qwen2 LM)"
    else:
        raise KeyError(f"no benchmark builder for adapter {name!r}")
    info.update(
        text_hidden=text_cfg.hidden_size,
        text_intermediate=text_cfg.intermediate_size,
        text_layers=text_cfg.num_hidden_layers,
        text_heads=text_cfg.num_attention_heads,
        text_kv_heads=text_cfg.num_key_value_heads,
        vocab=text_cfg.vocab_size,
        audio_encoder_layers=audio_layers,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
    )
    if device.type == "cuda":
        info["allocated_after_build_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)
    return model, info


@dataclasses.dataclass
class TimedBatch:
    """One timed batch of `timed_batches`: instance indices, inputs, outputs, captured statistics, seconds."""

    idx: list[int]
    prepared: Any
    outputs: list[Any]
    stats: dict[str, Any] | None
    prepare_seconds: float
    generate_seconds: float


def timed_batches(
    adapter: Any, hooks: Hooks, insts: list[Instance], audios: list[np.ndarray], bs: int, settings: Any,
    device: torch.device, warmup: bool = True,
) -> Iterator[TimedBatch]:  # fmt: skip
    """The timing loop: batches of `bs` (the first once more, untimed, with `warmup`), synchronised around
    input preparation and around generation (the recorder's host copy included, once per batch).

    Call inside `hooks.attached()`.
    """
    batches = [list(range(b, min(b + bs, len(insts)))) for b in range(0, len(insts), bs)]
    plan = ([(True, batches[0])] if warmup else []) + [(False, b) for b in batches]
    for warm, idx in plan:
        sync(device)
        t0 = time.perf_counter()
        prepared = adapter.prepare([insts[i] for i in idx], [audios[i] for i in idx])
        hooks.arm(prepared)
        sync(device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            gen = adapter.generate(prepared, settings)
        stats = hooks.rec.result() if hooks.rec is not None else None  # host copy, once per batch
        sync(device)
        t2 = time.perf_counter()
        if not warm:
            yield TimedBatch(idx, prepared, gen, stats, t1 - t0, t2 - t1)


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown table lines (a result table of a benchmark)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_results(out_dir: Path, result: dict[str, Any], markdown: Any) -> None:
    """`results.json` and `results.md` (from `markdown(result)`), rewritten after each model so a crash keeps them."""
    import json

    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(result))
