"""Oracles: ceilings for analysis, whose own work is not counted as compute."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS, PARAM_COMPONENTS
from elastilab.core.spec import mlp_hidden
from elastilab.scorers.base import KINDS, Scorer, _heads, _positions, register


@register
class Oracle(Scorer):
    """The norm of each candidate's true contribution to the residual stream, computed densely on
    the block's current input (so it follows the routing of earlier layers): a token's sub-layer
    output ||dh||, a head's output through its slice of the output projection, an MLP slice's
    output. Non-causal and as costly as the dense sub-layer: a ceiling for analysis, not counted.
    Only a proxy for what matters downstream (see ``Taylor``)."""

    name = "oracle"
    components = LAYER_COMPONENTS + GATED_COMPONENTS
    kinds = KINDS
    counted = False

    def __call__(self, c):
        spec, comp, h = c.spec, c.component, c.h
        if comp == "attn_tokens":
            o = _heads(spec.attn, h, _positions(c), c.rope, None)
            B, T = h.shape[:2]
            y = F.linear(o.transpose(1, 2).reshape(B, T, -1), spec.attn.w_o)
            return spec.attn_out(y).norm(dim=-1)  # through the post-norm too, where the family has one
        if comp == "attn_heads":
            a = spec.attn
            o = _heads(a, h, _positions(c), c.rope, c.valid)                  # [B, H, K, hd]
            w_o = a.w_o.view(a.w_o.shape[0], a.n_heads, a.head_dim)          # [d, H, hd]
            y = torch.einsum("bhkx,dhx->bkhd", o, w_o)
            return _scaled(y, spec.ls1).norm(dim=-1)                         # [B, K, H]
        hidden = mlp_hidden(spec.mlp, h)
        if comp == "mlp_tokens":
            return spec.mlp_out(F.linear(hidden, spec.mlp.w_out)).norm(dim=-1)
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
    the squared norm of the final hidden states; or ``loss(output)`` given to the constructor. \
A ceiling for analysis, not counted."""

    name = "taylor"
    components = LAYER_COMPONENTS + GATED_COMPONENTS
    kinds = ("lm", "vit")  # before_forward runs em.model on the ElasticModel's input: not ElasticLlava's
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
            self.tables[(i, comp)] = (t.reshape(-1, t.shape[-1]) if comp in PARAM_COMPONENTS + GATED_COMPONENTS
                                      else t.reshape(-1))

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
