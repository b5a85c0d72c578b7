"""Qwen2.5-Omni speech is seeded per instance (METHOD.md reproducibility, issue 7 defect 8).

Why: upstream samples the talker for all rows from one global RNG and draws token2wav's noise row after
row, so an instance's speech depended on which instances shared its batch and on its position in it. Here
the same instance must give the same codes and waveform alone, first or last in a batch.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from emotion_neurons.models import get_adapter  # noqa: E402
from emotion_neurons.models.qwen_omni import RowSampler, instance_seed  # noqa: E402
from emotion_neurons.tiny.qwen_omni import build  # noqa: E402
from emotion_neurons.types import GenerationSettings, Instance  # noqa: E402

SR = 16000
PROMPT = "Repeat the audio word-for-word exactly. Speak with {} emotion. Do not add or remove any words."


def _audio(seconds: float, freq: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = get_adapter("qwen2_5_omni")
    a.load(str(build(tmp_path_factory.mktemp("qwen_tiny"))), device="cpu")
    yield a
    torch.set_num_threads(threads)


def _inst(i: int, target: str) -> Instance:
    return Instance(id=f"u{i}->{target}", task="evc", wav="", speaker="0011", emotion="neutral", split="ident",
                    prompt=PROMPT.format(target), target=target)


def test_speech_of_an_instance_does_not_depend_on_its_batch(adapter):
    insts = [_inst(0, "angry"), _inst(1, "happy"), _inst(2, "sad")]
    audios = [_audio(1.0, 220.0, 0), _audio(0.7, 330.0, 1), _audio(0.8, 180.0, 2)]
    settings = GenerationSettings(max_new_tokens=6, want_audio=True, seed=7)

    def gen(idx):
        return adapter.generate(adapter.prepare([insts[i] for i in idx], [audios[i] for i in idx]), settings)

    alone = gen([1])[0]
    first, last = gen([1, 0, 2])[0], gen([0, 2, 1])[2]
    for other in (first, last):
        assert other.text == alone.text
        np.testing.assert_array_equal(other.wav, alone.wav)
    # the seed still matters: another config seed gives other speech for the same instance
    moved = adapter.generate(adapter.prepare([insts[1]], [audios[1]]),
                             GenerationSettings(max_new_tokens=6, want_audio=True, seed=8))[0]
    assert moved.wav.shape != alone.wav.shape or not np.array_equal(moved.wav, alone.wav)


def test_row_sampler_draws_each_row_from_its_own_seed():
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    seeds = [instance_seed(0, f"u{i}") for i in range(3)]
    ids = torch.zeros(3, 1, dtype=torch.long)
    batched = RowSampler(seeds, 0.9, 40, 0.8)
    steps = [batched(ids, scores).argmax(-1) for _ in range(20)]
    single = RowSampler(seeds[2:], 0.9, 40, 0.8)
    alone = [single(ids[2:], scores[2:]).argmax(-1) for _ in range(20)]
    assert [int(s[2]) for s in steps] == [int(a[0]) for a in alone]
    out = RowSampler(seeds, 0.9, 40, 0.8)(ids, scores)
    assert (torch.isfinite(out).sum(-1) == 1).all()  # one token left per row: greedy decoding keeps it
    # top-k: never a token outside the 40 best
    top = scores.topk(40, dim=-1).indices
    assert all(int(s[b]) in top[b].tolist() for s in steps for b in range(3))
    # the draws follow the softmax of the warped scores (many rows, one step each)
    n = 4000
    flat = torch.tensor([[0.0, 1.0, 2.0, -1e9]]).expand(n, 4).clone()
    draws = RowSampler([instance_seed(1, str(i)) for i in range(n)])(torch.zeros(n, 1, dtype=torch.long), flat)
    freq = np.bincount(draws.argmax(-1).numpy(), minlength=4) / n
    np.testing.assert_allclose(freq, torch.softmax(flat[0], -1).numpy(), atol=0.03)
