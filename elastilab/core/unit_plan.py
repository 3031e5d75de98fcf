"""mlp_units chosen *before* the gate projection: a scorer hands the MLP a ``UnitPlan`` (which units each
row computes, and their hidden values when the scorer computed them already), and the MLP runs only
those units' projections, not the whole gate as the gate-chosen path (``RoutedMLP``, CATS) does.
The scorers that make plans live in ``elastilab.scorers.unit_choice``."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from elastilab.core.spec import ACTIVATIONS, MLPWeights
from elastilab_kernels.reference import gather_dot, gather_sum


@dataclass
class UnitPlan:
    """units [n, k] int64: each row's chosen hidden units. hidden [n, k] or None: their exact hidden
    values (act(gate) * up, or act(in) for GELU), if the scorer computed them while choosing; then the
    MLP runs only the down projection. scoring_flops: the choosing work (its analytic FLOP count)."""

    units: Tensor
    hidden: Tensor | None = None
    scoring_flops: int = 0

    def mlp_mats(self, w: MLPWeights) -> int:
        """Projections the MLP runs for each chosen unit (for the analytic FLOP count)."""
        if self.hidden is not None:
            return 1
        return 3 if w.kind == "swiglu" else 2


def pre_gate_weights(w: MLPWeights) -> tuple[Tensor, Tensor | None]:
    """The projection whose activation gates each unit: w_gate of a SwiGLU MLP, w_in of a GELU one."""
    if w.kind == "swiglu":
        return w.w_gate, w.b_gate
    if w.kind == "gelu":
        return w.w_in, w.b_in
    raise ValueError(f"unknown MLP kind {w.kind!r}; allowed: swiglu, gelu")


def exact_hidden(w: MLPWeights, h: Tensor, units: Tensor) -> Tensor:
    """Hidden values [n, k] of the given units (units [n, k], sorted within each row) of rows h [n, d]:
    only their rows of the gate (and up) projection are read, 2 * n * k * d FLOPs per projection."""
    wg, bg = pre_gate_weights(w)
    g = gather_dot(h, wg, units)
    if bg is not None:
        g = g + bg[units]
    hidden = ACTIVATIONS[w.act](g)
    if w.kind == "swiglu":
        up = gather_dot(h, w.w_in, units)
        hidden = hidden * (up if w.b_in is None else up + w.b_in[units])
    return hidden


def unit_mlp_planned(w: MLPWeights, h: Tensor, plan: UnitPlan) -> Tensor:
    """The MLP of rows h [n, d] over each row's planned units only: y [n, d], b_out included."""
    units, hidden = plan.units, plan.hidden
    n, k = units.shape
    if n == 0:
        out = h.new_zeros(0, w.w_out.shape[0])
        return out if w.b_out is None else out + w.b_out
    units, order = units.sort(-1)  # the CSR paths want each row's columns in order
    hidden = exact_hidden(w, h, units) if hidden is None else hidden.gather(1, order)
    if w.w_out_t is not None:  # decoding: read only the chosen rows of the unit-major copy
        out = gather_sum(hidden, w.w_out_t, units)
    else:
        crow = torch.arange(0, n * k + 1, k, device=h.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = torch.sparse_csr_tensor(crow, units.reshape(-1), hidden.reshape(-1).to(h.dtype),
                                          size=(n, w.width), check_invariants=False)
            out = torch.sparse.mm(csr, w.w_out.t())
    return out if w.b_out is None else out + w.b_out
