"""Adapter for Kimi-Audio-7B-Instruct (`moonshotai/Kimi-Audio-7B-Instruct`) through `kimia_infer`.

Sources read (public code; nothing copied). MoonshotAI/Kimi-Audio at commit 2607d51 unless another is named:

- `kimia_infer/api/kimia.py`
  - `KimiAudio(model_path, load_detokenizer=True)`: `self.alm = AutoModelForCausalLM.from_pretrained(...,
    torch_dtype=torch.bfloat16, trust_remote_code=True).to(torch.cuda.current_device())`, a
    `KimiAPromptManager`, the detokenizer, `eod_ids = [msg_end, media_end]`, 6 audio delay tokens.
  - `generate(chats, output_type="text"|"both", audio_temperature, audio_top_k, text_temperature,
    text_top_k, audio_repetition_penalty, audio_repetition_window_size, text_repetition_penalty,
    text_repetition_window_size, max_new_tokens=-1) -> (wav | None, text)`: builds the prompt with
    `prompt_manager.get_prompt`, decodes with `_generate_loop`; "both" ignores `max_new_tokens` and allows
    `int(12.5 * 120) - prompt_len` steps.
  - `_generate_loop` calls `self.alm.forward(input_ids=<audio stream>, text_input_ids=<text stream>,
    whisper_input_feature=..., is_continuous_mask=..., position_ids=..., past_key_values=...,
    return_dict=False)` and unpacks `(audio_logits, text_logits, past_key_values)`: prefill with the whole
    prompt, then one (audio, text) token pair per call; a text EOS ("text") or an audio `eod_ids` token
    ("both") ends the loop before that token is fed. Because `alm.forward` is called directly, hooks on
    `alm` itself never fire; hooks on its submodules do.
- `kimia_infer/api/prompt_manager.py` (`get_prompt`, `tokenize_message`) and `kimia_infer/utils/data.py`
  (`KimiAContent.to_tensor() -> (audio_ids, text_ids, is_continuous_mask)`): two parallel token streams;
  user audio is `media_begin`, the GLM-4-voice tokens (`is_continuous=True`, Whisper features added),
  `media_end`, then a ct token; audio messages name a file (`content` is a path, read at 16 kHz).
- `kimia_infer/utils/special_tokens.py`: token names of `ExtraTokens`.
- `README.md` / `infer.py`: usage (`messages` with `role`, `message_type`, `content`; instruction text then
  audio for ASR), the sampling parameters used here (`audio_temperature=0.8, audio_top_k=10,
  text_temperature=0.0, text_top_k=5`, repetition penalties 1.0, windows 64/16), 24 kHz output.
- Hub remote code `modeling_moonshot_kimia.py` (read from a public copy, SolutionArichtect/
  Kimi-Audio-7B-Instruct-Ascend at commit e62a324, an NPU port of the hub file):
  `MoonshotKimiaForCausalLM.forward` calls `self.model(input_ids=..., text_input_ids=..., ...)`;
  `MoonshotKimiaModel` has `embed_tokens`, `layers` (28 `MoonshotDecoderLayer`, `mlp = Qwen2MLP`),
  `mimo_layers` (6 layers branching off after layer `kimia_mimo_transformer_from_layer_index`, the audio
  output branch), `vq_adaptor`; flash-attn is required at import.

Runtime module paths (relative to `alm`): `model.layers.{i}.mlp.{gate_proj,up_proj,down_proj,act_fn}` and
`model.mimo_layers.{i}.mlp...`.

Span tracking: `decoder_root` is `alm.model` (`MoonshotKimiaModel`), whose forward receives the audio
stream as `input_ids`: [1, T_prompt] at the prefill, [1, 1] per decode step, so the generic `SpanTracker`
works unchanged for both components (the MIMO layers run inside the same call). Span codes come from the
prompt's `is_continuous_mask`: positions holding the user's speech tokens are audio, every other prompt
position (role, instruction, media markers, ct, message end, assistant start) is text.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..types import GenerationOutput, GenerationSettings, Instance
from .base import ModelAdapter, Prepared

ENV_FILE = "envs/models-kimi.yaml"
OUTPUT_SAMPLE_RATE = 24000
#: README / infer.py sampling parameters
README_SAMPLING: dict[str, float | int] = {
    "audio_temperature": 0.8,
    "audio_top_k": 10,
    "text_temperature": 0.0,
    "text_top_k": 5,
    "audio_repetition_penalty": 1.0,
    "audio_repetition_window_size": 64,
    "text_repetition_penalty": 1.0,
    "text_repetition_window_size": 16,
}


class KimiAudioAdapter(ModelAdapter):
    """Kimi-Audio-7B-Instruct through `kimia_infer.api.kimia.KimiAudio` (module docstring lists the sources).

    - SER: `output_type="text"`, greedy text stream, `max_new_tokens` from the settings.
    - EVC: `output_type="both"`: text and 24 kHz speech; the audio stream is sampled with the README's
      parameters (seeded by `settings.seed`). Keys of `README_SAMPLING` in `settings.extra` override them.
    - Batch size 1 (the loop and the sampler assume one row).
    """

    name = "kimi_audio"
    tasks = ("evc", "ser")
    env = "models-kimi"
    input_sample_rate = 16000
    output_sample_rate = OUTPUT_SAMPLE_RATE
    components = {
        "thinker": r"^model\.layers\.(\d+)\.mlp$",
        "mimo": r"^model\.mimo_layers\.(\d+)\.mlp$",
    }
    supports_batching = False
    #: message order: instruction text, then the audio (README / infer.py ASR example)
    audio_first = False

    def __init__(self) -> None:
        super().__init__()
        self.kimia: Any = None
        self.model_id = ""
        self._stop_ids: list[int] = []
        self._tmpdir: str | None = None

    # -- loading -------------------------------------------------------------------------------------------
    def load(
        self, model_id: str, revision: str | None = None, device: str = "auto", dtype: str = "auto"
    ) -> None:
        """`KimiAudio(model_path=...)` on the current CUDA device (the library hard-codes CUDA and bf16)."""
        try:
            from kimia_infer.api.kimia import KimiAudio
        except ImportError as e:
            raise ImportError(
                f"Kimi-Audio needs the environment of {ENV_FILE} (CUDA torch, flash-attn, kimia_infer installed "
                f"from its GitHub repository): {e}"
            ) from e
        if not torch.cuda.is_available():
            raise RuntimeError("Kimi-Audio (kimia_infer) runs on torch.cuda.current_device(): no CUDA device")
        if device not in ("auto", "cuda") and not str(device).startswith("cuda"):
            raise ValueError(f"Kimi-Audio needs a CUDA device, got device={device!r}")
        if str(device).startswith("cuda:"):
            torch.cuda.set_device(torch.device(device))
        if dtype not in ("auto", "bfloat16"):
            warnings.warn(f"kimia_infer loads Kimi-Audio in bfloat16; dtype={dtype!r} ignored", stacklevel=2)
        path = str(model_id)
        if revision and not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=revision)
        kimia = KimiAudio(model_path=path, load_detokenizer=True)
        self._attach(kimia, str(model_id))

    @classmethod
    def from_model(cls, kimia: Any, model_id: str = "") -> KimiAudioAdapter:
        """Wrap an already built `KimiAudio`-like object (e.g. a test stand-in)."""
        adapter = cls()
        adapter._attach(kimia, model_id)
        return adapter

    def _attach(self, kimia: Any, model_id: str) -> None:
        self.kimia = kimia
        self.model = kimia.alm
        self.model_id = model_id
        self.device = next(kimia.alm.parameters()).device
        self._stop_ids = [int(t) for t in kimia.eod_ids]

    def _require(self) -> Any:
        if self.kimia is None:
            raise RuntimeError("KimiAudioAdapter: call load() or from_model() first")
        return self.kimia

    def _write_wav(self, audio: np.ndarray) -> str:
        """The prompt manager reads audio messages from files: write the 16 kHz clip losslessly."""
        import soundfile as sf

        if self._tmpdir is None or not os.path.isdir(self._tmpdir):
            self._tmpdir = tempfile.mkdtemp(prefix="kimi_audio_")
        fd, path = tempfile.mkstemp(suffix=".wav", dir=self._tmpdir)
        os.close(fd)
        sf.write(
            path, np.asarray(audio, dtype=np.float32).reshape(-1), self.input_sample_rate, subtype="FLOAT"
        )
        return path

    def close(self) -> None:
        """Remove the temporary audio files."""
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- inputs --------------------------------------------------------------------------------------------
    def messages(self, prompt: str, wav_path: str) -> list[dict[str, str]]:
        """README message format for one user turn: instruction text and the audio file."""
        text = {"role": "user", "message_type": "text", "content": prompt}
        audio = {"role": "user", "message_type": "audio", "content": wav_path}
        return [audio, text] if self.audio_first else [text, audio]

    def prepare(self, instances: list[Instance], audios: list[np.ndarray]) -> Prepared:
        """Messages and the prompt's span codes (from `get_prompt`, as `KimiAudio.generate` builds it)."""
        kimia = self._require()
        if len(instances) != 1 or len(audios) != 1:
            raise ValueError(f"Kimi-Audio generates one instance at a time, got {len(instances)}")
        inst = instances[0]
        output_type = "both" if inst.task == "evc" else "text"
        path = self._write_wav(audios[0])
        msgs = self.messages(inst.prompt, path)
        history = kimia.prompt_manager.get_prompt(msgs, output_type=output_type)
        audio_ids, text_ids, is_continuous = history.to_tensor()
        if not audio_ids.shape == text_ids.shape == is_continuous.shape:
            raise RuntimeError("Kimi-Audio prompt streams differ in length")
        codes = torch.where(is_continuous.bool(), 0, 1).long().to(self.device)
        inputs = {
            "messages": msgs,
            "output_type": output_type,
            "files": [path],
            "prompt_len": int(audio_ids.shape[1]),
        }
        return Prepared(inputs=inputs, span_codes=codes, instances=list(instances))

    # -- generation ----------------------------------------------------------------------------------------
    def sampling(self, settings: GenerationSettings, output_type: str) -> dict[str, Any]:
        """`KimiAudio.generate` keyword arguments: README sampling, greedy text unless settings sample."""
        params: dict[str, Any] = dict(README_SAMPLING)
        if settings.do_sample and settings.temperature > 0:
            params["text_temperature"] = float(settings.temperature)
        params.update({k: v for k, v in settings.extra.items() if k in README_SAMPLING})
        if output_type == "text":
            params["max_new_tokens"] = int(settings.max_new_tokens)
        return params

    @contextlib.contextmanager
    def _count_calls(self) -> Iterator[list[int]]:
        counter = [0]
        root = self.decoder_root("thinker")
        handle = root.register_forward_pre_hook(lambda module, args: counter.__setitem__(0, counter[0] + 1))
        try:
            yield counter
        finally:
            handle.remove()

    def generate(self, prepared: Prepared, settings: GenerationSettings) -> list[GenerationOutput]:
        """`KimiAudio.generate`; `n_generated` = decode steps fed back to the LLM after the prefill."""
        kimia = self._require()
        output_type = prepared.inputs["output_type"]
        if settings.want_audio and output_type != "both":
            raise ValueError("speech output needs EVC instances (output_type='both')")
        if output_type == "both" and getattr(kimia, "detokenizer", None) is None:
            raise RuntimeError(f"{self.model_id}: loaded without detokenizer, cannot generate speech")
        torch.manual_seed(int(settings.seed))
        try:
            with self._count_calls() as calls:
                wav, text = kimia.generate(
                    prepared.inputs["messages"],
                    output_type=output_type,
                    **self.sampling(settings, output_type),
                )
        finally:
            for f in prepared.inputs.get("files", []):
                with contextlib.suppress(OSError):
                    os.remove(f)
        n = max(0, calls[0] - 1)
        if output_type == "both" and wav is not None:
            arr = torch.as_tensor(wav).detach().float().reshape(-1).cpu().numpy().astype(np.float32)
            return [
                GenerationOutput(
                    text=str(text).strip(), wav=arr, sample_rate=OUTPUT_SAMPLE_RATE, n_generated=n
                )
            ]
        return [GenerationOutput(text=str(text).strip(), n_generated=n)]

    # -- hooks ---------------------------------------------------------------------------------------------
    def decoder_root(self, component: str) -> torch.nn.Module:
        """`alm.model`: its forward gets the audio-stream `input_ids` ([1, T] prefill, then [1, 1])."""
        self._require()
        if component not in self.components:
            raise KeyError(
                f"component {component!r} not available for {self.name}; have {sorted(self.components)}"
            )
        return self.model.model

    @property
    def stop_token_ids(self) -> list[int]:
        """Audio-stream end ids (`eod_ids`: msg_end, media_end); the loop stops before feeding them."""
        return list(self._stop_ids)
