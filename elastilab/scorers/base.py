"""The scorer contract (what a scorer sees, its registry, the block's slot for it), random choice
(the floor) and the attention helpers the scorers share."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS


@dataclass
class Candidates:
    """What a scorer sees: one block's candidates for one component.

    h: the rows the component would run on, normalised as the sub-layer sees them: [B, T, d] for
    token components, [B, K, d] attention rows for ``attn_heads``, [n, d] MLP rows for ``mlp_experts``.
    rows: index of each row in the flattened B x T batch (shape h.shape[:-1]), so a scorer can look
    up anything it computed per position. pos / rope / valid: positions, rotary tables and
    validity (False = padding) of attention rows."""

    block: nn.Module
    component: str
    h: Tensor
    rows: Tensor
    pos: Tensor | None = None
    rope: tuple | None = None
    valid: Tensor | None = None

    @property
    def spec(self):
        return self.block._spec()

    def n_out(self) -> int:
        if self.component == "mlp_units":
            return self.spec.mlp.width
        return self.block.routers[self.component].proj.out_features


class Scorer:
    """Base class: ``__call__(candidates) -> scores`` shaped like the router's output."""

    name = "base"
    components: tuple[str, ...] = LAYER_COMPONENTS + GATED_COMPONENTS
    counted = True  #: its work is part of the measured compute

    def check(self, em, component: str) -> None:
        """Raise a clear error if this scorer cannot choose ``component`` on ``em``."""
        if component not in self.components:
            raise ValueError(f"scorer {self.name!r} does not support {component}; it supports "
                             f"{', '.join(self.components)}")

    def __call__(self, c: Candidates) -> Tensor:
        raise NotImplementedError


SCORERS: dict[str, type[Scorer]] = {}


def register(cls):
    SCORERS[cls.name] = cls
    return cls


def get_scorer(scorer) -> Scorer | None:
    """A Scorer from a registered name (None for "learned": the routers) or a Scorer instance."""
    if isinstance(scorer, Scorer):
        return scorer
    if scorer in (None, "learned"):
        return None
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; registered: learned, {', '.join(SCORERS)}")
    return SCORERS[scorer]()


def supports(scorer, em, component: str) -> bool:
    s = get_scorer(scorer)
    if s is None:  # the routers: mlp_units has none (its gate chooses, which is "magnitude")
        return component not in GATED_COMPONENTS
    try:
        s.check(em, component)
    except ValueError:
        return False
    return True


class Scoring(nn.Module):
    """The block's slot for a scorer: a module, so the FLOP counter sees its work by name."""

    def __init__(self):
        super().__init__()
        self.scorer: Scorer | None = None

    def forward(self, c: Candidates) -> Tensor:
        if c.component not in self.scorer.components:  # capacities may have changed since scoring()
            raise ValueError(f"scorer {self.scorer.name!r} does not support {c.component}; it supports "
                             f"{', '.join(self.scorer.components)}")
        return self.scorer(c)


# ------------------------------------------------------------------------------ the scorers
@register
class Random(Scorer):
    """Seeded noise: the floor any method must beat at the same compute."""

    name = "random"
    components = LAYER_COMPONENTS + GATED_COMPONENTS + ("visual_tokens",)  # image tokens: ElasticLlava draws them

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, c):
        n = c.n_out()
        s = torch.randn(*c.h.shape[:-1], n, generator=self.generator).to(c.h)
        return s.squeeze(-1) if n == 1 else s


def _project(a, h: Tensor, part: str, rope=None) -> Tensor:
    """Rows h [B, K, d] through the q, k or v projection, split into heads [B, n, K, hd] (q and k through
    the per-head norm, if any, and rotated when rope is given)."""
    w, b, n = {"q": (a.w_q, a.b_q, a.n_heads), "k": (a.w_k, a.b_k, a.n_kv_heads),
               "v": (a.w_v, a.b_v, a.n_kv_heads)}[part]
    x = F.linear(h, w, b).view(*h.shape[:2], n, a.head_dim).transpose(1, 2)
    return x if part == "v" else a.heads(x, part, rope)


def _heads(a, h: Tensor, pos: Tensor, rope, valid: Tensor | None) -> Tensor:
    """Per-head attention outputs o [B, H, K, hd] of rows h [B, K, d] attending to each other
    (causal and windowed by position when the model is; padding rows are never keys)."""
    K = h.shape[1]
    q, k, v = _project(a, h, "q", rope), _project(a, h, "k", rope), _project(a, h, "v")
    mask = a.visible(pos, pos)
    if valid is not None and not bool(valid.all()):
        keys = valid[:, None, :].expand(-1, K, -1)
        mask = keys if mask is None else mask & keys
        mask = mask | ~valid[:, :, None]  # padding queries still see a key (no NaN)
    return a.attend(q, k, v, None if mask is None else mask[:, None])


def _positions(c: Candidates) -> Tensor:
    if c.pos is not None:
        return c.pos
    B, T = c.h.shape[:2]
    return torch.arange(T, device=c.h.device).expand(B, T)
