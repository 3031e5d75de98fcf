"""A model-family-neutral view of one transformer block, and the torch reference for its MLP.

Adapters translate a family's layer (Llama, GPT-2, ViT...) into a ``BlockSpec`` made of *views*
of the frozen base weights (no copies, except the permuted weights of clustered experts). The
routed execution in ``routing.py`` and the Triton kernels only ever see these specs, so each
idea is written once for every family.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elastilab_kernels.mlp import ACTIVATIONS, MLPWeights, mlp_experts_forward, mlp_forward, mlp_gate, mlp_hidden  # noqa: F401  (re-exported: the MLP math lives with its kernels)


@dataclass
class AttnWeights:
    """Projections as [out, in] matrices; query head h uses rows [h*hd, (h+1)*hd) of w_q."""

    w_q: Tensor
    w_k: Tensor
    w_v: Tensor
    w_o: Tensor
    n_heads: int
    n_kv_heads: int
    head_dim: int
    b_q: Tensor | None = None
    b_k: Tensor | None = None
    b_v: Tensor | None = None
    b_o: Tensor | None = None
    causal: bool = True
    #: callable(x [B, H, K, hd], cos [B, K, hd], sin) -> rotated x, for rotary models; None otherwise (and
    #: for a rotary model's layers without position encoding, SmolLM3's NoPE layers)
    rope: object = None
    scaling: float | None = None
    #: per-head norms of queries / keys (Qwen3, Gemma 3): callables on [..., hd], before RoPE; None otherwise
    q_norm: object = None
    k_norm: object = None
    #: sliding-window layers (Mistral, Gemma 3): a query sees keys less than ``window`` positions back
    window: int | None = None
    #: attention-logit soft-capping (Gemma 2): logits become softcap * tanh(logits / softcap)
    softcap: float | None = None
    #: w_o transposed into a contiguous [H*hd, d] copy, set by ElasticBlock for the few-row (decode) path of
    #: head routing (``kernels.head_attention.head_attention_gather``); None elsewhere
    w_o_t: Tensor | None = None

    def __post_init__(self):
        if self.scaling is None:
            self.scaling = self.head_dim ** -0.5

    def heads(self, x: Tensor, part: str, rope=None) -> Tensor:
        """Query ("q") or key ("k") heads x [B, n, K, hd] as attention uses them: through the per-head
        norm, then rotated when rope=(cos, sin) is given. Every path that projects q or k calls this."""
        norm = self.q_norm if part == "q" else self.k_norm
        if norm is not None:
            x = norm(x)
        return x if rope is None or self.rope is None else self.rope(x, *rope)

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Attention logits [B, H, Q, S] of heads q [B, H, Q, hd] and k [B, H, S, hd]: scaled, soft-capped."""
        s = (q @ k.transpose(-1, -2)) * self.scaling
        return s if self.softcap is None else torch.tanh(s / self.softcap) * self.softcap

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention outputs [B, H, Q, hd] of q [B, H, Q, hd] over k, v [B, Hkv, S, hd] (GQA when Hkv < H);
        mask: bool, broadcastable to [B, H, Q, S], True = may attend. torch's sdpa, or the same in plain ops
        with soft-capping, which sdpa lacks. Every routed and scoring path attends through this."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        if q.shape[1] != k.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
        s = self.scores(q, k)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s.softmax(-1, dtype=torch.float32).to(q.dtype) @ v

    def visible(self, qpos: Tensor, kpos: Tensor) -> Tensor | None:
        """Which keys each query may see, by position: qpos [B, Q], kpos [B, S] -> [B, Q, S] bool
        (causal, and within the sliding window); None for full bidirectional attention."""
        if not self.causal:
            return None
        gap = qpos[:, :, None] - kpos[:, None, :]
        return (gap >= 0) if self.window is None else (gap >= 0) & (gap < self.window)


@dataclass
class BlockSpec:
    """Pre-norm block: x + attn_out(attn(attn_norm(x))), then + mlp_out(mlp(mlp_norm(.))), where the
    outputs go through the post-norm (Gemma) and the LayerScale (DINOv2) when the family has them."""

    attn_norm: nn.Module
    mlp_norm: nn.Module
    attn: AttnWeights
    mlp: MLPWeights
    ls1: Tensor | None = None  # LayerScale gammas (DINOv2), None elsewhere
    ls2: Tensor | None = None
    #: leading positions never routed away (CLS and registers of ViTs; the attention sink of LMs)
    n_protected: int = 0
    extra: dict = field(default_factory=dict)
    post_attn_norm: nn.Module | None = None  # norms of the sub-layer outputs, before the residual add (Gemma)
    post_mlp_norm: nn.Module | None = None

    def attn_out(self, y: Tensor) -> Tensor:
        """The attention sub-layer's output rows y [..., d] as they are added to the residual stream."""
        y = y if self.post_attn_norm is None else self.post_attn_norm(y)
        return y if self.ls1 is None else y * self.ls1

    def mlp_out(self, y: Tensor) -> Tensor:
        y = y if self.post_mlp_norm is None else self.post_mlp_norm(y)
        return y if self.ls2 is None else y * self.ls2


def cluster_hidden_units(mlp, n_experts: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Balanced k-means of the MLP's hidden units by their input weights (MoEfication).

    Returns a permutation whose consecutive F/E blocks are the clusters; permuting the hidden
    units does not change the function, so the experts still sum to the dense MLP exactly.
    """
    w = mlp.w_in if mlp.w_gate is None else torch.cat([mlp.w_in, mlp.w_gate], 1)
    feats = F.normalize(w.detach().float(), dim=1)
    F_, size = feats.shape[0], feats.shape[0] // n_experts
    g = torch.Generator().manual_seed(seed)
    centers = feats[torch.randperm(F_, generator=g)[:n_experts]]
    for _ in range(iters):
        dist = torch.cdist(feats, centers)  # [F, E]
        assign = torch.full((F_,), -1, dtype=torch.long)
        pref = dist - dist.min(1, keepdim=True).values  # how much a unit loses by going elsewhere
        for e in torch.argsort(dist.min(0).values).tolist():  # clusters fill in turn, greedily
            free = (assign < 0).nonzero().squeeze(1)
            take = free[pref[free, e].topk(size, largest=False).indices]
            assign[take] = e
        centers = torch.stack([feats[assign == e].mean(0) for e in range(n_experts)])
    return torch.argsort(assign, stable=True)
