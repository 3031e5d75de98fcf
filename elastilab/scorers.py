"""Selection methods. A *scorer* gives, for one block and one component, the scores of its candidates
(tokens, heads or MLP slices); top-k (or a calibrated threshold) turns them into a selection, exactly
as for the learned routers. So every method runs the same routed execution and its compute is
measured the same way (the kvpress pattern: one small class per method, one registry, one test).

    with em.scoring("oracle"):          # or "random", "magnitude", ..., or a Scorer instance
        el.evaluate(em, blocks)

==================== ================================ ==================================================
name                 components                       score
==================== ================================ ==================================================
learned              all                              the routers (the default)
random               all, visual_tokens               seeded noise
oracle               all                              norm of the candidate's true contribution, computed
                                                      densely on the block's current input (not counted)
taylor               all                              |gradient of the loss x contribution|, first order,
                                                      from one dense forward + backward (not counted)
magnitude            attn_heads, mlp_experts          norm of each head's query / slice's gate activations
attention_received   attn_tokens, mlp_tokens          attention each token receives in the layer (H2O)
cls_attention        attn_tokens, mlp_tokens (ViTs)   attention the CLS token pays each token
fastv                visual_tokens (VLMs)             attention image tokens receive from the text (FastV)
tome                 attn_tokens, mlp_tokens (ViTs)   merges similar patches instead of dropping (ToMe)
==================== ================================ ==================================================

Counted scorers (``counted = True``) are real methods: their scoring work is part of the measured
compute (as router FLOPs). Oracles are ceilings for analysis: they look at what a candidate really
contributes, so their own work is left out of the measured compute (``compute.measure_flops``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GATED_COMPONENTS, LAYER_COMPONENTS, PARAM_COMPONENTS, TOKEN_COMPONENTS
from .routing import n_kept
from .spec import mlp_gate, mlp_hidden


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
    """Rows h [B, K, d] through the q, k or v projection, split into heads [B, n, K, hd] (rotated
    when rope is given)."""
    w, b, n = {"q": (a.w_q, a.b_q, a.n_heads), "k": (a.w_k, a.b_k, a.n_kv_heads), "v": (a.w_v, a.b_v, a.n_kv_heads)}[part]
    x = F.linear(h, w, b).view(*h.shape[:2], n, a.head_dim).transpose(1, 2)
    return x if rope is None else a.rope(x, *rope)


def _heads(a, h: Tensor, pos: Tensor, rope, valid: Tensor | None) -> Tensor:
    """Per-head attention outputs o [B, H, K, hd] of rows h [B, K, d] attending to each other
    (causal by position when the model is causal; padding rows are never keys)."""
    K = h.shape[1]
    q, k, v = _project(a, h, "q", rope), _project(a, h, "k", rope), _project(a, h, "v")
    mask = None
    if a.causal:
        mask = pos[:, None, :] <= pos[:, :, None]
    if valid is not None and not bool(valid.all()):
        keys = valid[:, None, :].expand(-1, K, -1)
        mask = keys if mask is None else mask & keys
        mask = mask | ~valid[:, :, None]  # padding queries still see a key (no NaN)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                          scale=a.scaling, enable_gqa=a.n_heads != a.n_kv_heads)


def _positions(c: Candidates) -> Tensor:
    if c.pos is not None:
        return c.pos
    B, T = c.h.shape[:2]
    return torch.arange(T, device=c.h.device).expand(B, T)


@register
class Oracle(Scorer):
    """The norm of each candidate's true contribution to the residual stream, computed densely on
    the block's current input (so it follows the routing of earlier layers): a token's sub-layer
    output ||dh||, a head's output through its slice of the output projection, an MLP slice's
    output. Non-causal and as costly as the dense sub-layer: a ceiling for analysis, not counted.
    Only a proxy for what matters downstream (see ``Taylor``)."""

    name = "oracle"
    counted = False

    def __call__(self, c):
        spec, comp, h = c.spec, c.component, c.h
        if comp == "attn_tokens":
            o = _heads(spec.attn, h, _positions(c), c.rope, None)
            B, T = h.shape[:2]
            y = F.linear(o.transpose(1, 2).reshape(B, T, -1), spec.attn.w_o)
            return _scaled(y, spec.ls1).norm(dim=-1)
        if comp == "attn_heads":
            a = spec.attn
            o = _heads(a, h, _positions(c), c.rope, c.valid)                  # [B, H, K, hd]
            w_o = a.w_o.view(a.w_o.shape[0], a.n_heads, a.head_dim)          # [d, H, hd]
            y = torch.einsum("bhkx,dhx->bkhd", o, w_o)
            return _scaled(y, spec.ls1).norm(dim=-1)                         # [B, K, H]
        hidden = mlp_hidden(spec.mlp, h)
        if comp == "mlp_tokens":
            return _scaled(F.linear(hidden, spec.mlp.w_out), spec.ls2).norm(dim=-1)
        if comp == "mlp_units":  # |hidden unit| x the norm of its output weights
            return hidden.abs() * _scaled(spec.mlp.w_out.t(), spec.ls2).norm(dim=-1)
        E = c.n_out()
        n, width = hidden.shape
        w_out = spec.mlp.w_out.view(-1, E, width // E)                       # [d, E, F/E]
        y = torch.einsum("nef,def->ned", hidden.view(n, E, width // E), w_out)
        return _scaled(y, spec.ls2).norm(dim=-1)                             # [n, E]


def _scaled(y: Tensor, layer_scale: Tensor | None) -> Tensor:
    return y if layer_scale is None else y * layer_scale


@register
class Taylor(Scorer):
    """|dL/dg| for a gate g = 1 on each candidate: the first-order change of a loss L if that
    candidate were removed (gradient of the loss x the candidate's contribution). Measured on the
    dense model by one forward + backward of the same input before the routed forward
    (``ElasticModel.forward`` calls ``before_forward``). The loss: a language model's next-token
    cross-entropy on its input, a classifier's cross-entropy against its own top-1, otherwise half
    the squared norm of the final hidden states; or ``loss(output)`` given to the constructor. A ceiling for analysis, not counted."""

    name = "taylor"
    counted = False

    def __init__(self, loss=None):
        self.loss = loss
        self.tables: dict = {}
        self._input = None

    def before_forward(self, em, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("input_ids", kwargs.get("pixel_values"))
        if not torch.is_tensor(x):
            raise ValueError("Taylor scores need the model's input as a tensor (input_ids or pixel_values)")
        if self._input is x:  # measured already for this very tensor (compute.measure_flops does so
            return            # before counting, so that this work is not counted)
        self._input = x
        blocks = em.blocks
        for b in blocks:
            b.probe = {}
        try:
            call = dict(kwargs, use_cache=False) if em.adapter.causal else kwargs
            with torch.enable_grad(), em.training_estimator(), em.capacity(**{c: 1.0 for c in em.capacities}):
                out = em.model(*args, **call)
                loss = self._loss(out, args, kwargs)
                gates = [(b.layer_idx, c, g) for b in blocks for c, g in b.probe.items()]
                grads = torch.autograd.grad(loss, [g for *_, g in gates], allow_unused=True)
        finally:
            for b in blocks:
                b.probe = None
        self.tables = {}
        for (i, comp, g), d in zip(gates, grads):
            t = torch.zeros_like(g) if d is None else d.detach().abs()
            self.tables[(i, comp)] = t.reshape(-1, t.shape[-1]) if comp in PARAM_COMPONENTS + GATED_COMPONENTS else t.reshape(-1)

    def _loss(self, out, args, kwargs) -> Tensor:
        if self.loss is not None:
            return self.loss(out)
        logits = getattr(out, "logits", None)
        ids = args[0] if args else kwargs.get("input_ids")
        if logits is not None and ids is not None and ids.dtype == torch.long:
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        if logits is not None:  # a classifier: cross-entropy against its own top-1
            return F.cross_entropy(logits.float(), logits.argmax(-1).detach())
        hidden = out if torch.is_tensor(out) else out.last_hidden_state
        return 0.5 * hidden.float().pow(2).sum()

    def __call__(self, c):
        key = (c.block.layer_idx, c.component)
        if key not in self.tables:
            raise RuntimeError("Taylor scores were not measured for this input; call the ElasticModel "
                               "itself (em(...)) inside `with em.scoring('taylor')`")
        table = self.tables[key]
        if c.rows.numel() and int(c.rows.max()) >= len(table):
            raise RuntimeError("Taylor scores were measured on another input; run the model on one batch at a time")
        return table.to(c.h.device)[c.rows].to(c.h.dtype)


@register
class Magnitude(Scorer):
    """Training-free parameter routing (CATS / TEAL style): an MLP slice scores the norm of its
    gate activations, a head the norm of its query. Computing them costs the gate projection
    (MLP) or the query projection (heads): counted as scoring work, since a real implementation
    has to compute them before it can choose. A single hidden unit (``mlp_units``) scores the size
    of its gate activation, which the MLP computes anyway and reuses: no scoring work (None)."""

    name = "magnitude"
    components = ("attn_heads", "mlp_experts", "mlp_units")

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

    def __call__(self, c):
        a, pos = c.spec.attn, _positions(c)
        q, k = _project(a, c.h, "q", c.rope), _project(a, c.h, "k", c.rope)
        k = k.repeat_interleave(a.n_heads // a.n_kv_heads, 1)
        s = (q @ k.transpose(-1, -2)) * a.scaling                          # [B, H, T(q), T(k)]
        if a.causal:
            s = s.masked_fill(~(pos[:, None, None, :] <= pos[:, None, :, None]), float("-inf"))
        return s.softmax(-1).mean(1).sum(1)


@register
class ClsAttention(Scorer):
    """Training-free token routing for ViTs: log of the attention the CLS token (position 0) pays
    each token in this layer, averaged over heads, from the layer's frozen q/k weights. Costs one
    query and every key projection, counted as scoring work."""

    name = "cls_attention"
    components = TOKEN_COMPONENTS

    def check(self, em, component):
        super().check(em, component)
        model = em.model
        if em.adapter.causal or not em.adapter.has_cls(model):
            raise ValueError(f"scorer 'cls_attention' needs a vision transformer with a CLS token; "
                             f"{type(model).__name__} has none")

    def __call__(self, c):
        a = c.spec.attn
        q = _project(a, c.h[:, :1], "q")
        k = _project(a, c.h, "k").repeat_interleave(a.n_heads // a.n_kv_heads, 1)
        att = torch.softmax((q @ k.transpose(-1, -2)) * a.scaling, dim=-1)  # [B, H, 1, T]
        return att.mean(1)[:, 0].clamp_min(1e-12).log()


@register
class FastV(Scorer):
    """Training-free image-token pruning in a VLM (FastV): after LM layer K-1, keep the image tokens
    that received the most attention from the text that follows them. Runs inside ``ElasticLlava``
    (its ``fastv_layer``); counted, since its layers before K see every image token."""

    name = "fastv"
    components = ("visual_tokens",)

    def check(self, em, component):
        super().check(em, component)
        if not hasattr(em, "fastv_layer"):
            raise ValueError("scorer 'fastv' chooses image tokens of a visual-language model (ElasticLlava)")

    def __call__(self, c):
        raise RuntimeError("FastV chooses image tokens inside ElasticLlava, not per block")



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
    merges = True

    def check(self, em, component):
        super().check(em, component)
        if em.adapter.causal:
            raise ValueError("scorer 'tome' merges the tokens of vision transformers (non-causal); "
                             f"{type(em.model).__name__} is causal")
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


def nearest_kept(h: Tensor, keep: Tensor) -> Tensor:
    """For every token of h [B, T, d], the kept token (keep [B, T]) with the most similar input
    (cosine); a kept token is its own. Used when skipped tokens receive a kept token's output."""
    m = F.normalize(h.float(), dim=-1)
    sim = (m @ m.transpose(1, 2)).masked_fill(~keep[:, None, :], float("-inf"))
    return torch.where(keep, torch.arange(h.shape[1], device=h.device), sim.argmax(-1))
