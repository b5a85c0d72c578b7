"""A tiny random checkpoint of funasr's real ``Emotion2vec`` class, loadable like emotion2vec_plus_large.

Why: the emotion judge (``judges.EmotionJudge``) must be exercised offline through the exact loading
path of the real model (``funasr.AutoModel`` on a local dir with config.yaml, model.pt, tokens.txt);
the real checkpoint (~300M parameters) cannot be downloaded here.

The backbone is random (seeded). A purely random classifier head would give the same argmax for every
utterance, because mean-pooled random features share one large common component. So the head is
calibrated, without labels: it is a random projection of the *whitened, centred* pooled features of a
fixed calibration set (synthetic harmonic/noise/tone signals, plus espeak-ng speech when available).
The argmax over angry/happy/neutral/sad/surprised then varies between utterances; the other four labels
get small random logits with a negative bias, so they rarely win. The scores mean nothing emotionally.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

TOKENS: tuple[str, ...] = (
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    "<unk>",
)
"""tokens.txt of emotion2vec+ (one label per line, "<Chinese>/<English>"); funasr returns these strings."""

MAIN_LABELS: tuple[str, ...] = ("angry", "happy", "neutral", "sad", "surprised")
"""Labels whose argmax is made to vary (the ESD emotions)."""

SAMPLE_RATE = 16000


def model_conf(embed_dim: int = 64, depth: int = 2, num_heads: int = 4) -> dict[str, Any]:
    """``model_conf`` of the tiny model: emotion2vec's structure (data2vec 2.0 audio) at toy width."""
    audio = {
        "type": "AUDIO",
        # Same strides as the real conv front end (320 samples per frame, 50 Hz), 64 channels.
        "feature_encoder_spec": f"[({embed_dim}, 10, 5)] + [({embed_dim}, 3, 2)] * 4 + [({embed_dim}, 2, 2)] * 2",
        "extractor_mode": "layer_norm",
        "conv_pos_depth": 2,
        "conv_pos_width": 19,
        "conv_pos_groups": 4,
        "conv_pos_pre_ln": False,
        "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0,
        "prenet_depth": 1,
        "prenet_layerdrop": 0.0,
        "prenet_dropout": 0.0,
        "decoder": None,
        "use_alibi_encoder": True,
        "local_grad_mult": 1.0,
        "num_extra_tokens": 4,
        "init_extra_token_zero": False,
        "learned_alibi": False,
        "alibi_max_pos": None,
        "learned_alibi_scale": True,
        "learned_alibi_scale_per_head": True,
        "learned_alibi_scale_per_layer": True,
        "alibi_scale": 1.0,
        "num_alibi_heads": num_heads,
        "model_depth": depth,
        "mask_prob": 0.5,
        "mask_prob_min": None,
        "mask_length": 5,
        "inverse_mask": True,
        "mask_dropout": 0.0,
        "add_masks": False,
        "keep_masked_pct": 0.0,
        "encoder_zero_mask": True,
        "mask_noise_std": 0.01,
        "mask_channel_prob": 0.0,
        "mask_channel_length": 64,
    }
    return {
        "loss_beta": 0.0,
        "loss_scale": None,
        "depth": depth,
        "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0,
        "num_heads": num_heads,
        "norm_eps": 1e-5,
        "norm_affine": True,
        "encoder_dropout": 0.0,
        "post_mlp_drop": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "dropout_input": 0.0,
        "layerdrop": 0.0,
        "embed_dim": embed_dim,
        "mlp_ratio": 4.0,
        "layer_norm_first": False,
        "average_top_k_layers": depth,
        "end_of_block_targets": False,
        "clone_batch": 1,
        "normalize": True,
        "modalities": {"audio": audio},
    }


def config(embed_dim: int = 64, depth: int = 2, num_heads: int = 4) -> dict[str, Any]:
    """config.yaml content: what funasr's local-dir loader reads (model class, model_conf, tokenizer)."""
    return {
        "model": "Emotion2vec",
        "model_conf": model_conf(embed_dim, depth, num_heads),
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
    }


def _pseudo_speech(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Harmonic complex with a moving f0, syllable-rate envelope and breath noise."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(70, 350) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * rng.uniform(2, 7) * t + rng.uniform(0, 6)), 0, None) ** 2
    x = x * env + rng.uniform(0, 0.3) * rng.standard_normal(n)
    return rng.uniform(0.05, 0.9) * x / np.abs(x).max()


def calibration_signals(seed: int = 0, n: int = 64) -> list[np.ndarray]:
    """Fixed synthetic calibration set: pseudo-speech, white noise, chirps (16 kHz float32)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        seconds = rng.uniform(0.8, 3.0)
        kind = i % 4
        if kind < 2:
            x = _pseudo_speech(rng, seconds)
        elif kind == 2:
            x = rng.uniform(0.01, 0.5) * rng.standard_normal(int(seconds * SAMPLE_RATE))
        else:
            t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
            f = rng.uniform(100, 3000)
            x = 0.3 * np.sin(2 * np.pi * f * t * (1 + rng.uniform(-0.5, 0.5) * t / seconds))
        out.append(x.astype(np.float32))
    return out


_CALIB_TEXTS = (
    "Hello there, how are you today?",
    "Numbers like seven and nine are odd.",
    "Bring me the blue box, please.",
    "What a wonderful surprise this is!",
    "I really do not like waiting here.",
    "The meeting starts in ten minutes.",
)
_CALIB_VOICES = (("en-us+m4", 45), ("en+f1", 55), ("en-gb+m2", 40), ("en-us+f3", 60))
_CALIB_PROSODY = ((0, 160, 80, 0), (15, 210, 110, 0), (-20, 120, 50, 2), (30, 180, 100, 1))


def speech_calibration_signals(n: int = 24) -> list[np.ndarray]:
    """espeak-ng utterances (texts, voices, prosody unlike the tiny corpus) so speech is spread out too."""
    from emotion_neurons.tiny.corpus import synthesize

    out = []
    for i in range(n):
        voice, pitch = _CALIB_VOICES[i % len(_CALIB_VOICES)]
        dp, speed, amp, gap = _CALIB_PROSODY[(i // len(_CALIB_VOICES)) % len(_CALIB_PROSODY)]
        out.append(
            synthesize(_CALIB_TEXTS[i % len(_CALIB_TEXTS)], voice, pitch + dp, speed, amp, gap, SAMPLE_RATE)
        )
    return out


def _pooled(model: Any, wav: np.ndarray) -> Any:
    """Exactly what ``Emotion2vec.inference`` feeds its head: layer-normed input, mean-pooled frames."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    x = F.layer_norm(x, x.shape).view(1, -1)
    with torch.no_grad():
        return model.extract_features(x, padding_mask=None)["x"].mean(dim=1)[0].double()


def build(
    out_dir: Path,
    seed: int = 0,
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    n_components: int = 16,
    logit_scale: float = 2.5,
    speech_calibration: bool | None = None,
) -> Path:
    """Write config.yaml, model.pt, tokens.txt (and tiny_info.json) to ``out_dir``; return ``out_dir``.

    ``speech_calibration``: also calibrate on espeak-ng speech (None = when espeak-ng is installed).
    Deterministic for a given seed (and espeak-ng version when speech calibration is used).
    """
    import torch
    import yaml
    from funasr.models.emotion2vec.model import Emotion2vec

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if speech_calibration is None:
        speech_calibration = shutil.which("espeak-ng") is not None

    cfg = config(embed_dim, depth, num_heads)
    torch.manual_seed(seed)
    model = Emotion2vec(model_conf=cfg["model_conf"], vocab_size=len(TOKENS)).eval()

    signals = calibration_signals(seed)
    if speech_calibration:
        signals += speech_calibration_signals()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a toy model: more threads only add sync cost (20x slower on a busy box)
    try:
        feats = torch.stack([_pooled(model, w) for w in signals])  # [n, D]
    finally:
        torch.set_num_threads(threads)

    # Whitened principal coordinates of the calibration features (signs fixed for portability).
    mu = feats.mean(dim=0)
    _, s, vt = torch.linalg.svd(feats - mu, full_matrices=False)
    k = min(n_components, int((s > s[0] * 1e-6).sum()))
    vt = vt[:k] * torch.sign(vt[:k].gather(1, vt[:k].abs().argmax(dim=1, keepdim=True)))
    whiten = vt / s[:k, None] * np.sqrt(len(feats))  # [k, D]

    gen = torch.Generator().manual_seed(seed + 1)
    rot = torch.randn(len(TOKENS), k, generator=gen, dtype=torch.float64)
    rot = rot / rot.norm(dim=1, keepdim=True)
    is_main = torch.tensor([t.split("/")[-1] in MAIN_LABELS for t in TOKENS])
    gain = torch.where(is_main, logit_scale, 0.25 * logit_scale).double()
    weight = gain[:, None] * (rot @ whiten)  # [9, D]
    bias = -(weight @ mu) - torch.where(is_main, 0.0, 1.5).double()
    with torch.no_grad():
        model.proj.weight.copy_(weight.float())
        model.proj.bias.copy_(bias.float())

    torch.save({k_: v.detach().clone() for k_, v in model.state_dict().items()}, out_dir / "model.pt")
    with open(out_dir / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
    (out_dir / "tokens.txt").write_text("\n".join(TOKENS) + "\n", encoding="utf-8")

    logits = feats.float() @ model.proj.weight.detach().T + model.proj.bias.detach()
    main_idx = [i for i, m in enumerate(is_main.tolist()) if m]
    wins = torch.bincount(logits[:, main_idx].argmax(dim=1), minlength=len(main_idx)).tolist()
    info = {
        "what": "tiny random emotion2vec (funasr Emotion2vec) for offline tests; scores are meaningless",
        "seed": seed,
        "embed_dim": embed_dim,
        "depth": depth,
        "n_components": k,
        "logit_scale": logit_scale,
        "speech_calibration": bool(speech_calibration),
        "n_calibration": len(signals),
        "calibration_argmax_counts": dict(zip(MAIN_LABELS, wins, strict=True)),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    (out_dir / "tiny_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir


#: ESD folder emotion -> emotion2vec+ English label (the judge's label map in config/demo.yaml)
ESD_TO_LABEL: dict[str, str] = {
    "Neutral": "neutral", "Angry": "angry", "Happy": "happy", "Sad": "sad", "Surprise": "surprised",
}  # fmt: skip


def corpus_items(corpus_dir: Path, speakers: list[str]) -> list[tuple[Path, int]]:
    """(wav path, index into TOKENS) of every utterance of ``speakers`` in an ESD-layout corpus, sorted."""
    index = {t.split("/")[-1]: i for i, t in enumerate(TOKENS)}
    items = []
    for spk in speakers:
        for emo, label in ESD_TO_LABEL.items():
            for wav in sorted((Path(corpus_dir) / spk / emo).glob("*.wav")):
                items.append((wav, index[label]))
    if not items:
        raise FileNotFoundError(f"no utterances of speakers {speakers} under {corpus_dir}")
    return items


def _load(path: Path) -> Any:
    import soundfile as sf
    import torch
    import torch.nn.functional as F

    wav, sr = sf.read(path, dtype="float32")
    if sr != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {sr}, the tiny judge trains on {SAMPLE_RATE} Hz")
    x = torch.from_numpy(wav)
    return F.layer_norm(x, x.shape).view(1, -1)  # as Emotion2vec.inference normalises its input


def _logits(model: Any, x: Any) -> Any:
    """What `Emotion2vec.inference` computes before its softmax: proj(mean over frames)."""
    return model.proj(model.extract_features(x, padding_mask=None)["x"].mean(dim=1))


def train(
    out_dir: Path,
    corpus_dir: Path,
    train_speakers: list[str],
    held_out_speakers: list[str],
    seed: int = 0,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
) -> dict[str, Any]:
    """A tiny Emotion2vec whose head is trained on the train speakers' five emotions (backbone random, frozen).

    Why: the EVC filter and metrics need a judge that hears emotion; it is saved in the real checkpoint's
    format, so `judges.EmotionJudge` loads it exactly like emotion2vec_plus_large. Only the `proj` head (on
    the mean-pooled frames, as `Emotion2vec.inference` computes it) is trained: training the backbone end to
    end on raw audio costs minutes per epoch on 2 shared cores. Returns (and writes to tiny_info.json) the
    held-out accuracy on ``held_out_speakers`` (unseen voices).
    """
    import time

    import torch
    import yaml
    from funasr.models.emotion2vec.model import Emotion2vec

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config()
    torch.manual_seed(seed)
    model = Emotion2vec(model_conf=cfg["model_conf"], vocab_size=len(TOKENS)).eval()
    train_items = corpus_items(corpus_dir, train_speakers)
    test_items = corpus_items(corpus_dir, held_out_speakers)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            feats = {p: model.extract_features(_load(p), padding_mask=None)["x"].mean(dim=1)[0] for p, _ in train_items + test_items}
    finally:
        torch.set_num_threads(threads)
    xtr = torch.stack([feats[p] for p, _ in train_items])
    ytr = torch.tensor([y for _, y in train_items])
    # standardise for the fit, then fold the scaling into proj so inference sees raw pooled features
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    w = torch.zeros(len(TOKENS), xtr.shape[1], requires_grad=True)
    b = torch.zeros(len(TOKENS), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy((xtr - mu) / sd @ w.T + b, ytr) + weight_decay * (w**2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.proj.weight.copy_(w / sd)
        model.proj.bias.copy_(b - (w / sd) @ mu)
    train_s = time.perf_counter() - t0

    main = [i for i, t in enumerate(TOKENS) if t.split("/")[-1] in MAIN_LABELS]

    def accuracy(items: list[tuple[Path, int]]) -> float:
        with torch.no_grad():
            hits = [int(main[int(model.proj(feats[p])[main].argmax())] == y) for p, y in items]
        return float(np.mean(hits))

    info = {
        "what": "tiny emotion2vec (funasr Emotion2vec): random frozen backbone, head trained on the synthetic "
        "corpus' identification voices",
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "weight_decay": weight_decay,
        "train_speakers": list(train_speakers),
        "held_out_speakers": list(held_out_speakers),
        "train_accuracy": accuracy(train_items),
        "held_out_accuracy": accuracy(test_items),
        "chance": 1.0 / len(ESD_TO_LABEL),
        "train_seconds": round(train_s, 1),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out_dir / "model.pt")
    with open(out_dir / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
    (out_dir / "tokens.txt").write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
    (out_dir / "tiny_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
