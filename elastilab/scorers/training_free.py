"""Training-free selection methods: their scoring work is counted as compute."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from elastilab.core.config import TOKEN_COMPONENTS
from elastilab.core.spec import mlp_gate
from elastilab.scorers.base import KINDS, Scorer, _positions, _project, register


@register
class Magnitude(Scorer):
    """Training-free parameter routing (CATS / TEAL style): an MLP slice scores the norm of its
    gate activations, a head the norm of its query. Computing them costs the gate projection
    (MLP) or the query projection (heads): counted as scoring work, since a real implementation
    has to compute them before it can choose. A single hidden unit (``mlp_units``) scores the size
    of its gate activation, which the MLP computes anyway and reuses: no scoring work (None)."""

    name = "magnitude"
    components = ("attn_heads", "mlp_experts", "mlp_units")
    kinds = KINDS

    def __call__(self, c):
        if c.component == "mlp_units":
            return None  # RoutedMLP chooses by the gate activations it computes
        spec = c.spec
        if c.component == "attn_heads":
            a = spec.attn
            q = F.linear(c.h, a.w_q, a.b_q)
            return q.view(*q.shape[:-1], a.n_heads, a.head_dim).norm(dim=-1)
        gate, E = mlp_gate(spec.mlp, c.h), c.n_out()
        return gate.view(*gate.shape[:-1], E, spec.mlp.width // E).norm(dim=-1)


@register
class AttentionReceived(Scorer):
    """Training-free token routing (H2O / FastV style): a token scores the attention it receives in
    this layer, summed over the queries that see it and averaged over heads, from the layer's own
    frozen q/k projections applied to the scored hidden state. Costs those projections and scores."""

    name = "attention_received"
    components = TOKEN_COMPONENTS
    kinds = KINDS

    def __call__(self, c):
        a, pos = c.spec.attn, _positions(c)
        q, k = _project(a, c.h, "q", c.rope), _project(a, c.h, "k", c.rope)
        k = k.repeat_interleave(a.n_heads // a.n_kv_heads, 1)
        s = a.scores(q, k)                                                 # [B, H, T(q), T(k)]
        if (seen := a.visible(pos, pos)) is not None:
            s = s.masked_fill(~seen[:, None], float("-inf"))
        return s.softmax(-1).mean(1).sum(1)


@register
class ClsAttention(Scorer):
    """Training-free token routing for ViTs: log of the attention the CLS token (position 0) pays
    each token in this layer, averaged over heads, from the layer's frozen q/k weights. Costs one
    query and every key projection, counted as scoring work."""

    name = "cls_attention"
    components = TOKEN_COMPONENTS
    kinds = ("vit",)

    def check(self, em, component):
        model = em.model
        if component in self.components and (em.adapter.causal or not em.adapter.has_cls(model)):
            raise ValueError(f"scorer 'cls_attention' needs a vision transformer with a CLS token; "
                             f"{type(model).__name__} has none")
        super().check(em, component)

    def __call__(self, c):
        a = c.spec.attn
        q = _project(a, c.h[:, :1], "q")
        k = _project(a, c.h, "k").repeat_interleave(a.n_heads // a.n_kv_heads, 1)
        att = torch.softmax(a.scores(q, k), dim=-1)                         # [B, H, 1, T]
        return att.mean(1)[:, 0].clamp_min(1e-12).log()


@register
class FastV(Scorer):
    """Training-free image-token pruning in a VLM (FastV, Chen et al. 2024): layers < K see every
    image token; an image token scores the attention it received in layer K-1 (mean over heads and
    over the text tokens after the last image, recomputed from that layer's input with its frozen
    q/k weights), and layers >= K run on the kept ones. ``layer``: K; None: the model's
    ``fastv_layer`` (2). Counted, since its layers before K see every image token."""

    name = "fastv"
    components = ("visual_tokens",)
    kinds = ("vlm",)

    def __init__(self, layer: int | None = None):
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 1):
            raise ValueError(f"FastV's layer must be an integer >= 1 (layers before it see every image token), "
                             f"got {layer!r}")
        self.layer = layer

    def image_layer(self, em) -> int:
        return em.fastv_layer if self.layer is None else self.layer

    def __call__(self, c):
        spec = c.spec
        a = spec.attn
        h = spec.attn_norm(c.h)
        B, T, _ = h.shape
        q = F.linear(h, a.w_q, a.b_q).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        kk = F.linear(h, a.w_k, a.b_k).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        cos, sin = (t.expand(B, -1, -1) for t in c.rope)
        q, kk = a.heads(q, "q", (cos, sin)), a.heads(kk, "k", (cos, sin))
        s = a.scores(q, kk.repeat_interleave(a.n_heads // a.n_kv_heads, 1))
        allowed = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()[None] & c.valid[:, None, :]
        att = s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)  # [B, T(q), T(k)]
        slots = torch.zeros(B * T, dtype=torch.bool, device=h.device).index_fill_(0, c.rows.reshape(-1), True)
        slots = slots.view(B, T)
        last = T - 1 - torch.flip(slots, [1]).float().argmax(1)                   # last image slot per row
        after = (torch.arange(T, device=h.device)[None] > last[:, None]) & c.valid  # the text that follows
        received = (att * after[..., None]).sum(1) / after.sum(1, keepdim=True).clamp(min=1)
        return received.reshape(-1)[c.rows]
