"""Token merging: ToMe (similar patches averaged, every member receives the output) and the helpers
that ``skipped_tokens="merge"`` shares with it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from elastilab.core.config import TOKEN_COMPONENTS
from elastilab.core.routing import n_kept
from elastilab.scorers.base import Scorer, register


@register
class ToMe(Scorer):
    """Token merging for ViTs (ToMe, Bolya et al. 2023), one bipartite step per layer and component:
    patches alternate into sets A and B, each A patch finds its most similar B patch (cosine of the
    normalised hidden states), and the most similar pairs are merged until ceil(c * N) tokens are
    left. The sub-layer runs on the merged tokens (the mean of their members) and every member
    receives its merged token's output, so nothing is dropped (ToMe-SD's unmerge). Protected tokens
    (CLS, registers) are never merged. Capacity >= 0.5 (one step merges at most half the tokens).
    The matching costs counted scoring work; averaging and copying are element-wise."""

    name = "tome"
    components = TOKEN_COMPONENTS
    kinds = ("vit",)

    def check(self, em, component):
        if em.adapter.causal:  # the kind check would refuse it too: this says why
            raise ValueError("scorer 'tome' merges the tokens of vision transformers (non-causal); "
                             f"{type(em.model).__name__} is causal")
        super().check(em, component)
        low = {i: c for i, c in em.layer_capacities.get(component, {}).items() if c < 0.5}
        if low:  # e.g. a budget allocated across layers cut these deeper than one merging step reaches
            raise ValueError(f"scorer 'tome' merges at most half of a layer's tokens in one step; {component} "
                             f"has capacity < 0.5 in layers {sorted(low)} (use capacities >= 0.5)")

    def __call__(self, c):
        h, block = c.h, c.block
        B, T, _ = h.shape
        P = min(T, block._spec().n_protected)
        free = T - P
        r = free - n_kept(block.capacity[c.component], free)
        a_idx = torch.arange(P, T, 2, device=h.device)
        b_idx = torch.arange(P + 1, T, 2, device=h.device)
        if r > len(a_idx):
            raise ValueError(f"scorer 'tome' merges at most half of the {free} tokens of a layer in one step; "
                             f"capacity {block.capacity[c.component]} needs {r} merges (use a capacity >= 0.5)")
        metric = F.normalize(h.float(), dim=-1)
        best, partner_b = (metric[:, a_idx] @ metric[:, b_idx].transpose(1, 2)).max(-1)  # [B, |A|]
        merged = best.argsort(-1, descending=True)[:, :r]                                # A positions
        self.partner = torch.arange(T, device=h.device).repeat(B, 1)
        self.partner.scatter_(1, a_idx[merged], b_idx[partner_b.gather(1, merged)])
        scores = torch.ones(B, T, device=h.device, dtype=h.dtype)
        return scores.scatter_(1, a_idx[merged], 0.0)  # top-k keeps exactly the unmerged tokens

    def merged_into(self):
        return self.partner


def merge_rows(h: Tensor, partner: Tensor) -> Tensor:
    """h [B, T, d] with each token that others merge into replaced by the mean of its group
    (partner [B, T]: the token each one merges into, itself when it stays)."""
    B, T, d = h.shape
    flat = (partner + T * torch.arange(B, device=h.device)[:, None]).reshape(-1)
    total = torch.zeros(B * T, d, dtype=h.dtype, device=h.device).index_add(0, flat, h.reshape(-1, d))
    count = torch.zeros(B * T, dtype=h.dtype, device=h.device).index_add(0, flat, torch.ones_like(flat, dtype=h.dtype))
    return (total / count.clamp(min=1)[:, None]).view(B, T, d)


def unmerge(y: Tensor, keep: Tensor, partner: Tensor) -> Tensor:
    """Outputs y [n, d] of the kept tokens (keep [B, T], in row-major order) -> [B * T, d]: every
    token gets the output of the token it merged into (partner [B, T])."""
    B, T = keep.shape
    slot = keep.reshape(-1).long().cumsum(0) - 1  # place of each kept token among the kept
    return y[slot[(partner + T * torch.arange(B, device=keep.device)[:, None]).reshape(-1)]]


def nearest_kept(h: Tensor, keep: Tensor, exclude_self: bool = False) -> Tensor:
    """For every token of h [B, T, d], the kept token (keep [B, T]) with the most similar input
    (cosine); a kept token is its own. Used when skipped tokens receive a kept token's output.
    exclude_self: a kept token gets its most similar *other* kept token (itself if it is the only
    one): whom it would receive from if it were skipped (router training with merging)."""
    m = F.normalize(h.float(), dim=-1)
    sim = (m @ m.transpose(1, 2)).masked_fill(~keep[:, None, :], float("-inf"))
    if exclude_self:
        T = h.shape[1]
        alone = keep.sum(1, keepdim=True) <= 1
        sim = sim.masked_fill(torch.eye(T, dtype=torch.bool, device=h.device) & ~alone[..., None], float("-inf"))
        return sim.argmax(-1)
    return torch.where(keep, torch.arange(h.shape[1], device=h.device), sim.argmax(-1))
