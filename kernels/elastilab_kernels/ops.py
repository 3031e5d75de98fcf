"""Public routed-MLP ops with a backend switch (forward only: the Triton path has no autograd).

``backend``: ``"auto"`` -> Triton when the tensors are on CUDA and no gradient is needed, else
torch; ``"torch"`` -> the torch paths of reference.py (autograd: training uses them); ``"triton"`` -> the
kernels, on CPU only under the Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels
are first used), refused when autograd would need a graph (the gate's straight-through gradient).
``LAUNCHES`` counts kernel launches, so callers and tests can check the kernel really ran.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import mlp
from .mlp import MLPWeights
from .reference import expert_mlp_sorted, routed_mlp_residual_reference, unit_mlp_sparse

LAUNCHES = 0
BACKENDS = ("auto", "triton", "torch")


def _triton():
    """Import the kernels lazily: the interpreter switch is read when they are defined."""
    from . import mlp_triton
    return mlp_triton


def _launch(*args, **kwargs) -> Tensor:
    """``mlp_triton.routed_mlp``: its up and down kernels, counted here (mlp_triton does not import ops)."""
    global LAUNCHES
    out = _triton().routed_mlp(*args, **kwargs)
    LAUNCHES += 2
    return out


def _use_triton(backend: str, t: Tensor, *inputs) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    needs_grad = torch.is_grad_enabled() and any(
        a is not None and a.requires_grad for a in inputs if isinstance(a, Tensor))
    if backend == "torch" or (backend == "auto" and (not t.is_cuda or needs_grad)):
        return False
    if needs_grad:
        raise RuntimeError("backend='triton' is forward only (no autograd) but an input requires grad; "
                           "use backend='torch' for training or run under torch.no_grad()")
    if not t.is_cuda and not _triton().INTERPRET:
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "elastilab_kernels.mlp_triton is first imported "
            f"(now TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})")
    return True


def _kernels_take(w: MLPWeights, backend: str) -> bool:
    """The Triton kernels have no gate bias (Llama with mlp_bias=True): such MLPs run in torch."""
    if w.b_gate is None:
        return True
    if backend == "triton":
        raise ValueError("backend='triton' does not support an MLP gate bias (b_gate); use backend='auto' or 'torch'")
    return False


def _check_mlp(w: MLPWeights, h: Tensor):
    if w.kind not in ("swiglu", "gelu"):
        raise ValueError(f"unknown MLP kind {w.kind!r}; allowed: swiglu, gelu")
    if w.act not in mlp.ACTIVATIONS:
        raise ValueError(f"unknown activation {w.act!r}; allowed: {sorted(mlp.ACTIVATIONS)}")
    if w.kind == "swiglu" and w.w_gate is None:
        raise ValueError("swiglu MLP needs w_gate")
    if h.dim() != 2 or h.shape[1] != w.w_in.shape[1]:
        raise ValueError(f"h must be [rows, d={w.w_in.shape[1]}], got {tuple(h.shape)}")
    for name in ("w_in", "w_out", "w_gate", "b_in", "b_out", "b_gate", "w_out_t"):
        t = getattr(w, name)
        if t is not None and (t.dtype != h.dtype or t.device != h.device):
            raise ValueError(f"MLP {name} is {t.dtype} on {t.device}; it must match h ({h.dtype} on {h.device})")


def routed_mlp_residual(x: Tensor, h: Tensor, idx: Tensor, w: MLPWeights, gate: Tensor | None = None,
                        backend: str = "auto") -> Tensor:
    """Token-routed MLP with residual: out = x; out[idx] = x[idx] + gate[:, None] * mlp(h[idx]).

    x [N, d] residual stream, h [N, d] normed MLP input, idx [n] int64 *distinct* chosen rows,
    gate [n] or None (= 1). The mlp includes b_out. Returns a new tensor (x is not modified).
    Triton: gather-GEMM over h[idx] -> activation -> GEMM whose epilogue adds b_out, gate and the
    residual and writes row idx[m] once. Forward only; training uses ``backend="torch"``.
    """
    if x.shape != h.shape:
        raise ValueError(f"x and h must have the same shape [N, d], got {tuple(x.shape)} and {tuple(h.shape)}")
    _check_mlp(w, h)
    if idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError(f"idx must be a 1-D int64 tensor of row ids, got {idx.dtype} {tuple(idx.shape)}")
    if gate is not None and gate.shape != idx.shape:
        raise ValueError(f"gate must have shape {tuple(idx.shape)} (one per chosen row), got {tuple(gate.shape)}")
    if not (_use_triton(backend, x, x, h, gate, *vars(w).values()) and _kernels_take(w, backend)):
        return routed_mlp_residual_reference(x, h, idx, w, gate)
    out = x.clone()
    if idx.numel() == 0:
        return out
    if int(idx.min()) < 0 or int(idx.max()) >= x.shape[0]:
        raise ValueError(f"idx values must lie in [0, {x.shape[0]}), got [{int(idx.min())}, {int(idx.max())}]")
    if torch.unique(idx).numel() != idx.numel():  # each chosen row is written once, without atomics
        raise ValueError("idx must hold distinct row ids (the kernel writes each chosen row once)")
    return _launch(h, idx.contiguous(), idx.contiguous(), w, width=w.width, gate=gate, residual=x,
                   out=out, add_b_out=True)


def expert_mlp(h: Tensor, experts: Tensor, gates: Tensor, w: MLPWeights, n_experts: int,
               backend: str = "auto") -> Tensor:
    """MLP where each row of h [n, d] computes only its k chosen expert slices; returns y [n, d].

    Expert e = hidden units [e*F/E, (e+1)*F/E). experts [n, k] int64, gates [n, k]. Equals
    ``mlp.mlp_experts_forward``. Triton: (row, slot) pairs sorted by expert into BLOCK_M-padded
    groups; up and down GEMMs per group write each pair's gated output to its own row of an
    [n*k, d] buffer (no atomics: deterministic, fine for fp16/bf16), summed over k here, + b_out
    once. Forward only; training uses ``backend="torch"``.
    """
    _check_mlp(w, h)
    if n_experts < 1 or w.width % n_experts:
        raise ValueError(f"n_experts must divide the MLP width {w.width}, got {n_experts}")
    if experts.dim() != 2 or experts.shape[0] != h.shape[0] or experts.dtype != torch.int64:
        raise ValueError(f"experts must be int64 [n={h.shape[0]}, k], got {experts.dtype} {tuple(experts.shape)}")
    if gates.shape != experts.shape:
        raise ValueError(f"gates must have the shape of experts {tuple(experts.shape)}, got {tuple(gates.shape)}")
    if not (_use_triton(backend, h, h, gates, *vars(w).values()) and _kernels_take(w, backend)):
        return expert_mlp_sorted(w, h, experts, gates, n_experts)
    n, k = experts.shape
    d = h.shape[1]
    if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= n_experts):
        raise ValueError(f"expert ids must lie in [0, {n_experts}), got [{int(experts.min())}, {int(experts.max())}]")
    y = h.new_zeros(n, d)
    if experts.numel():
        sorted_pairs, block_expert = _triton().align_by_expert(experts, n_experts)
        valid = sorted_pairs >= 0
        rows = torch.where(valid, sorted_pairs // k, -1)
        gates_sorted = torch.where(valid, gates.reshape(-1)[sorted_pairs.clamp(min=0)], 0).contiguous()
        pairs_out = h.new_empty(n * k, d)
        _launch(h, rows, sorted_pairs, w, block_expert=block_expert, width=w.width // n_experts,
                gate=gates_sorted, out=pairs_out, add_b_out=False)
        y = pairs_out.view(n, k, d).sum(1, dtype=torch.float32).to(h.dtype)
    if w.b_out is not None:
        y = y + w.b_out
    return y


def unit_up_is_whole(w: MLPWeights, h: Tensor, backend: str = "auto") -> bool:
    """Whether ``unit_mlp`` computes the whole up projection for the rows h: the torch path of a decode step
    (``reference.unit_mlp_sparse``: on a CPU the sampled product over the chosen units is the slower one)."""
    return w.kind == "swiglu" and w.w_out_t is not None and not _use_triton(backend, h, h, *vars(w).values())


def unit_mlp(h: Tensor, gate: Tensor, units: Tensor, w: MLPWeights, backend: str = "auto") -> Tensor:
    """MLP where each row of h [n, d] computes only its k chosen hidden units (units [n, k] int64),
    given its activated gate [n, F] (``mlp.mlp_gate``); returns y [n, d], b_out included.
    Triton (``unit_triton``: gather-GEMV kernels reading only the chosen units' rows): forced by
    "triton", or under "auto" on CUDA for a decode step (``w.w_out_t`` set by the block). Otherwise torch:
    the sampled / sparse products of ``reference.unit_mlp_sparse``."""
    global LAUNCHES
    _check_mlp(w, h)
    if gate.shape != (h.shape[0], w.width):
        raise ValueError(f"gate must be [n={h.shape[0]}, F={w.width}], got {tuple(gate.shape)}")
    if units.dim() != 2 or units.shape[0] != h.shape[0] or units.dtype != torch.int64:
        raise ValueError(f"units must be int64 [n={h.shape[0]}, k], got {units.dtype} {tuple(units.shape)}")
    triton_ok = _use_triton(backend, h, h, gate, *vars(w).values())
    if not triton_ok or (backend == "auto" and w.w_out_t is None):  # many rows on CUDA: batched products
        return unit_mlp_sparse(w, h, gate, units)
    from . import unit_triton
    w_out_t = w.w_out_t if w.w_out_t is not None else w.w_out.t().contiguous()
    if w.kind == "swiglu" and w.w_in.stride(1) != 1:
        w = MLPWeights(**{**vars(w), "w_in": w.w_in.contiguous()})
    LAUNCHES += 2
    return unit_triton.unit_mlp(w, h, gate, units.sort(-1).values, w_out_t)
