"""One row per component: what it chooses, who chooses, which sub-layer's compute it saves, what its capacity
rounds to, and the help of its capacity flag. Everything that lists components (config, the CLI flags, the
frontier's x axis) reads this table.

    COMPONENTS["attn_heads"].sublayer    # "attention"
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    name: str
    #: "tokens" (a learned router keeps tokens), "params" (a learned router picks heads/slices per token),
    #: "gated" (the MLP's own gate picks units: no router), "visual" (a VLM's image tokens before the LM)
    kind: str
    #: the sub-layer whose compute it saves: the frontier's x axis ("total": the whole language model)
    sublayer: str
    #: what its capacity is a fraction of
    chooses: str
    #: what a capacity rounds up to a whole number of (per token for heads, experts and units)
    unit: str
    #: the CLI help of its capacity flag (--attn-tokens, ...)
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_ROUNDED = "in (0, 1]; rounded up to whole "
TABLE = (
    Component("attn_tokens", "tokens", "attention", "tokens", "tokens",
              f"fraction of each block's tokens that enter attention, {_ROUNDED}tokens"),
    Component("mlp_tokens", "tokens", "mlp", "tokens", "tokens",
              f"fraction of each block's tokens that enter the MLP, {_ROUNDED}tokens"),
    Component("attn_heads", "params", "attention", "query heads", "heads",
              f"fraction of the query heads each token uses, {_ROUNDED}heads (0.9 of 9 heads computes all 9)"),
    Component("mlp_experts", "params", "mlp", "MLP slices", "experts",
              f"fraction of the MLP expert slices each token uses, {_ROUNDED}experts "
              "(0.9 of 8 experts computes all 8)"),
    Component("mlp_units", "gated", "mlp", "MLP hidden units", "units",
              "fraction of the MLP hidden units each token computes, in (0, 1], chosen by the size of the MLP's own "
              "gate activations (CATS: no router of its own, so train needs a routed component beside it); "
              "rounded up to whole units"),
    Component("visual_tokens", "visual", "total", "image tokens", "tokens",
              f"fraction of the image tokens that enter the language model, {_ROUNDED}tokens"),
)
COMPONENTS = {c.name: c for c in TABLE}


def names(*kinds: str) -> tuple[str, ...]:
    """The components of the given kinds, in table order."""
    return tuple(c.name for c in TABLE if c.kind in kinds)


def in_sublayer(sublayer: str) -> tuple[str, ...]:
    """The components that save compute in ``sublayer`` ("attention", "mlp" or "total"), in table order."""
    return tuple(c.name for c in TABLE if c.sublayer == sublayer)
