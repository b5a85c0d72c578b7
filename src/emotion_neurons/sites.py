"""Hook sites inside one SwiGLU decoder MLP (METHOD.md section 2), with their names in other tools.

Torch-free: the config schema's `hook_site` enum and the mask provenance read it at Snakefile parse time.
`down_proj(act_fn(gate_proj(x)) * up_proj(x))`:

| site | module hooked | TransformerLens (`blocks.<l>.` + ...) |
|---|---|---|
| `gate` | output of `act_fn` | none: TL's gated MLP applies the activation inline between `mlp.hook_pre` and `mlp.hook_post` |
| `pre_act` | output of `gate_proj` | `mlp.hook_pre` |
| `gated_product` | input of `down_proj` | `mlp.hook_post` |

nnsight users address the same tensors by module path (the adapter's component regex + `.act_fn` output,
`.gate_proj` output, `.down_proj` input).
"""

from __future__ import annotations

from typing import NamedTuple


class HookSite(NamedTuple):
    submodule: str  # child of the decoder-layer MLP module
    kind: str  # "forward": the submodule's output; "pre": its first input
    transformer_lens: str | None  # TransformerLens hook name under blocks.<layer>., None if TL has none
    what: str


HOOK_SITES: dict[str, HookSite] = {
    "gate": HookSite("act_fn", "forward", None, "act_fn(gate_proj(x)), the SwiGLU gate activation"),
    "pre_act": HookSite("gate_proj", "forward", "mlp.hook_pre", "gate_proj(x), before the activation"),
    "gated_product": HookSite("down_proj", "pre", "mlp.hook_post", "act_fn(gate_proj(x)) * up_proj(x)"),
}


def aliases(site: str) -> dict[str, str | None]:
    """The site's names elsewhere, for mask provenance and exports (`module`: the submodule and tensor)."""
    s = HOOK_SITES[site]
    return {
        "module": f"{s.submodule}.{'output' if s.kind == 'forward' else 'input'}",
        "transformer_lens": f"blocks.{{layer}}.{s.transformer_lens}" if s.transformer_lens else None,
    }
