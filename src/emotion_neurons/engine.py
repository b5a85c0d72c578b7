"""The generation engine: batches in, outputs and statistics out, hooks attached for the run and always removed.

Stage 1 (capture), stage 4 (evaluation, both passes of a label-agnostic injection) and the benchmarks share
it; what they read and write (manifests, audio files, tables, stores, wavs) stays in the stages
(`generate.run`, `evaluate.main`). The engine does no file I/O.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .hooks import Intervention, InterventionSpec, SpanTracker, StatsRecorder
from .types import GenerationOutput, GenerationSettings, Instance

#: mask_fn(batch) -> masks [B, L, N], or (masks, values) for an intervention that needs values (`erase`)
MaskFn = Callable[[list[Instance]], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class BatchResult:
    """One batch's instances, outputs, statistics (with capture) and option scores (when asked)."""

    instances: list[Instance]
    outputs: list[GenerationOutput]
    seconds: float  # wall time per instance
    stats: dict[str, np.ndarray] | None = None
    #: [B, max options] log-probability of each option's number at the first generated position (NaN beyond
    #: a row's options), the `s_e` of the label-agnostic injections
    option_scores: np.ndarray | None = None


def option_token_ids(adapter: Any, n: int) -> list[int]:
    """Token ids of the option numbers "1".."n" (the SER prompt lists options by number).

    An adapter may define `option_token_ids(n)`; otherwise its tokenizer must encode each number as one token.
    """
    own = getattr(adapter, "option_token_ids", None)
    if callable(own):
        return [int(t) for t in own(n)]
    tok = getattr(adapter, "tokenizer", None) or getattr(getattr(adapter, "processor", None), "tokenizer", None)
    if tok is None:
        raise ValueError(f"adapter {adapter.name!r} has no tokenizer: define option_token_ids(n) for option scores")
    ids = []
    for k in range(1, n + 1):
        enc = tok.encode(str(k), add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"adapter {adapter.name!r}: option number {k} is {len(enc)} tokens, not one")
        ids.append(int(enc[0]))
    return ids


class OptionScorer:
    """Log-probabilities of the option numbers at the first generated position, from the output head's logits
    of the prefill call (a forward hook on `root.get_output_embeddings()`; left padding puts every row's
    next-token logits at the last position)."""

    def __init__(self, adapter: Any, root: torch.nn.Module) -> None:
        head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
        if head is None:
            raise ValueError(f"adapter {adapter.name!r}: the decoder has no output head to read option scores from")
        self.adapter, self.head = adapter, head
        self.logp: torch.Tensor | None = None

    def start(self) -> None:
        self.logp = None

    def _hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.logp is None:  # the prefill call only
            self.logp = torch.log_softmax(output[:, -1].float(), dim=-1).detach()

    @contextlib.contextmanager
    def attached(self) -> Iterator[OptionScorer]:
        handle = self.head.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    def scores(self, batch: Sequence[Instance]) -> np.ndarray:
        if self.logp is None:
            raise RuntimeError("the output head was not called during the prefill")
        width = max((len(i.options) for i in batch), default=0)
        ids = option_token_ids(self.adapter, width)
        lp = self.logp[:, ids].cpu().numpy().astype(np.float64) if width else np.zeros((len(batch), 0))
        for b, inst in enumerate(batch):
            lp[b, len(inst.options) :] = np.nan
        return lp


class Engine:
    """Runs one adapter's generation over batches with the hooks of one stage.

    `run` attaches the span tracker, the intervention (unless it is the identity), the statistics recorder
    (`record`) and the option scorer (`option_scores`) for the whole loop and removes them when the loop ends,
    also on error or when the caller stops iterating early.
    """

    def __init__(
        self,
        adapter: Any,
        settings: GenerationSettings,
        *,
        component: str = "thinker",
        site: str = "gate",
        batch_size: int = 1,
    ) -> None:
        self.adapter, self.settings = adapter, settings
        self.component, self.site = component, site
        self.sites = adapter.resolve_sites(component, site)
        self.root = adapter.decoder_root(component)
        self.batch_size = max(1, batch_size if adapter.supports_batching else 1)

    def run(
        self,
        instances: Sequence[Instance],
        audios: dict[str, np.ndarray],
        *,
        intervention: InterventionSpec | None = None,
        mask_fn: MaskFn | None = None,
        record: bool = False,
        sum_squares: bool = False,
        option_scores: bool = False,
    ) -> Iterator[BatchResult]:
        """Yield one `BatchResult` per batch of `instances` (audio looked up by `Instance.wav`)."""
        tracker = SpanTracker(self.adapter.component_stop_token_ids(self.component))
        with contextlib.ExitStack() as stack:
            stack.enter_context(tracker.attached(self.root))
            iv = None
            if intervention is not None and not intervention.is_identity:
                if mask_fn is None:
                    raise ValueError(f"intervention {intervention.kind!r} needs a mask_fn")
                iv = stack.enter_context(Intervention(self.sites, tracker, intervention).attached())
            rec = stack.enter_context(StatsRecorder(self.sites, tracker, sum_squares).attached()) if record else None
            scorer = stack.enter_context(OptionScorer(self.adapter, self.root).attached()) if option_scores else None
            for b0 in range(0, len(instances), self.batch_size):
                batch = list(instances[b0 : b0 + self.batch_size])
                t0 = time.perf_counter()
                prepared = self.adapter.prepare(batch, [audios[i.wav] for i in batch])
                tracker.start(self.adapter.prefill_span_codes(self.component, prepared))
                if rec is not None:
                    rec.reset(len(batch))
                if scorer is not None:
                    scorer.start()
                if iv is not None:
                    got = mask_fn(batch)
                    masks, values = got if isinstance(got, tuple) else (got, None)
                    iv.set_masks(masks, values)
                with torch.inference_mode():
                    outs = self.adapter.generate(prepared, self.settings)
                yield BatchResult(
                    instances=batch,
                    outputs=outs,
                    seconds=(time.perf_counter() - t0) / len(batch),
                    stats=rec.result() if rec is not None else None,
                    option_scores=scorer.scores(batch) if scorer is not None else None,
                )
