"""A `torch.compile` backend that replays the eager kernels as CUDA graphs with a static KV cache.

Why not torch's own `backend="cudagraphs"`: it counts only lifted parameters as static inputs (with
`inline_inbuilt_nn_modules`, none are lifted), so a decode step that writes the static KV cache (an input
mutation) is logged "skipping cudagraphs due to mutated inputs" and runs as an FX interpreter, as slowly as
eager (measured on an H200, bench/RESULTS-fastpath.md run 1: 19.3 ms/token against 18.4 eager). Here every
input that `torch._dynamo.mark_static_address` marked (the StaticCache tensors, the hooks' accumulators, span
state and factors) counts as static, exactly as inductor's `reduce-overhead` does, and mutations stay inside
the graph (`keep_inference_input_mutations`). The arithmetic is the eager kernels' (AOT-traced aten ops, no
fusion), so outputs equal the static-cache eager path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

BACKEND_NAME = "emotion_neurons_cudagraphs"


def static_cudagraphs(dynamo_model: torch.fx.GraphModule, dynamo_inputs: Sequence[Any]) -> Any:
    """torch's cudagraphs backend (torch/_dynamo/backends/cudagraphs.py) with marked-static inputs static."""
    from torch._dynamo.backends import cudagraphs as cg
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._inductor.compile_fx import get_static_input_idxs
    from torch._inductor.cudagraph_trees import cudagraphify_impl

    def skip_reason(aot_model: torch.fx.GraphModule, static: set[int]) -> str | None:
        mutated = cg.find_input_mutations(aot_model.graph) - static
        if mutated:
            return cg.get_mutation_stack_trace(cg.get_placeholder_info(aot_model.graph), mutated)
        if skip := cg.check_multiple_devices_or_any_cpu_nodes(cg.get_device_node_mapping(aot_model)):
            return skip
        if node := cg.get_first_incompatible_cudagraph_node(aot_model):
            return cg.format_default_skip_message(f"incompatible op ({node.name})")
        return None

    def forward(aot_model: torch.fx.GraphModule, aot_inputs: list[Any], is_inference: bool = False) -> Any:
        interp = boxed_nop(aot_model, aot_inputs)
        fixed = cg.num_fw_fixed_arguments(len(dynamo_inputs), len(aot_inputs))
        static = set(range(fixed)) | set(get_static_input_idxs(fixed))
        if msg := skip_reason(aot_model, static):
            cg.log_cudagraph_skip_and_bump_counter(f"skipping cudagraphs due to {msg}")
            return interp
        out = cudagraphify_impl(
            interp,
            aot_inputs,
            sorted(static),
            device_index=cg.get_device_index(aot_model),
            is_backward=False,
            is_inference=is_inference,
            stack_traces=cg.get_stack_traces(aot_model),
            placeholders=cg.get_placeholder_info(aot_model.graph),
            mutated_input_idxs=cg.find_input_mutations(aot_model.graph),
        )
        out._boxed_call = True
        return out

    compiler = aot_autograd(
        fw_compiler=forward,
        bw_compiler=boxed_nop,
        inference_compiler=functools.partial(forward, is_inference=True),
        keep_inference_input_mutations=True,
    )
    return compiler(dynamo_model, dynamo_inputs)


@functools.cache
def register() -> str:
    """Register the backend with dynamo once; returns its name for `torch.compile(backend=...)`."""
    from torch._dynamo.backends.registry import register_backend

    register_backend(name=BACKEND_NAME)(static_cudagraphs)
    return BACKEND_NAME


#: attention implementation of the compiled decode step (`register_attention`)
ATTENTION_NAME = "emotion_neurons_sdpa"


def packed_gqa_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with one query position run on the key/value heads also when compiled.

    Why: for a one-token decode step transformers (5.23, `sdpa_attention_forward`) packs the query heads onto
    the key/value heads (`pack_gqa`, no copy of K/V) only when not compiling; under `torch.compile` it falls
    back to `repeat_kv`, which copies the whole static cache to every query head in every layer and step
    (at bs 32 with 1024 cached positions ~13 GB of memory traffic per step; the CUDA-graph path was slower than
    eager there, bench/RESULTS-fastpath.md run 6). Here the decode step always takes the packed form, exactly
    the ops transformers runs eagerly, so eager and compiled steps compute the same; every other call is
    transformers' function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward, use_gqa_in_sdpa

    n_rep = int(getattr(module, "num_key_value_groups", 1))
    b, h, q_len, _ = query.shape
    plain = kwargs.get("position_bias") is None and kwargs.get("cache") is None and not kwargs.get("softcap")
    masked = attention_mask is not None and attention_mask.shape[1] == 1  # else transformers uses enable_gqa
    if n_rep > 1 and q_len == 1 and plain and masked and not use_gqa_in_sdpa(attention_mask, key, value):
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, h // n_rep, n_rep, query.shape[-1]),  # = transformers' pack_gqa
            key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False,
        )  # fmt: skip
        out = out.reshape(out.shape[0], -1, q_len, value.shape[-1])
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


@functools.cache
def register_attention() -> str:
    """Register `packed_gqa_sdpa` (and SDPA's mask builder) with transformers once; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, packed_gqa_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
