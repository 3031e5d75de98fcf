"""The MLP the kernels compute, in plain torch: its weights (views of a model's MLP) and the dense and
expert-sliced forward passes every routed path and kernel reduces to.

An MLP's output is a sum over its hidden units, so any subset of units (a token's kept units, an
expert's slice) is computed exactly by the same formulas restricted to those rows of the weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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

    def to(self, dtype: torch.dtype | None = None, device=None) -> "MLPWeights":
        """A copy with every weight and bias converted (``Tensor.to``; the originals are untouched). The
        kernels take one dtype for the weights and the activations, e.g. ``w.to(torch.bfloat16)``."""
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: t.to(device=device, dtype=dtype)
                                            for k, t in tensors.items() if torch.is_tensor(t)})

    def permuted(self, order: Tensor) -> "MLPWeights":
        """The same function with hidden units reordered (used by clustered experts)."""
        return MLPWeights(
            self.kind, self.act, self.w_in[order], self.w_out[:, order],
            None if self.w_gate is None else self.w_gate[order],
            None if self.b_in is None else self.b_in[order], self.b_out,
            None if self.b_gate is None else self.b_gate[order],
        )


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
