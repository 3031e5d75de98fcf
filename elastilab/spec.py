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

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),  # OpenAI CLIP's
}


@dataclass
class MLPWeights:
    """``swiglu``: w_out @ (act(w_gate @ h + b_gate) * (w_in @ h + b_in)) + b_out;
    ``gelu``: w_out @ act(w_in @ h + b_in) + b_out.

    Shapes: w_in, w_gate [F, d]; w_out [d, F]; b_in, b_gate [F]; b_out [d]. The output is a sum over the F
    hidden units, so expert e = hidden units [e*F/E, (e+1)*F/E) gives E experts whose sum is exact.
    ``b_out`` is added once per token, not once per expert.
    """

    kind: str
    act: str
    w_in: Tensor
    w_out: Tensor
    w_gate: Tensor | None = None
    b_in: Tensor | None = None
    b_out: Tensor | None = None
    b_gate: Tensor | None = None  # e.g. Llama with mlp_bias=True
    #: w_out transposed into a contiguous [F, d] copy (unit-major), set by ElasticBlock for the few-row
    #: (decode) path of mlp_units, which then reads only the chosen units' rows; None elsewhere
    w_out_t: Tensor | None = None

    @property
    def width(self) -> int:
        return self.w_in.shape[0]

    def unit_slice(self, start: int, stop: int) -> "MLPWeights":
        """The MLP restricted to hidden units [start, stop) (views, no copy), without b_out."""
        return MLPWeights(
            self.kind, self.act, self.w_in[start:stop], self.w_out[:, start:stop],
            None if self.w_gate is None else self.w_gate[start:stop],
            None if self.b_in is None else self.b_in[start:stop], None,
            None if self.b_gate is None else self.b_gate[start:stop],
        )

    def permuted(self, order: Tensor) -> "MLPWeights":
        """The same function with hidden units reordered (used by clustered experts)."""
        return MLPWeights(
            self.kind, self.act, self.w_in[order], self.w_out[:, order],
            None if self.w_gate is None else self.w_gate[order],
            None if self.b_in is None else self.b_in[order], self.b_out,
            None if self.b_gate is None else self.b_gate[order],
        )


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
    #: attn_heads (``kernels.head_attention.head_attention_gather``); None elsewhere
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


def mlp_gate(w: MLPWeights, h: Tensor) -> Tensor:
    """The activated gate [..., F]: act(w_gate h + b_gate) of a SwiGLU MLP, act(w_in h + b_in) of a
    GELU one (whose hidden units it is)."""
    if w.kind == "swiglu":
        return ACTIVATIONS[w.act](F.linear(h, w.w_gate, w.b_gate))
    if w.kind == "gelu":
        return ACTIVATIONS[w.act](F.linear(h, w.w_in, w.b_in))
    raise ValueError(f"unknown MLP kind {w.kind!r}; allowed: swiglu, gelu")


def mlp_hidden(w: MLPWeights, h: Tensor) -> Tensor:
    """The hidden-unit activations [..., F] of the MLP on rows h [..., d] (before ``w_out``)."""
    gate = mlp_gate(w, h)
    return gate * F.linear(h, w.w_in, w.b_in) if w.kind == "swiglu" else gate


def mlp_forward(w: MLPWeights, h: Tensor, add_bias_out: bool = True) -> Tensor:
    """Dense MLP on rows h [..., d] (the torch reference every routed path reduces to)."""
    y = F.linear(mlp_hidden(w, h), w.w_out)
    if add_bias_out and w.b_out is not None:
        y = y + w.b_out
    return y


def mlp_experts_forward(w: MLPWeights, h: Tensor, experts: Tensor, gates: Tensor, n_experts: int) -> Tensor:
    """Each row of h [n, d] computes only its k chosen hidden-unit slices.

    experts [n, k] int64 expert ids, gates [n, k] multipliers (1.0 in the forward value; they carry
    the straight-through gradient). Rows are grouped by expert, so each expert's weights are used
    in one matmul over the rows that chose it (the scattermoe / fused-MoE idea, in torch).
    """
    n, k = experts.shape
    size = w.width // n_experts
    flat_e = experts.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    rows = order // k
    counts = torch.bincount(flat_e, minlength=n_experts).tolist()
    y = h.new_zeros(n, w.w_out.shape[0])
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        sel = rows[start:start + count]
        g = gates.reshape(-1)[order[start:start + count]]
        part = mlp_forward(w.unit_slice(e * size, (e + 1) * size), h[sel], add_bias_out=False)
        y = y.index_add(0, sel, part * g[:, None].to(part.dtype))
        start += count
    if w.b_out is not None:
        y = y + w.b_out
    return y


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
