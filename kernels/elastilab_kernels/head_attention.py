"""Head-routed attention grouped by head (torch; autograd-safe): a drop-in for
``RoutedAttention._per_head``, which loops over batch rows x heads (B*H tiny launches per layer).

Here the loop is over heads only. For head h, the tokens of every batch row that chose h are
gathered into a [B, M_h] padded layout (M_h = the largest count over rows), so the q projection,
RoPE, attention and o projection of that head run as one batched call each. Padding slots get a
zero gate and an all-true mask row (no NaN), so they add exactly 0. Only the chosen (token, head)
pairs are computed, up to the padding, which only batch rows of unequal counts cause (a head
chosen by few tokens costs little whatever the other heads do).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def head_routed_attention(w, h: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, rope,
                          heads: tuple[Tensor, Tensor]) -> Tensor:
    """h [B, K, d] chosen tokens; k, v [B, Hkv, S, hd] (RoPE applied); allowed [B, K, S] bool or None;
    rope (cos, sin) [B, K, hd] or None; heads = (ids [B, K, kh] int64, gates [B, K, kh]).
    Returns [B, K, d]: sum over each token's chosen heads of gate * o_proj_slice(attention)."""
    ids, gates = heads
    B, K, d = h.shape
    H, hd = w.n_heads, w.head_dim
    group = H // w.n_kv_heads
    chosen = torch.zeros(B, K, H, dtype=torch.bool, device=h.device).scatter_(-1, ids, True)
    gate_all = torch.zeros(B, K, H, dtype=gates.dtype, device=h.device).scatter_add(-1, ids, gates)
    counts = chosen.sum(1)                                             # [B, H]
    widths = counts.max(0).values.tolist()                              # M_h, one host sync per layer
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)  # chosen tokens first, per head
    out = h.new_zeros(B * K, d)
    base = (torch.arange(B, device=h.device) * K)[:, None]
    # row lookups on flattened [B*K, ...] tensors (index_select): much faster than gather with an
    # expanded index, and rope / mask views are materialised once per layer, not once per head
    flat = lambda t: None if t is None else t.reshape(B * K, *t.shape[2:])
    h_f, allowed_f, gate_f = flat(h), flat(allowed), flat(gate_all)
    rope_f = None if rope is None else (flat(rope[0]), flat(rope[1]))
    for head, M in enumerate(widths):
        if M == 0:
            continue
        rows = (order[:, :M, head] + base).reshape(-1)                  # [B*M] flat token ids
        valid = torch.arange(M, device=h.device)[None] < counts[:, head, None]
        take = lambda t: t.index_select(0, rows).view(B, M, *t.shape[1:])
        sl = slice(head * hd, (head + 1) * hd)
        q = F.linear(take(h_f), w.w_q[sl], None if w.b_q is None else w.b_q[sl])[:, None]  # [B, 1, M, hd]
        q = w.heads(q, "q", None if rope_f is None else (take(rope_f[0]), take(rope_f[1])))
        mask = None
        if allowed_f is not None:
            mask = (take(allowed_f) | ~valid[..., None])[:, None]       # padding rows see every key
        g = head // group
        o = w.attend(q, k[:, g:g + 1], v[:, g:g + 1], mask)[:, 0]
        gate = take(gate_f[:, head]) * valid                            # 0 for padding slots
        y = F.linear(o * gate[..., None].to(o.dtype), w.w_o[:, sl])      # [B, M, d]
        # rows are distinct within a head (padding slots add 0): read-add-copy, no index_add (see reference.py)
        out.index_copy_(0, rows, out.index_select(0, rows) + y.reshape(B * M, d))
    out = out.view(B, K, d)
    return out if w.b_o is None else out + w.b_o


def head_attention_gather(w, h: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, rope,
                          heads: tuple[Tensor, Tensor]) -> Tensor:
    """The decode path of head routing (a few rows; shapes as in ``head_routed_attention``): every row
    is its own attention problem over its batch row's cached keys, so each row projects its kh chosen
    query heads in one sampled matmul (only those rows of w_q are read), attends to their key/value
    groups in one call, and sums its heads' o_proj slices in one gather-sum over ``w.w_o_t``, the
    contiguous transpose of w_o (rows = head dims). No loop over heads; the cache stays whole."""
    from .reference import gather_dot, gather_sum
    ids, gates = heads
    B, K, d = h.shape
    kh, hd, n = ids.shape[-1], w.head_dim, B * K
    if n == 0:  # token routing left no query in this step
        return h.new_zeros(B, K, d) if w.b_o is None else h.new_zeros(B, K, d) + w.b_o
    ids, order = ids.reshape(n, kh).sort(-1)  # sorted heads: their weight rows are read in order
    gates = gates.reshape(n, kh).gather(1, order)
    dims = (ids[..., None] * hd + torch.arange(hd, device=h.device)).reshape(n, kh * hd)  # rows of w_q, w_o_t
    q = gather_dot(h.reshape(n, d), w.w_q, dims)
    if w.b_q is not None:
        q = q + w.b_q[dims]
    q = q.view(n, kh, 1, hd)
    q = w.heads(q, "q", None if rope is None else tuple(r.reshape(n, 1, r.shape[-1]) for r in rope))  # partial rotary
    batch = torch.arange(B, device=h.device).repeat_interleave(K)[:, None]
    groups = ids // (w.n_heads // w.n_kv_heads)
    mask = None if allowed is None else allowed.reshape(n, 1, 1, allowed.shape[-1])
    o = w.attend(q, k[batch, groups], v[batch, groups], mask)  # [n, kh, 1, hd]
    y = gather_sum((o[:, :, 0] * gates[..., None].to(o.dtype)).reshape(n, kh * hd), w.w_o_t, dims)
    y = y.view(B, K, d)
    return y if w.b_o is None else y + w.b_o
