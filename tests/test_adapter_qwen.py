"""QwenOmniAdapter on a tiny random instance of the real Qwen2.5-Omni class (thinker + talker + token2wav).

Why: the adapter must reproduce Qwen2_5OmniProcessor's inputs without it, keep batched and one-by-one greedy
text identical, expose hook sites for both transformers layouts, and feed the span tracker the `input_ids` it
expects. Everything runs offline on CPU in seconds.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from emotion_neurons.models import get_adapter  # noqa: E402
from emotion_neurons.models.qwen_omni import QwenOmniAdapter, num_audio_tokens  # noqa: E402
from emotion_neurons.tiny.qwen_omni import SINGLE_TOKEN_WORDS, build  # noqa: E402
from emotion_neurons.types import GenerationSettings, Instance  # noqa: E402

SR = 16000
PROMPTS = (
    "Repeat the audio word-for-word exactly. Speak with angry emotion. Do not add or remove any words.",
    "What is the emotion of the speaker? 1. sad 2. happy 3. neutral",
)


def _audio(seconds: float, freq: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


def _instance(i: int, prompt: str) -> Instance:
    return Instance(
        id=f"u{i}", task="evc", wav="", speaker="0011", emotion="neutral", split="ident", prompt=prompt
    )


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("qwen_omni_tiny"))


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    # one intra-op thread: on a shared 2-core machine OpenMP spin-waiting makes 2 threads up to 20x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = get_adapter("qwen2_5_omni")
    a.load(str(tiny_dir), device="cpu")
    yield a
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch():
    insts = [_instance(0, PROMPTS[0]), _instance(1, PROMPTS[1])]
    audios = [_audio(1.3, 220.0, 0), _audio(0.6, 330.0, 1)]
    return insts, audios


def test_tiny_checkpoint_files(tiny_dir):
    files = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "spk_dict.pt",
    } <= files
    assert sum(p.stat().st_size for p in tiny_dir.iterdir()) < 20 * 2**20
    spk = torch.load(tiny_dir / "spk_dict.pt", weights_only=True)
    assert list(spk) == ["Chelsie", "Ethan"]
    for value in spk.values():
        assert set(value) == {"cond", "ref_mel", "bos_token"}
        assert value["cond"].ndim == 2 and value["ref_mel"].ndim == 3 and isinstance(value["bos_token"], int)


def test_tokenizer_single_tokens(adapter):
    tok = adapter.tokenizer
    for word in SINGLE_TOKEN_WORDS:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for d in "0123456789":
        assert len(tok(d, add_special_tokens=False)["input_ids"]) == 1
    text = "Speak with sad emotion. 1. neutral"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_resolve_sites(adapter):
    n_thinker = adapter.model.config.thinker_config.text_config.num_hidden_layers
    n_talker = adapter.model.config.talker_config.num_hidden_layers
    for site, sub in (("gate", "act_fn"), ("pre_act", "gate_proj"), ("gated_product", "down_proj")):
        sites = adapter.resolve_sites("thinker", site)
        assert [s.layer for s in sites] == list(range(n_thinker))
        # transformers 5.23 nests the LM under `language_model`; 5.17 (GPU machines) does not
        for i, s in enumerate(sites):
            assert re.fullmatch(rf"thinker\.model\.(?:language_model\.)?layers\.{i}\.mlp\.{sub}", s.name), (
                s.name
            )
        talker = adapter.resolve_sites("talker", site)
        assert [s.name for s in talker] == [f"talker.model.layers.{i}.mlp.{sub}" for i in range(n_talker)]
    assert adapter.n_neurons("thinker") == adapter.model.config.thinker_config.text_config.intermediate_size
    thinker_re = re.compile(QwenOmniAdapter.components["thinker"])
    assert thinker_re.match("thinker.model.layers.7.mlp").group(1) == "7"  # transformers 4.x layout
    assert thinker_re.match("thinker.model.language_model.layers.12.mlp").group(1) == "12"
    assert not thinker_re.match("thinker.model.visual.blocks.0.mlp")
    assert not thinker_re.match("thinker.model.audio_tower.layers.0.mlp")


def test_prepare_span_codes(adapter, batch):
    insts, audios = batch
    prep = adapter.prepare(insts, audios)
    ids, mask, codes = prep.inputs["input_ids"], prep.inputs["attention_mask"], prep.span_codes
    assert codes.shape == ids.shape
    # processor arithmetic: 10 ms mel frames, then conv stride 2 and 2x pooling
    frames = torch.tensor([int(np.ceil(len(a) / 160)) for a in audios])
    assert torch.equal(prep.inputs["feature_attention_mask"].sum(-1), frames)
    expected = num_audio_tokens(frames)
    assert torch.equal((codes == 0).sum(-1), expected)
    assert torch.equal((ids == adapter.audio_token_id).sum(-1), expected)
    assert torch.equal(codes == -1, mask == 0)
    n_pad = (mask == 0).sum(-1)
    assert n_pad.min() == 0 and n_pad.max() > 0
    for row, n in zip(codes, n_pad.tolist(), strict=True):  # padding is on the left only
        assert (row[:n] == -1).all() and (row[n:] >= 0).all()
    # positions before the first audio token (system prompt, chat template) are the `prefix` span, identical
    # in every row; everything after the audio is `text`
    from emotion_neurons import SPANS

    prefixes = []
    for row, row_ids, row_mask in zip(codes, ids, mask, strict=True):
        first_audio = int(torch.nonzero(row_ids == adapter.audio_token_id)[0])
        pos = torch.arange(len(row))
        assert (row[(pos < first_audio) & row_mask.bool()] == SPANS.index("prefix")).all()
        assert not (row[pos > first_audio] == SPANS.index("prefix")).any()
        assert (row[(pos > first_audio) & (row_ids != adapter.audio_token_id)] == SPANS.index("text")).all()
        prefixes.append(adapter.tokenizer.decode(row_ids[(pos < first_audio) & row_mask.bool()]))
    assert len(set(prefixes)) == 1 and prefixes[0].endswith("<|im_start|>user\n<|audio_bos|>")
    text = adapter.tokenizer.decode(ids[1][mask[1].bool()])
    assert text.startswith("<|im_start|>system\nYou are Qwen, a virtual human developed by the Qwen Team")
    assert "<|im_start|>user\n<|audio_bos|><|AUDIO|>" in text
    assert text.endswith(f"<|audio_eos|>{PROMPTS[1]}<|im_end|>\n<|im_start|>assistant\n")


def test_generate_text_and_audio(adapter, batch):
    insts, audios = batch
    prep = adapter.prepare(insts[:1], audios[:1])
    text_only = adapter.generate(prep, GenerationSettings(max_new_tokens=6))
    assert len(text_only) == 1 and isinstance(text_only[0].text, str) and text_only[0].wav is None
    assert 0 < text_only[0].n_generated <= 6
    settings = GenerationSettings(max_new_tokens=6, want_audio=True, seed=3)
    out = adapter.generate(prep, settings)[0]
    assert out.text == text_only[0].text and out.n_generated == text_only[0].n_generated
    assert out.sample_rate == 24000 and out.wav.dtype == np.float32 and out.wav.ndim == 1
    assert out.wav.size > 0 and out.wav.size % 240 == 0 and np.isfinite(out.wav).all()
    again = adapter.generate(prep, settings)[0]
    np.testing.assert_array_equal(again.wav, out.wav)  # talker sampling and DiT noise follow the seed


def test_batched_equals_one_by_one(adapter, batch):
    insts, audios = batch
    settings = GenerationSettings(max_new_tokens=8, want_audio=True, seed=0)
    batched = adapter.generate(adapter.prepare(insts, audios), settings)
    single = [
        adapter.generate(adapter.prepare([i], [a]), settings)[0] for i, a in zip(insts, audios, strict=True)
    ]
    assert [b.text for b in batched] == [s.text for s in single]
    assert [b.n_generated for b in batched] == [s.n_generated for s in single]
    assert all(b.wav is not None and np.isfinite(b.wav).all() for b in batched)


def test_decoder_root_receives_input_ids(adapter, batch):
    insts, audios = batch
    prep = adapter.prepare(insts, audios)
    B, T = prep.inputs["input_ids"].shape
    calls: dict[str, list] = {"thinker": [], "talker": []}

    def recorder(component):
        def hook(module, args, kwargs):
            ids, emb = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
            calls[component].append(
                (None if ids is None else tuple(ids.shape), None if emb is None else emb.shape[:2])
            )

        return hook

    handles = [
        adapter.decoder_root(c).register_forward_pre_hook(recorder(c), with_kwargs=True) for c in calls
    ]
    try:
        for want_audio in (False, True):
            for c in calls:
                calls[c].clear()
            adapter.generate(prep, GenerationSettings(max_new_tokens=5, want_audio=want_audio, seed=0))
            assert calls["thinker"][0][0] == (B, T)
            assert calls["thinker"][1:] == [((B, 1), None)] * 4  # prefill + one call per further token
            if want_audio:  # talker prefill: embeddings only, prompt + 2 positions; then codec ids
                assert calls["talker"][0] == (None, (B, T + 2))
                assert calls["talker"][0][1] == adapter.prefill_span_codes("talker", prep).shape
                assert all(c == ((B, 1), None) for c in calls["talker"][1:])
            else:
                assert calls["talker"] == []
    finally:
        for h in handles:
            h.remove()


def test_stop_ids_and_trimming(adapter, batch, monkeypatch):
    tok = adapter.tokenizer
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert adapter.stop_token_ids == [im_end, eot] and adapter.pad_token_id == eot
    talker = adapter.model.talker
    assert adapter.component_stop_token_ids("talker") == [talker.codec_pad_token, talker.codec_eos_token]
    insts, audios = batch
    prep = adapter.prepare(insts, audios)
    words = [tok.convert_tokens_to_ids(w) for w in ("sad", "\u0120happy")]
    new = torch.tensor([[words[0], words[1], im_end, eot], [words[1], words[0], words[0], words[1]]])
    fake = torch.cat([prep.inputs["input_ids"], new], dim=1)
    monkeypatch.setattr(adapter.model, "generate", lambda **kw: fake)
    out = adapter.generate(prep, GenerationSettings(max_new_tokens=4))
    assert [o.n_generated for o in out] == [2, 4]
    assert [o.text for o in out] == ["sad happy", " happysadsad happy"]


def test_bad_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        QwenOmniAdapter().load(str(missing), device="cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        QwenOmniAdapter().load(str(tmp_path), device="cpu")


def test_checkpoint_without_speakers_is_text_only(adapter, tiny_dir, tmp_path, batch):
    shutil.copytree(tiny_dir, tmp_path / "ckpt", ignore=shutil.ignore_patterns("spk_dict.pt"))
    a = QwenOmniAdapter()
    with pytest.warns(UserWarning, match="no spk_dict.pt"):
        a.load(str(tmp_path / "ckpt"), device="cpu")
    insts, audios = batch
    prep = a.prepare(insts[:1], audios[:1])
    settings = GenerationSettings(max_new_tokens=4)
    assert (
        a.generate(prep, settings)[0].text
        == adapter.generate(adapter.prepare(insts[:1], audios[:1]), settings)[0].text
    )
    with pytest.raises(RuntimeError, match="cannot generate speech"):
        a.generate(prep, GenerationSettings(max_new_tokens=4, want_audio=True))


def test_ser_option_probabilities_from_the_first_step(adapter, batch):
    """SER outputs carry each option's first-step probability (number and word tokens), renormalised over the
    options; checked against a hand computation on the thinker's own prefill logits."""
    _, audios = batch
    opts = ["sad", "happy", "neutral"]
    inst = Instance(id="s0", task="ser", wav="", speaker="0011", emotion="sad", split="eval",
                    prompt="Which emotion? 1. sad 2. happy 3. neutral", options=opts)
    prep = adapter.prepare([inst], audios[:1])
    (out,) = adapter.generate(prep, GenerationSettings(max_new_tokens=2))
    assert set(out.option_probs) == set(opts)
    assert abs(sum(out.option_probs.values()) - 1.0) < 1e-5
    with torch.no_grad():
        logits = adapter.model.thinker(**prep.inputs, use_cache=False).logits[0, -1]
    p = torch.softmax(logits, -1)
    tok = adapter.tokenizer
    first = lambda s: tok.encode(s, add_special_tokens=False)[0]  # noqa: E731
    ids = {
        "sad": {first(f) for f in ("1", " 1", "one", " one", "sad", " sad", "sadness", " sadness")},
        "happy": {first(f) for f in ("2", " 2", "two", " two", "happy", " happy", "happiness", " happiness",
                                     "joy", " joy")},
        "neutral": {first(f) for f in ("3", " 3", "three", " three", "neutral", " neutral")},
    }
    ids["happy"] -= ids["sad"]
    ids["neutral"] -= ids["sad"] | ids["happy"]
    mass = {o: float(p[sorted(v)].sum()) for o, v in ids.items()}
    for o in opts:
        assert out.option_probs[o] == pytest.approx(mass[o] / sum(mass.values()), rel=1e-4)
    # EVC (speech) outputs do not carry them
    (evc,) = adapter.generate(adapter.prepare(batch[0][:1], audios[:1]), GenerationSettings(max_new_tokens=2))
    assert evc.option_probs is None
