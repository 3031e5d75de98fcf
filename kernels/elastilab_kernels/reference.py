"""Torch paths of the kernels (also used for training: they have autograd).

No ``index_add`` here: on a CPU shared with other processes, torch's ``index_add`` with 2 threads
took ~130 ms for a [4096, 576] update that takes 1.6 ms on one thread (measured on this machine,
torch 2.14: its parallel scatter path waits for the second core). The chosen rows are distinct, so
a read-add-``index_copy`` gives the same result (per expert, for the expert MLP).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import mlp
from .mlp import MLPWeights


def routed_mlp_residual_reference(x: Tensor, h: Tensor, idx: Tensor, w: MLPWeights,
                                  gate: Tensor | None = None) -> Tensor:
    """out = x, except out[idx] = x[idx] + gate[:, None] * mlp(h[idx]) (mlp includes b_out); idx distinct."""
    y = mlp.mlp_forward(w, h.index_select(0, idx))
    if gate is not None:
        y = gate[:, None].to(y.dtype) * y
    return x.index_copy(0, idx, x.index_select(0, idx) + y.to(x.dtype))


# kernel 2's reference is mlp.mlp_experts_forward itself
expert_mlp_reference = mlp.mlp_experts_forward


def expert_mlp_sorted(w: MLPWeights, h: Tensor, experts: Tensor, gates: Tensor, n_experts: int) -> Tensor:
    """Same value as ``mlp.mlp_experts_forward``, in fewer and cheaper ops (the torch backend of
    ``ops.expert_mlp``): the n*k (row, slot) pairs are sorted by expert; each expert gathers its
    rows, runs its slice of the MLP on them, and adds its gated output into those rows in place
    (rows are distinct within an expert: read-add-``index_copy``, no index_add, deterministic).
    ``elastilab bench mlp`` (SmolLM2 dims, 4096 rows, k = 4 of 8): 83 ms vs 141 ms for the dense MLP
    (benchmarks/results/mlp_cpu.csv, 85% of the ideal 2x); concatenating the expert outputs and summing
    them through the inverse permutation instead (before commit 81fef33) realised 65% in that bench."""
    n, k = experts.shape
    size = w.width // n_experts
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    rows_by_slot, gate_by_slot = order // k, gates.reshape(-1).index_select(0, order)
    out = h.new_zeros(n, w.w_out.shape[0])
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows = rows_by_slot[start:start + count]
            y = mlp.mlp_forward(w.unit_slice(e * size, (e + 1) * size), h.index_select(0, rows), add_bias_out=False)
            y = y * gate_by_slot[start:start + count, None].to(y.dtype)
            out.index_copy_(0, rows, out.index_select(0, rows) + y.to(out.dtype))
        start += count
    return out if w.b_out is None else out + w.b_out


def gather_dot(h: Tensor, w: Tensor, idx: Tensor) -> Tensor:
    """[n, k]: row idx[r, j] of w [N, d] dotted with h[r] (idx sorted within each row), reading only
    those rows: a sampled dense-dense matmul over the CSR pattern of idx, 2 * n * k * d FLOPs."""
    n, k = idx.shape
    crow = torch.arange(0, n * k + 1, k, device=h.device)
    with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), h.new_zeros(n * k), size=(n, w.shape[0]),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, h, w.t(), beta=0.0).values().view(n, k)


def gather_sum(weights: Tensor, w_t: Tensor, idx: Tensor) -> Tensor:
    """[n, d]: sum over j of weights[r, j] * w_t[idx[r, j]], w_t [N, d] unit-major (a contiguous
    transposed copy of a down projection): one fused gather-sum that reads only the chosen rows
    (``embedding_bag``), 2 * n * k * d FLOPs (``compute`` counts them)."""
    return F.embedding_bag(idx, w_t, per_sample_weights=weights.to(w_t.dtype), mode="sum")


def unit_mlp_sparse(w: MLPWeights, h: Tensor, gate: Tensor, units: Tensor) -> Tensor:
    """Each row of h [n, d] computes only its k chosen hidden units (units [n, k] int64), given the
    activated gate [n, F] it was chosen from (``mlp.mlp_gate``, computed once: CATS reuses it).
    SwiGLU: the up projection and the down projection run for the chosen units only; GELU: the gate
    *is* the hidden unit, so only the down projection is saved. Up: ``gather_dot`` (a decode step: the whole
    projection, ``ops.unit_up_is_whole``). Down: with ``w.w_out_t`` (the unit-major copy the decode path keeps),
    ``gather_sum``; else a sparse x dense
    matmul over the same CSR pattern, which pays for many rows (prefill) but reads ``w_out`` with a
    stride. 2 * n * k * d FLOPs each. On this CPU, at k = F/2 and 4096 rows, the sparse path runs at
    0.39x the dense MLP's speed (``elastilab bench mlp``); gathering each row's weight rows instead
    was about 28x slower than dense."""
    n, k = units.shape
    if w.w_out_t is not None:
        # a decode step: the whole up projection, the chosen units gathered from it. Measured decoding SmolLM2-135M
        # on this CPU (batch 1, one thread, torch profiler): the sampled product over 3/4 of the units took longer
        # than the dense GEMV over all of them (0.53 vs 0.49 ms a layer) and needs sorted units (0.14 ms); the whole
        # up projection made the step at mlp_units=0.75 about 10% faster (0.78x -> 0.86x of the dense model's
        # speed). The down projection's gather-sum pays (0.40 vs 0.49 ms for the dense GEMV), so it stays.
        hidden = gate.gather(1, units)
        if w.kind == "swiglu":
            hidden = hidden * F.linear(h, w.w_in, w.b_in).gather(1, units)
        out = gather_sum(hidden, w.w_out_t, units)
        return out if w.b_out is None else out + w.b_out
    units = units.sort(-1).values  # CSR wants each row's columns in order; sorted rows are read in order
    hidden = gate.gather(1, units)
    if w.kind == "swiglu":
        up = gather_dot(h, w.w_in, units)
        hidden = hidden * (up if w.b_in is None else up + w.b_in[units])
    crow = torch.arange(0, n * k + 1, k, device=h.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = torch.sparse_csr_tensor(crow, units.reshape(-1), hidden.reshape(-1), size=(n, w.width),
                                      check_invariants=False)
        out = torch.sparse.mm(csr, w.w_out.t())
    return out if w.b_out is None else out + w.b_out


def head_attention_reference(w, h: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, rope,
                             heads: tuple[Tensor, Tensor]) -> Tensor:
    """The plain definition of head-routed attention (oracle of kernels/head_attention.py): for each
    batch row and head, the tokens that chose the head compute its query, attention and o_proj slice,
    scaled by their gate. Shapes as in ``head_routed_attention``."""
    ids, gates = heads
    B, K, _ = h.shape
    hd, group = w.head_dim, w.n_heads // w.n_kv_heads
    out = h.new_zeros(B, K, w.w_o.shape[0])
    for b in range(B):
        for head in range(w.n_heads):
            hit = ids[b] == head  # [K, kh]
            rows = hit.any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            sl = slice(head * hd, (head + 1) * hd)
            q = F.linear(h[b, rows], w.w_q[sl], None if w.b_q is None else w.b_q[sl])[None, None]
            q = w.heads(q, "q", None if rope is None else (rope[0][b:b + 1, rows], rope[1][b:b + 1, rows]))
            g = head // group
            mask = None if allowed is None else allowed[b:b + 1, rows][:, None]
            o = w.attend(q, k[b:b + 1, g:g + 1], v[b:b + 1, g:g + 1], mask)[0, 0]
            gate = (gates[b, rows] * hit[rows]).sum(-1, keepdim=True)
            y = F.linear(o * gate, w.w_o[:, sl])
            out[b] = out[b].index_copy(0, rows, out[b].index_select(0, rows) + y)  # rows distinct
    return out if w.b_o is None else out + w.b_o
