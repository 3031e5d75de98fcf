"""Triton gather-GEMV kernels for the decode path of mlp_units (forward only; use ``ops.unit_mlp``).

Decoding is memory-bound: a token that keeps k of F hidden units need only *read* k rows of the up
projection and k rows of the down projection (TEAL's idea, here with the units chosen per token by the
gate, CATS-style). Two kernels, one program per (row, block):

* ``_unit_up_kernel``: for row r and a block of its chosen units u, hidden[r, j] = gate[r, u_j] *
  (w_in[u_j] . h[r] + b_in[u_j]) for SwiGLU (reads only rows u_j of w_in, each contiguous), or
  hidden[r, j] = gate[r, u_j] for GELU (the gate is the hidden unit).
* ``_unit_down_kernel``: out[r, n-block] = sum_j hidden[r, j] * w_out_t[u_j, n-block] + b_out, w_out_t
  the unit-major [F, d] copy of w_out (rows contiguous, so a program reads whole row segments).

Interpreted (``TRITON_INTERPRET=1`` before ``mlp_triton`` is imported): operands upcast to fp32, as there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mlp_triton import INTERPRET

BLOCK_U = 64   # units per program of the up kernel
BLOCK_D = 64   # model dims per inner step (up) / per program (down)


@triton.jit
def _unit_up_kernel(h_ptr, gate_ptr, units_ptr, w_in_ptr, b_in_ptr, hidden_ptr, K, D,
                    s_h, s_g, s_u, s_w, s_o,
                    SWIGLU: tl.constexpr, HAS_B_IN: tl.constexpr, BU: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0)
    offs_u = tl.program_id(1) * BU + tl.arange(0, BU)
    u_ok = offs_u < K
    units = tl.load(units_ptr + r * s_u + offs_u, mask=u_ok, other=0)
    hidden = tl.load(gate_ptr + r * s_g + units, mask=u_ok, other=0.0).to(tl.float32)
    if SWIGLU:
        acc = tl.zeros((BU,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            d_ok = offs_d < D
            hb = tl.load(h_ptr + r * s_h + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            wb = tl.load(w_in_ptr + units[:, None] * s_w + offs_d[None, :], mask=u_ok[:, None] & d_ok[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(wb * hb[None, :], axis=1)
        if HAS_B_IN:
            acc += tl.load(b_in_ptr + units, mask=u_ok, other=0.0).to(tl.float32)
        hidden = hidden * acc
    tl.store(hidden_ptr + r * s_o + offs_u, hidden, mask=u_ok)


@triton.jit
def _unit_down_kernel(hidden_ptr, units_ptr, w_t_ptr, b_out_ptr, out_ptr, K, D,
                      s_hid, s_u, s_w, s_o,
                      HAS_B_OUT: tl.constexpr, BU: tl.constexpr, BN: tl.constexpr):
    r = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < D
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j0 in range(0, K, BU):
        offs_j = j0 + tl.arange(0, BU)
        j_ok = offs_j < K
        units = tl.load(units_ptr + r * s_u + offs_j, mask=j_ok, other=0)
        hv = tl.load(hidden_ptr + r * s_hid + offs_j, mask=j_ok, other=0.0)
        wb = tl.load(w_t_ptr + units[:, None] * s_w + offs_n[None, :], mask=j_ok[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(hv[:, None] * wb, axis=0)
    if HAS_B_OUT:
        acc += tl.load(b_out_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * s_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def unit_mlp(w, h: torch.Tensor, gate: torch.Tensor, units: torch.Tensor, w_out_t: torch.Tensor) -> torch.Tensor:
    """y [n, d] of the MLP computing each row's units only (units [n, k], sorted per row for locality);
    two launches. ``w`` is the block's MLPWeights, ``w_out_t`` its unit-major [F, d] down projection."""
    n, k = units.shape
    D = h.shape[1]
    h, gate, units = h.contiguous(), gate.contiguous(), units.contiguous()
    hidden = torch.empty(n, k, device=h.device, dtype=torch.float32)  # fp32 between the kernels
    out = torch.empty(n, w_out_t.shape[1], device=h.device, dtype=h.dtype)
    if n == 0:
        return out
    b_in = w.b_in if w.b_in is not None else hidden  # placeholder pointer (never read: constexpr flag)
    _unit_up_kernel[(n, triton.cdiv(k, BLOCK_U))](
        h, gate, units, w.w_in, b_in, hidden, k, D, h.stride(0), gate.stride(0), units.stride(0),
        w.w_in.stride(0), hidden.stride(0),
        SWIGLU=w.kind == "swiglu", HAS_B_IN=w.b_in is not None, BU=BLOCK_U, BD=BLOCK_D)
    b_out = w.b_out if w.b_out is not None else out
    _unit_down_kernel[(n, triton.cdiv(w_out_t.shape[1], BLOCK_D))](
        hidden, units, w_out_t, b_out, out, k, w_out_t.shape[1], hidden.stride(0), units.stride(0),
        w_out_t.stride(0), out.stride(0), HAS_B_OUT=w.b_out is not None, BU=BLOCK_U, BN=BLOCK_D)
    return out


__all__ = ["unit_mlp", "INTERPRET"]
