"""Triton kernels for routed MLPs (forward only; training uses the torch path in reference.py).

Two generic kernels serve both public ops (see ops.py):

* ``_up_kernel``: gather-GEMM. Slot m reads row ``rows[m]`` of h (slot skipped when < 0) and
  computes the activated hidden units [e*FW, (e+1)*FW) of the MLP, e being the block's expert
  (0 when not grouped): swiglu ``act(h@Wg^T) * (h@Wu^T + b_in)``, gelu ``act(h@W1^T + b1)``.
  Result goes to ``a[m, :FW]`` (slot order, input dtype).
* ``_down_kernel``: ``a @ W_out[:, e*FW:(e+1)*FW]^T`` with an epilogue that adds b_out, multiplies
  by the slot's gate, adds the residual row ``res[dst[m]]`` and stores to ``out[dst[m]]``.
  Destinations are distinct, so every row is written once (no atomics).

``TRITON_INTERPRET=1`` must be set before this module is imported to run on CPU; whether it was is
recorded in ``INTERPRET``. Interpreted: fixed 64-blocks, operands upcast to fp32 (the interpreter's
bf16 dot is wrong). On CUDA: a small autotune over BF/BK/BN (BM is fixed by the host because
expert blocks are padded to it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)
ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}
BLOCK_M = 64  # slots per program; expert groups are padded to a multiple of it
_FIXED_UP = dict(BF=64, BK=64)
_FIXED_DOWN = dict(BN=64, BK=64)


@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == 0:  # silu
        out = z * tl.sigmoid(z)
    elif ACT == 1:  # exact gelu
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:  # tanh gelu; tanh(u) = 2*sigmoid(2u) - 1 keeps to portable tl ops
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = z * tl.sigmoid(2.0 * u)  # = 0.5 * z * (1 + tanh(u))
    else:  # quick gelu (OpenAI CLIP)
        out = z * tl.sigmoid(1.702 * z)
    return out


@triton.jit
def _round_bf16(v, FIX: tl.constexpr):
    # the interpreter truncates fp32 -> bf16; round to nearest even by hand first (GPU casts already do)
    if FIX:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _up_kernel(h_ptr, rows_ptr, block_expert_ptr, w_in_ptr, w_gate_ptr, b_in_ptr, a_ptr,
               M, D, FW,
               s_hm, s_hd, s_wf, s_wd, s_gf, s_gd, s_am, s_af,
               GROUPED: tl.constexpr, SWIGLU: tl.constexpr, HAS_B_IN: tl.constexpr, ACT: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr, FIX_BF16: tl.constexpr,
               BM: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    e = 0
    if GROUPED:
        e = tl.load(block_expert_ptr + pid_m)
        if e < 0:  # unused padding block
            return
    offs_m = pid_m * BM + tl.arange(0, BM)
    rows = tl.load(rows_ptr + offs_m, mask=offs_m < M, other=-1)
    valid = rows >= 0
    rows = tl.where(valid, rows, 0)
    offs_f = pid_f * BF + tl.arange(0, BF)
    f_ok = offs_f < FW
    units = e * FW + offs_f  # absolute hidden-unit index in the full MLP
    offs_k = tl.arange(0, BK)
    acc_in = tl.zeros((BM, BF), dtype=tl.float32)
    acc_gate = tl.zeros((BM, BF), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + offs_k
        k_ok = k < D
        hb = tl.load(h_ptr + rows[:, None] * s_hm + k[None, :] * s_hd, mask=valid[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_in_ptr + units[None, :] * s_wf + k[:, None] * s_wd, mask=f_ok[None, :] & k_ok[:, None],
                     other=0.0)
        if UPCAST:
            hb = hb.to(tl.float32)
            wb = wb.to(tl.float32)
        acc_in = tl.dot(hb, wb, acc_in, input_precision=PREC)
        if SWIGLU:
            gb = tl.load(w_gate_ptr + units[None, :] * s_gf + k[:, None] * s_gd, mask=f_ok[None, :] & k_ok[:, None],
                         other=0.0)
            if UPCAST:
                gb = gb.to(tl.float32)
            acc_gate = tl.dot(hb, gb, acc_gate, input_precision=PREC)
    if HAS_B_IN:
        acc_in += tl.load(b_in_ptr + units, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        act = _activate(acc_gate, ACT) * acc_in
    else:
        act = _activate(acc_in, ACT)
    tl.store(a_ptr + offs_m[:, None] * s_am + offs_f[None, :] * s_af,
             _round_bf16(act, FIX_BF16).to(a_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & f_ok[None, :])


@triton.jit
def _down_kernel(a_ptr, dst_ptr, block_expert_ptr, w_out_ptr, b_out_ptr, gate_ptr, res_ptr, out_ptr,
                 M, D, FW,
                 s_am, s_af, s_wd, s_wf, s_rm, s_rd, s_om, s_od,
                 GROUPED: tl.constexpr, HAS_B_OUT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr, FIX_BF16: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = 0
    if GROUPED:
        e = tl.load(block_expert_ptr + pid_m)
        if e < 0:
            return
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    dst = tl.load(dst_ptr + offs_m, mask=m_ok, other=-1)
    valid = dst >= 0
    dst = tl.where(valid, dst, 0)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, FW, BK):
        k = k0 + offs_k
        k_ok = k < FW
        ab = tl.load(a_ptr + offs_m[:, None] * s_am + k[None, :] * s_af, mask=valid[:, None] & k_ok[None, :],
                     other=0.0)
        wb = tl.load(w_out_ptr + offs_n[None, :] * s_wd + (e * FW + k)[:, None] * s_wf,
                     mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            ab = ab.to(tl.float32)
            wb = wb.to(tl.float32)
        acc = tl.dot(ab, wb, acc, input_precision=PREC)
    if HAS_B_OUT:
        acc += tl.load(b_out_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        acc *= tl.load(gate_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    mask = valid[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + dst[:, None] * s_rm + offs_n[None, :] * s_rd, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + dst[:, None] * s_om + offs_n[None, :] * s_od,
             _round_bf16(acc, FIX_BF16).to(out_ptr.dtype.element_ty), mask=mask)


if not INTERPRET:  # autotune needs a GPU; BM stays fixed (host pads expert groups to it)
    _cfg = lambda **kw: triton.Config(kw, num_warps=4, num_stages=3)
    _up_kernel = triton.autotune([_cfg(BF=bf, BK=bk) for bf in (64, 128) for bk in (32, 64)],
                                 key=["D", "FW"])(_up_kernel)
    _down_kernel = triton.autotune([_cfg(BN=bn, BK=bk) for bn in (64, 128) for bk in (32, 64)],
                                   key=["D", "FW"])(_down_kernel)
    _FIXED_UP, _FIXED_DOWN = {}, {}


def _prec(dtype: torch.dtype) -> str:
    # follow torch's own fp32 matmul setting so fp32 results match the torch reference
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    # interpreter: bf16 dot is wrong, so always fp32; GPU: half types use their tensor cores
    return INTERPRET or dtype == torch.float32


def _fix_bf16(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def routed_mlp(h: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor, w, *, block_expert: torch.Tensor | None = None,
               width: int, gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
               out: torch.Tensor, add_b_out: bool) -> torch.Tensor:
    """Launch up + down (two kernels) for ``M = rows.numel()`` slots; writes ``out[dst[m]]`` for slots with dst >= 0.

    ``block_expert`` [M / BLOCK_M] int32 gives each block's expert (-1: skip); None means one expert
    spanning the first ``width`` hidden units. ``gate`` is indexed by slot.
    """
    M, D = rows.numel(), h.shape[1]
    grouped = block_expert is not None
    be = block_expert if grouped else rows  # any valid pointer; unused when not grouped
    n_blocks = triton.cdiv(M, BLOCK_M)
    a = torch.empty(M, width, device=h.device, dtype=h.dtype)
    up, prec = _upcast(h.dtype), _prec(h.dtype)
    dummy = a  # placeholder pointer for absent optional tensors (never read: constexpr flags)
    wg = w.w_gate if w.kind == "swiglu" else w.w_in
    _up_kernel[lambda meta: (n_blocks, triton.cdiv(width, meta["BF"]))](
        h, rows, be, w.w_in, wg, dummy if w.b_in is None else w.b_in, a,
        M, D, width,
        h.stride(0), h.stride(1), w.w_in.stride(0), w.w_in.stride(1), wg.stride(0), wg.stride(1),
        a.stride(0), a.stride(1),
        GROUPED=grouped, SWIGLU=w.kind == "swiglu", HAS_B_IN=w.b_in is not None, ACT=ACT_IDS[w.act],
        UPCAST=up, PREC=prec, FIX_BF16=_fix_bf16(a.dtype), BM=BLOCK_M, **_FIXED_UP)
    has_b_out = add_b_out and w.b_out is not None
    res = residual if residual is not None else out
    _down_kernel[lambda meta: (n_blocks, triton.cdiv(D, meta["BN"]))](
        a, dst, be, w.w_out, w.b_out if has_b_out else dummy, dummy if gate is None else gate, res, out,
        M, D, width,
        a.stride(0), a.stride(1), w.w_out.stride(0), w.w_out.stride(1), res.stride(0), res.stride(1),
        out.stride(0), out.stride(1),
        GROUPED=grouped, HAS_B_OUT=has_b_out, HAS_GATE=gate is not None, HAS_RES=residual is not None,
        UPCAST=up, PREC=prec, FIX_BF16=_fix_bf16(out.dtype), BM=BLOCK_M, **_FIXED_DOWN)
    return out


def align_by_expert(experts: torch.Tensor, n_experts: int, block: int = BLOCK_M):
    """Group the n*k (row, slot) pairs by expert, each group padded to a multiple of ``block``.

    Returns ``sorted_pairs`` [L] (pair id = row*k + slot, -1 for padding) and ``block_expert``
    [L/block] int32 (-1 for unused blocks). L is the upper bound (cdiv(P, block) + E) * block, so
    nothing here waits for the device (the vLLM moe_align_block_size idea, in torch ops).
    """
    flat = experts.reshape(-1)
    P, dev = flat.numel(), flat.device
    counts = torch.bincount(flat, minlength=n_experts)
    padded = (counts + block - 1) // block * block
    pad_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    rank = torch.arange(P, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    n_blocks = triton.cdiv(P, block) + n_experts
    sorted_pairs = torch.full((n_blocks * block,), -1, dtype=torch.int64, device=dev)
    sorted_pairs[(pad_end - padded)[sorted_e] + rank] = order
    block_ids = torch.arange(n_blocks, device=dev)
    block_expert = torch.searchsorted(pad_end // block, block_ids, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert
