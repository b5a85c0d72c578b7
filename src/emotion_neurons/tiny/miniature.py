"""The trained miniature Qwen2.5-Omni: a tiny real `Qwen2_5OmniForConditionalGeneration` whose thinker answers
the SER prompt with the emotion word (docs/miniature.md gives the design and why).

- Inputs come from `QwenOmniAdapter.prepare` itself, so training sees exactly the pipeline's token sequences.
- The audio encoder is trained on another objective only (frame-level pitch, voicing and energy of the
  identification voices, `pretrain_encoder`), then frozen: emotion is decoded in the language model.
- Narrow SwiGLU MLPs; training stops at the first epoch where every emotion is learnt on the identification
  voices (recall >= `stop_recall`), before saturation, never looking at held-out voices.
- Deterministic per seed; cached by a hash of the recipe (`recipe_hash`) in the git-ignored `.tiny/`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("emotion_neurons.tiny")

LABELS: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "surprise")
"""SER labels of the demo (`tasks.ser.labels` of config/demo.yaml), ESD folder = label capitalised."""

SER_PROMPT = (
    "What emotion does the speaker express in this audio? Choose one option.\n\n{options}\n\n"
    "Answer with the emotion word only."
)
"""The demo's SER prompt (`tasks.ser.prompt` of config/demo.yaml; the test asserts they are equal)."""

IDENT_SPEAKERS: tuple[str, ...] = ("0011", "0012", "0013", "0014", "0015", "0016", "0017")
HELD_OUT_SPEAKERS: tuple[str, ...] = ("0018", "0019", "0020", "0021", "0022")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights (hashed into the cache key)."""

    seed: int = 0
    hidden: int = 64
    layers: int = 4
    intermediate: int = 64
    audio_layers: int = 2
    audio_d_model: int = 64
    init_range: float = 0.02
    encoder_steps: int = 300
    encoder_lr: float = 3e-3
    max_epochs: int = 12
    stop_recall: float = 0.8
    lr: float = 4e-3
    schedule: str = "cosine"  # lr factor per step, `lr_factor` (recipe 3 was "constant": it oscillated, docs 6)
    weight_decay: float = 0.01
    batch: int = 16
    option_seed: int = 0
    prompt: str = SER_PROMPT
    labels: tuple[str, ...] = LABELS
    train_speakers: tuple[str, ...] = IDENT_SPEAKERS
    held_out_speakers: tuple[str, ...] = HELD_OUT_SPEAKERS
    extra: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden, "layers": self.layers, "intermediate": self.intermediate,
            "audio_layers": self.audio_layers, "audio_d_model": self.audio_d_model, "init_range": self.init_range,
        }  # fmt: skip


def corpus_digest(corpus_dir: Path) -> str:
    """Hash of the corpus' transcripts and wav bytes (a changed corpus retrains the miniature)."""
    h = hashlib.sha256()
    for p in sorted(Path(corpus_dir).rglob("*")):
        if p.is_file() and p.suffix in (".wav", ".txt"):
            h.update(str(p.relative_to(corpus_dir)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def recipe_hash(recipe: Recipe, corpus_dir: Path) -> str:
    """Cache key: recipe, corpus content, and the code of this builder and of the tiny checkpoint builder."""
    from . import qwen_omni

    h = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True, default=str).encode())
    h.update(corpus_digest(corpus_dir).encode())
    for mod in (qwen_omni, inspect.getmodule(recipe_hash)):
        h.update(inspect.getsource(mod).encode())
    import torch
    import transformers

    h.update(f"{torch.__version__}:{transformers.__version__}".encode())
    return h.hexdigest()[:16]


def _instances(corpus_dir: Path, speakers: tuple[str, ...], recipe: Recipe, salt: str) -> list[Any]:
    """SER instances of the corpus' utterances of `speakers` (option order per sample and `salt`)."""
    from ..prompts import option_order, ser_prompt
    from ..types import Instance
    from .corpus import read_transcripts

    out = []
    for spk in speakers:
        for utt, text, emo in read_transcripts(corpus_dir, spk):
            label = emo.lower()
            if label not in recipe.labels:
                continue
            opts = option_order(list(recipe.labels), utt + salt, recipe.option_seed)
            out.append(
                Instance(
                    id=utt, task="ser", wav=str(Path(corpus_dir) / spk / emo / f"{utt}.wav"), speaker=spk,
                    emotion=label, split="ident", prompt=ser_prompt(recipe.prompt, opts), text=text, options=opts,
                )
            )
    return out


class _CachedFeatures:
    """The adapter's WhisperFeatureExtractor with a per-utterance cache of the valid frames.

    Why: with `padding="max_length"` every clip's features are independent of the batch, so computing each
    once (instead of once per epoch) is several times faster. Only the frames inside the attention mask are
    kept (the encoder reads no others), re-padded with zeros: 10x less memory, the same encoder inputs."""

    def __init__(self, fe: Any) -> None:
        self.fe = fe
        self.cache: dict[bytes, tuple[Any, int, int]] = {}

    def __call__(self, waves: list[np.ndarray], **kw: Any) -> dict[str, Any]:
        import torch

        feats, masks = [], []
        for w in waves:
            key = hashlib.sha1(np.ascontiguousarray(w).tobytes()).digest()
            if key not in self.cache:
                r = self.fe([w], **kw)
                n = int(r["attention_mask"].sum())
                self.cache[key] = (r["input_features"][0, :, :n].clone(), n, r["input_features"].shape[-1])
            f, n, total = self.cache[key]
            full = torch.zeros(f.shape[0], total, dtype=f.dtype)
            full[:, :n] = f
            m = torch.zeros(total, dtype=torch.long)
            m[:n] = 1
            feats.append(full)
            masks.append(m)
        return {"input_features": torch.stack(feats), "attention_mask": torch.stack(masks)}


def lr_factor(step: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier before optimiser step `step` (0-based) of `total`: "constant" is 1; "cosine"
    decays from 1 at step 0 to 0 at step `total` (half a cosine period) and stays 0 after it.

    Why: with a constant rate recipe 3 oscillated between emotions from epoch to epoch (docs/miniature.md 6);
    a decaying rate lets the last epochs settle."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        if total <= 0:
            raise ValueError(f"cosine schedule needs a positive number of steps, got {total}")
        return float(0.5 * (1.0 + np.cos(np.pi * min(max(step, 0), total) / total)))
    raise ValueError(f"Recipe.schedule must be 'cosine' or 'constant', got {schedule!r}")


def prosody_targets(wav: np.ndarray, n_frames: int, sr: int = 16000, hop: int = 640) -> np.ndarray:
    """Per 40 ms encoder frame: log energy, voicing and log2 pitch (autocorrelation; 0 where unvoiced).

    Why: the encoder's objective must not be emotion. These are generic acoustic descriptors (what a pitch
    tracker and an energy meter give), computed the same way for every voice and emotion."""
    win = 1024
    x = np.pad(np.asarray(wav, dtype=np.float64), (win // 2, win + n_frames * hop))
    out = np.zeros((n_frames, 3), dtype=np.float32)
    lo, hi = sr // 400, sr // 60
    for t in range(n_frames):
        fr = x[t * hop + hop // 2 : t * hop + hop // 2 + win]
        fr = fr - fr.mean()
        rms = float(np.sqrt((fr**2).mean()))
        out[t, 0] = np.log(rms + 1e-4)
        if rms < 1e-3:
            continue
        spec = np.fft.rfft(fr * np.hanning(win), 2 * win)
        ac = np.fft.irfft(np.abs(spec) ** 2)[: hi + 1]
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.35 * ac[0]:
            out[t, 1] = 1.0
            out[t, 2] = np.log2(sr / lag / 100.0)
    return out


def pretrain_encoder(adapter: Any, instances: list[Any], audios: dict[str, np.ndarray], recipe: Recipe) -> dict[str, Any]:
    """Train the audio encoder (and a throw-away linear head) to regress `prosody_targets`, then freeze it."""
    import torch

    from ..io import load_audio

    thinker = adapter.model.thinker
    inner = thinker.model if hasattr(thinker.model, "get_audio_features") else thinker
    items = []
    for inst in instances:
        if inst.wav not in audios:
            audios[inst.wav] = load_audio(inst.wav, adapter.input_sample_rate)
        feats = adapter.feature_extractor([audios[inst.wav]], sampling_rate=adapter.input_sample_rate,
                                          return_attention_mask=True, padding="max_length", return_tensors="pt")
        n = int(feats["attention_mask"].sum())
        n_out = int(inner.audio_tower._get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))[1])
        items.append((feats["input_features"][0, :, :n].clone(), prosody_targets(audios[inst.wav], n_out)))
    tgt = np.concatenate([t for *_, t in items])
    mu, sd = tgt.mean(0), tgt.std(0) + 1e-6
    head = torch.nn.Linear(recipe.hidden, 3)
    params = [*inner.audio_tower.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=recipe.encoder_lr)
    gen = torch.Generator().manual_seed(10_000 + recipe.seed)
    losses = []
    for _step in range(recipe.encoder_steps):
        idx = torch.randint(0, len(items), (recipe.batch,), generator=gen).tolist()
        width = max(items[i][0].shape[1] for i in idx)
        feats = torch.zeros(len(idx), items[idx[0]][0].shape[0], width)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            feats[row, :, : items[i][0].shape[1]] = items[i][0]
            mask[row, : items[i][0].shape[1]] = 1
        y = torch.from_numpy((np.concatenate([items[i][1] for i in idx]) - mu) / sd)
        h = inner.get_audio_features(feats, mask)
        h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h
        loss = torch.nn.functional.mse_loss(head(h), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in inner.audio_tower.parameters():
        p.requires_grad_(False)
    return {"objective": "frame log-energy, voicing, log2 pitch (MSE, standardised)", "steps": recipe.encoder_steps,
            "loss_first": float(np.mean(losses[:20])), "loss_last": float(np.mean(losses[-20:]))}


def _bucketed(items: list[Any], batch: int, gen: Any, audios: dict[str, np.ndarray]) -> list[Any]:
    """Shuffled items regrouped so a batch holds clips of similar length (less padding), batch order shuffled."""
    import torch

    chunk = 8 * batch
    batches = []
    for c0 in range(0, len(items), chunk):
        part = sorted(items[c0 : c0 + chunk], key=lambda i: (len(audios[i.wav]), i.id))
        batches += [part[b0 : b0 + batch] for b0 in range(0, len(part), batch)]
    return [i for b in (batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()) for i in b]


def _batches(adapter: Any, instances: list[Any], batch: int, audios: dict[str, np.ndarray]) -> Iterator[tuple[Any, Any, Any]]:
    """(inputs, gold word ids, instances) per batch, prepared by the adapter (audio as the pipeline loads it);
    lazily, so only one batch of 30 s feature tensors is in memory."""
    import torch

    from ..io import load_audio

    word_id = {w: adapter.tokenizer.convert_tokens_to_ids(w) for w in LABELS}
    for b0 in range(0, len(instances), batch):
        part = instances[b0 : b0 + batch]
        for i in part:
            if i.wav not in audios:
                audios[i.wav] = load_audio(i.wav, adapter.input_sample_rate)
        prep = adapter.prepare(part, [audios[i.wav] for i in part])
        yield prep.inputs, torch.tensor([word_id[i.emotion] for i in part]), part


def _forward_answer(thinker: Any, inputs: dict[str, Any], gold: Any, im_end: int) -> tuple[Any, Any]:
    """Teacher-forced logits at the two answer positions (emotion word, then <|im_end|>)."""
    import torch

    n = gold.shape[0]
    ids = torch.cat([inputs["input_ids"], gold[:, None], torch.full((n, 1), im_end)], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(n, 2, dtype=inputs["attention_mask"].dtype)], dim=1)
    out = thinker(
        input_ids=ids, attention_mask=mask, input_features=inputs["input_features"],
        feature_attention_mask=inputs["feature_attention_mask"], use_cache=False,
    )
    return out.logits[:, -3], out.logits[:, -2]  # predicts the word; predicts <|im_end|>


class _Encoded:
    """Per-utterance inputs of the training loop once the audio encoder is frozen.

    Why: the encoder (with its projection) is frozen after `pretrain_encoder`, so its output for a clip never
    changes; computing it once per utterance, and the prompt's token ids once per distinct text, leaves the
    language model's forward and backward as the only per-step work. `batch` rebuilds exactly the adapter's
    left-padded `input_ids` / `attention_mask` (`QwenOmniAdapter.prepare`); `forward` splices the cached audio
    embeddings into the token embeddings where `<|AUDIO|>` stands, as the thinker's own forward does, and lets
    the thinker compute its 3D rope positions from the ids and the feature lengths (tests/test_miniature.py
    checks both against the full forward)."""

    def __init__(self, adapter: Any, audios: dict[str, np.ndarray]) -> None:
        self.adapter = adapter
        self.audios = audios
        self.audio: dict[str, tuple[Any, int]] = {}  # wav -> (encoder output (n_tokens, hidden), mel frames)
        self.ids: dict[str, list[int]] = {}  # rendered text -> token ids
        self.word_id = {w: int(adapter.tokenizer.convert_tokens_to_ids(w)) for w in LABELS}
        self.im_end = int(adapter.tokenizer.convert_tokens_to_ids("<|im_end|>"))

    def encode(self, instances: list[Any]) -> None:
        """Run the frozen encoder once on every clip of `instances` not seen yet (valid frames only)."""
        import torch

        from ..io import load_audio

        thinker = self.adapter.model.thinker
        inner = thinker.model if hasattr(thinker.model, "get_audio_features") else thinker
        fe = self.adapter.feature_extractor
        with torch.no_grad():
            for inst in instances:
                if inst.wav in self.audio:
                    continue
                if inst.wav not in self.audios:
                    self.audios[inst.wav] = load_audio(inst.wav, self.adapter.input_sample_rate)
                f = fe([self.audios[inst.wav]], sampling_rate=self.adapter.input_sample_rate,
                       return_attention_mask=True, padding="max_length", return_tensors="pt")
                n = int(f["attention_mask"].sum())
                h = inner.get_audio_features(f["input_features"][:, :, :n], torch.ones(1, n, dtype=torch.long))
                h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h
                self.audio[inst.wav] = (h.detach(), n)

    def batch(self, instances: list[Any]) -> dict[str, Any]:
        """Left-padded ids and mask (as the adapter pads), cached audio embeddings, feature lengths, gold ids."""
        import torch

        from ..models.qwen_omni import num_audio_tokens

        self.encode(instances)
        rows = []
        for inst in instances:
            n = self.audio[inst.wav][1]
            text = self.adapter.render_prompt(inst.prompt, int(num_audio_tokens(torch.tensor(n))))
            if text not in self.ids:
                self.ids[text] = self.adapter.tokenizer(text)["input_ids"]
            rows.append(self.ids[text])
        width = max(len(r) for r in rows)
        pad = self.adapter.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, width - len(r):] = torch.tensor(r)
            mask[k, width - len(r):] = 1
        return {
            "input_ids": ids, "attention_mask": mask,
            "audio": torch.cat([self.audio[i.wav][0] for i in instances]),
            "frames": torch.tensor([self.audio[i.wav][1] for i in instances]),
            "gold": torch.tensor([self.word_id[i.emotion] for i in instances]),
        }

    def forward(self, batch: dict[str, Any], answer: bool) -> Any:
        """Logits of the thinker on `batch` (encoder skipped). With `answer`, the gold word and `<|im_end|>` are
        appended (teacher forcing) and the logits predicting them are returned, shape (2, B, vocab); otherwise
        the logits of the first generated token, shape (B, vocab)."""
        import torch

        thinker = self.adapter.model.thinker
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n = ids.shape[0]
        if answer:
            ids = torch.cat([ids, batch["gold"][:, None], torch.full((n, 1), self.im_end)], dim=1)
            mask = torch.cat([mask, torch.ones(n, 2, dtype=mask.dtype)], dim=1)
        emb = thinker.get_input_embeddings()(ids)
        where = (ids == self.adapter.audio_token_id).unsqueeze(-1).expand_as(emb)
        emb = emb.masked_scatter(where, batch["audio"].to(emb.dtype))
        frames = batch["frames"]
        fmask = (torch.arange(int(frames.max()))[None, :] < frames[:, None]).long()
        hidden = thinker.model(input_ids=ids, inputs_embeds=emb, attention_mask=mask, feature_attention_mask=fmask,
                               use_cache=False).last_hidden_state
        if answer:
            return thinker.lm_head(hidden[:, -3:-1]).transpose(0, 1)  # predicts the word; predicts <|im_end|>
        return thinker.lm_head(hidden[:, -1])


    def answers(self, instances: list[Any], batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Greedy first generated token vs the gold word id per instance (what the parser then reads), in
        batches of similar length; in the order of `instances`."""
        import torch

        self.encode(instances)
        order = sorted(range(len(instances)), key=lambda k: (self.audio[instances[k].wav][1], k))
        pred = np.zeros(len(instances), dtype=np.int64)
        gold = np.zeros(len(instances), dtype=np.int64)
        with torch.no_grad():
            for b0 in range(0, len(order), batch):
                idx = order[b0 : b0 + batch]
                b = self.batch([instances[k] for k in idx])
                pred[idx] = self.forward(b, answer=False).argmax(-1).numpy()
                gold[idx] = b["gold"].numpy()
        return pred, gold

def first_step_answers(thinker: Any, batches: Iterable[tuple[Any, Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Greedy first generated token vs the gold word id, per instance (what the parser then reads)."""
    import torch

    preds, golds = [], []
    with torch.no_grad():
        for inputs, gold, _ in batches:
            out = thinker(**{k: v for k, v in inputs.items()}, use_cache=False)
            preds.append(out.logits[:, -1].argmax(-1))
            golds.append(gold)
    return torch.cat(preds).numpy(), torch.cat(golds).numpy()


def uar(pred: np.ndarray, gold: np.ndarray) -> float:
    """Unweighted average recall over the gold classes present."""
    return float(np.mean([np.mean(pred[gold == g] == g) for g in np.unique(gold)]))


def train(out_dir: Path, corpus_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """Build the tiny checkpoint with `recipe`'s sizes, train its thinker (audio encoder frozen), save it."""
    import torch

    from ..models.qwen_omni import QwenOmniAdapter
    from . import qwen_omni

    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        qwen_omni.build(out_dir, seed=1234 + recipe.seed, **recipe.sizes())
        adapter = QwenOmniAdapter()
        adapter.load(str(out_dir), device="cpu", dtype="float32")
        adapter.feature_extractor = _CachedFeatures(adapter.feature_extractor)
        audios: dict[str, np.ndarray] = {}
        model = adapter.model
        thinker = model.thinker
        torch.manual_seed(recipe.seed)
        from ..io import load_audio

        train_items = _instances(corpus_dir, recipe.train_speakers, recipe, "")
        for i in train_items:
            audios[i.wav] = load_audio(i.wav, adapter.input_sample_rate)
        t0 = time.perf_counter()
        encoder = pretrain_encoder(adapter, train_items, audios, recipe)
        encoder["seconds"] = round(time.perf_counter() - t0, 1)
        log.info("miniature seed %d: encoder pretrained (%s), loss %.3f -> %.3f", recipe.seed, encoder["objective"],
                 encoder["loss_first"], encoder["loss_last"])
        enc = _Encoded(adapter, audios)
        enc.encode(train_items)
        params = [p for n, p in thinker.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        steps = recipe.max_epochs * -(-len(train_items) // recipe.batch)
        lr_factor(0, steps, recipe.schedule)  # an unknown schedule fails here, before any training
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, steps, recipe.schedule))
        im_end = int(adapter.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        word_ids = np.array([adapter.tokenizer.convert_tokens_to_ids(w) for w in LABELS])
        # the stop rule reads the identification voices with the option order stage 1 uses (salt "")
        gen = torch.Generator().manual_seed(recipe.seed)
        history = []
        stopped = None
        for epoch in range(recipe.max_epochs):
            # a fresh option order per epoch, so the answer cannot be read from the option positions
            items = _instances(corpus_dir, recipe.train_speakers, recipe, f":train{epoch}")
            items = _bucketed([items[i] for i in torch.randperm(len(items), generator=gen).tolist()], recipe.batch,
                              gen, audios)
            thinker.train()
            losses = []
            for b0 in range(0, len(items), recipe.batch):
                b = enc.batch(items[b0 : b0 + recipe.batch])
                gold = b["gold"]
                word_logits, end_logits = enc.forward(b, answer=True)
                loss = torch.nn.functional.cross_entropy(word_logits, gold) + torch.nn.functional.cross_entropy(
                    end_logits, torch.full_like(gold, im_end)
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
            thinker.eval()
            tp, tg = enc.answers(train_items)
            recall = {w: float(np.mean(tp[tg == i] == i)) for w, i in zip(LABELS, word_ids, strict=True)}
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "train_recall": recall,
                            "seconds": round(time.perf_counter() - t0, 1)})
            log.info("miniature seed %d epoch %d: loss %.3f, train recall %s (%.0f s)", recipe.seed, epoch,
                     history[-1]["loss"], {k: round(v, 2) for k, v in recall.items()}, history[-1]["seconds"])
            if min(recall.values()) >= recipe.stop_recall:
                stopped = epoch
                break
        train_s = time.perf_counter() - t0
        hp, hg = enc.answers(_instances(corpus_dir, recipe.held_out_speakers, recipe, ""))
        model.save_pretrained(out_dir)
    finally:
        torch.set_num_threads(threads)
    info = {
        "what": "miniature Qwen2.5-Omni: thinker trained for SER (emotion-word answers), audio encoder trained on "
        "frame pitch/voicing/energy only then frozen, talker and token2wav untrained",
        "encoder": encoder,
        "stopped_at_epoch": stopped,
        "train_per_emotion": history[-1]["train_recall"],
        "recipe": asdict(recipe),
        "train_uar": uar(tp, tg),
        "held_out_uar": uar(hp, hg),
        "held_out_per_emotion": {
            w: float(np.mean(hp[hg == adapter.tokenizer.convert_tokens_to_ids(w)] == adapter.tokenizer.convert_tokens_to_ids(w)))
            for w in LABELS
        },
        "chance": 1.0 / len(LABELS),
        "train_seconds": round(train_s, 1),
        "threads": 1,
        "history": history,
        "n_neurons": recipe.layers * recipe.intermediate,
    }
    return info


def is_cached(out_dir: Path, corpus_dir: Path, recipe: Recipe) -> bool:
    """Whether `out_dir` already holds a miniature of this recipe (so `build` would not train)."""
    info_path = Path(out_dir) / "miniature.json"
    return info_path.is_file() and json.loads(info_path.read_text()).get("recipe_hash") == recipe_hash(recipe, corpus_dir)


def build(out_dir: Path, corpus_dir: Path, recipe: Recipe, force: bool = False) -> dict[str, Any]:
    """Train into `out_dir` unless it already holds a miniature of the same recipe hash (then keep it)."""
    out_dir = Path(out_dir)
    key = recipe_hash(recipe, corpus_dir)
    info_path = out_dir / "miniature.json"
    if not force and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("recipe_hash") == key:
            log.info("%s: miniature of recipe %s cached (held-out UAR %.3f)", out_dir, key, info["held_out_uar"])
            return info
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    info = train(tmp, corpus_dir, recipe)
    info["recipe_hash"] = key
    (tmp / "miniature.json").write_text(json.dumps(info, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    print(
        f"miniature {out_dir}: held-out UAR {info['held_out_uar']:.3f} (train {info['train_uar']:.3f}, chance "
        f"{info['chance']:.2f}), trained in {info['train_seconds']:.0f} s",
        flush=True,
    )
    return info


def build_seed(out_dir: Path, corpus_dir: Path, seed: int, force: bool = False) -> dict[str, Any]:
    """`build` of the default recipe for one training seed; the target of the build's worker processes (spawned:
    a fresh interpreter, so no RNG or thread state is inherited)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return build(out_dir, corpus_dir, Recipe(seed=seed), force=force)
