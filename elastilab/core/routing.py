"""Selection and routed execution: gather the chosen rows, compute only them, scatter back.

Gradient to the routers. The forward pass uses the *hard* selection and multiplies each routed
output by a gate whose forward value is exactly 1.0: ``(p - p.detach()) + 1`` with p = sigmoid(score).
So capacity 1.0 reproduces the pretrained model bit for bit in value, while the backward pass sees
d gate / d score = sigmoid'(score): a straight-through estimator in the style of Mixture-of-Depths
(whose router weight scales the block output) without changing the forward value.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elastilab.core.spec import AttnWeights, BlockSpec, MLPWeights, mlp_forward, mlp_gate, mlp_hidden
from elastilab.core.unit_plan import UnitPlan, unit_mlp_planned
from elastilab_kernels import ops
from elastilab_kernels.head_attention import head_attention_gather, head_routed_attention

_FAR = torch.iinfo(torch.int64).max // 2  # key position of padding slots: never attended


def straight_through(scores: Tensor) -> Tensor:
    p = torch.sigmoid(scores)
    return (p - p.detach()) + 1.0


def n_kept(capacity: float, n: int) -> int:
    """Rows computed out of n at this capacity (at least one, exactly n at capacity 1)."""
    return min(n, max(1, math.ceil(capacity * n - 1e-9)))


#: at most this many rows (tokens of a decode step) take the gather paths, which read only the chosen
#: weight rows; more rows reuse each weight across rows in batched matmuls instead (prefill)
GATHER_ROWS = 8


def gathers(rows: int) -> bool:
    """Whether a routed forward over ``rows`` rows takes the decode gather paths (inference only)."""
    return rows <= GATHER_ROWS and not torch.is_grad_enabled()


#: running mode: a sequence's first tokens use the calibrated threshold, until it has this many scores
RUNNING_WARMUP = 16


def running_threshold(past: Tensor | None, scores: Tensor, capacity: float,
                      calibrated: float) -> tuple[Tensor, Tensor]:
    """Causal per-sequence thresholds [B, T] for new scores [B, T] after ``past`` [B, S] of the same
    sequence (None at its start): token t's bar is the (1 - capacity) quantile of the sequence's
    scores up to and including t, so the kept share follows the capacity on text whose scores sit
    higher or lower than the calibration text's; the first RUNNING_WARMUP tokens use ``calibrated``.
    Returns (thresholds, every score so far [B, S + T])."""
    seen = scores if past is None else torch.cat([past, scores], 1)
    T, S = scores.shape[1], seen.shape[1]
    upto = torch.arange(S - T, S, device=scores.device)[:, None]  # each new token's index in ``seen``
    prefix = torch.where(torch.arange(S, device=scores.device)[None] <= upto, seen[:, None, :].float(), float("nan"))
    q = torch.nanquantile(prefix, 1.0 - capacity, dim=-1) if T else scores.float()
    return torch.where(upto.squeeze(1) + 1 >= RUNNING_WARMUP, q, torch.full_like(q, calibrated)), seen


def select_tokens(scores: Tensor, capacity: float, threshold, n_protected: int = 0) -> Tensor:
    """keep [B, T] bool. Top-k per sequence when threshold is None, else score > threshold (a number,
    or one per unprotected token [B, T - n_protected]: the running mode).

    The first n_protected tokens (CLS, registers) are always kept and not counted in the top-k.
    """
    B, T = scores.shape
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[:, :n_protected] = True
    free = scores[:, n_protected:]
    if capacity >= 1.0 or free.shape[1] == 0:
        keep[:, n_protected:] = True
    elif threshold is None:
        k = n_kept(capacity, free.shape[1])
        keep[:, n_protected:].scatter_(1, free.topk(k, dim=1).indices, True)
    else:
        keep[:, n_protected:] = free > threshold
    return keep


def keep_to_index(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Kept positions in order, padded to the longest row: idx [B, K] and valid [B, K]."""
    counts = keep.sum(1)
    K = int(counts.max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]
    valid = torch.arange(K, device=keep.device)[None] < counts[:, None]
    return order, valid


def hard_gates(keep_or_ids: Tensor, scores: Tensor) -> Tensor:
    """Gates for every token / slot: 1 where chosen and 0 elsewhere in value, with the
    straight-through gradient d gate / d score = sigmoid' for all of them (training estimator)."""
    if keep_or_ids.dtype == torch.bool:
        hard = keep_or_ids.to(scores.dtype)
    else:
        hard = torch.zeros_like(scores).scatter_(-1, keep_or_ids, 1.0)
    p = torch.sigmoid(scores)
    return hard + (p - p.detach())


def choose_slots(scores: Tensor, capacity: float) -> tuple[Tensor, Tensor]:
    """Per-row top-k among n heads/experts: ids [..., k] and straight-through gates [..., k]."""
    k = n_kept(capacity, scores.shape[-1])
    top = scores.topk(k, dim=-1)
    return top.indices, straight_through(top.values)


class RoutedAttention(nn.Module):
    """Attention over a subset of tokens, optionally with a subset of query heads per token.

    Only the chosen tokens are projected and enter attention (as queries, keys and values; with
    ``keys`` given, as queries only, the ``keys`` rows offering keys and values: the "keep_kv"
    variant of ``ElasticConfig.attn_tokens_variant``), and a token computes only its chosen heads
    (q projection, scores, values and its slice of o_proj).
    With a KV cache, the original positions of the cached keys are remembered (with the cache) so that
    causal masks stay right when every layer caches a different subset of tokens.
    """

    # head routing, grouped by head (one batched call per head; kernels/head_attention.py). The
    # plain loop over rows x heads, kernels.reference.head_attention_reference, is its test oracle
    # (`elastilab bench speed --heads grouped loop` times both).
    head_attention = staticmethod(head_routed_attention)

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.last_keys = 0

    def forward(self, w: AttnWeights, h: Tensor, pos: Tensor, valid: Tensor, rope=None,
                pad_mask: Tensor | None = None, cache=None,
                heads: tuple[Tensor, Tensor] | None = None,
                keys: tuple[Tensor, Tensor, tuple | None] | None = None, start: int = 0) -> Tensor:
        """h [B, K, d] chosen rows; pos [B, K] their original positions; valid [B, K] (False = padding);
        rope: (cos, sin) gathered to [B, K, hd]; pad_mask [B, K, S_full] bool from the model's mask;
        heads: (ids [B, K, kh], gates [B, K, kh]); keys: (h_kv [B, S, d], pos_kv [B, S], rope_kv
        [B, S, hd] or None), the rows whose keys and values are computed and cached (all valid),
        when they are not the chosen rows themselves; start: tokens seen before this chunk. Returns [B, K, d]."""
        B, K, _ = h.shape
        hd = w.head_dim
        hk, rk = (h, rope) if keys is None else (keys[0], keys[2])
        S = hk.shape[1]
        k = F.linear(hk, w.w_k, w.b_k).view(B, S, w.n_kv_heads, hd).transpose(1, 2)
        v = F.linear(hk, w.w_v, w.b_v).view(B, S, w.n_kv_heads, hd).transpose(1, 2)
        k = w.heads(k, "k", rk)
        kpos = torch.where(valid, pos, torch.full_like(pos, _FAR)) if keys is None else keys[1]
        if cache is not None:
            past = self._cached_positions(cache, start)
            k, v = cache.update(k, v, self.layer_idx)
            kpos = kpos if past is None else torch.cat([past, kpos], 1)
            # remember the positions of the keys the cache holds: a sliding-window layer keeps its last ones only
            layer = cache.layers[self.layer_idx]
            layer.elastilab_positions = (kpos[:, max(0, kpos.shape[1] - layer.keys.shape[-2]):],
                                         cache.get_seq_length(self.layer_idx))
        self.last_keys = k.shape[2]
        allowed = self._allowed(w, pos, valid, kpos, pad_mask)
        if heads is None:
            q = w.heads(F.linear(h, w.w_q, w.b_q).view(B, K, w.n_heads, hd).transpose(1, 2), "q", rope)
            o = w.attend(q, k, v, None if allowed is None else allowed[:, None])
            return F.linear(o.transpose(1, 2).reshape(B, K, w.n_heads * hd), w.w_o, w.b_o)  # K may be 0
        if w.w_o_t is not None:  # a decode step (ElasticBlock set the copy): no loop over heads
            return head_attention_gather(w, h, k, v, allowed, rope, heads)
        return self.head_attention(w, h, k, v, allowed, rope, heads)

    def _cached_positions(self, cache, start: int) -> Tensor | None:
        """Original positions [B, held] of the keys this layer's cache holds (None: it holds none). They are
        kept with the cache (so they follow whichever cache is passed); keys cached by the pretrained layer
        itself (``routers_disabled``, ``ElasticConfig.prefill``) are every token before ``start``."""
        seen = cache.get_seq_length(self.layer_idx)
        if seen == 0:
            return None
        layer = cache.layers[self.layer_idx]
        positions, seen_then = getattr(layer, "elastilab_positions", (None, 0))
        if dense := seen - seen_then:  # cached since by the pretrained layer: the last `dense` tokens
            new = torch.arange(start - dense, start, device=layer.keys.device).expand(layer.keys.shape[0], dense)
            positions = new if positions is None else torch.cat([positions, new], 1)
        return positions[:, positions.shape[1] - layer.keys.shape[-2]:]

    @staticmethod
    def _allowed(w, pos, valid, kpos, pad_mask):
        if not w.causal and pad_mask is None and bool((kpos < _FAR).all()):
            return None  # plain full attention (padding queries, if any, are discarded): sdpa's fastest path
        if w.causal and pad_mask is None and pos.shape[1] == 1 and bool(valid.all()) \
                and int(kpos.max()) <= int(pos.min()) and (w.window is None or int(pos.max() - kpos.min()) < w.window):
            return None  # a decode step whose query may see every key held (none padding, none too far back)
        allowed = (kpos < _FAR)[:, None, :].expand(-1, pos.shape[1], -1)
        if (seen := w.visible(pos, kpos)) is not None:  # causal, within the sliding window
            allowed = allowed & seen
        if pad_mask is not None:
            cols = kpos.clamp(max=pad_mask.shape[-1] - 1)
            allowed = allowed & torch.gather(pad_mask, 2, cols[:, None, :].expand(-1, pos.shape[1], -1))
        # padding queries (outputs discarded) must still see one key, or softmax gives NaN
        return allowed | ~valid[:, :, None]


def estimator_attention(w: AttnWeights, h: Tensor, pos: Tensor, rope, key_idx: Tensor | None,
                        head_gates: Tensor | None) -> Tensor:
    """Training estimator of routed attention: every token queries, but only the chosen tokens
    (key_idx [B, K]; None: every token, as in the "keep_kv" variant) are keys and values, so chosen
    tokens get exactly their routed output while skipped ones get the output they *would* have had;
    all heads are computed and scaled by head_gates [B, T, H] (1/0 in value). Dense cost, training
    only: it gives the routers a gradient for the tokens and heads they did not choose."""
    B, T, _ = h.shape
    hd = w.head_dim
    hk, kpos, rk = h, pos, rope
    if key_idx is not None:
        take = lambda t: torch.gather(t, 1, key_idx.view(B, -1, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
        hk, kpos = take(h), take(pos)
        rk = None if rope is None else (take(rope[0]), take(rope[1]))
    K = hk.shape[1]
    q = F.linear(h, w.w_q, w.b_q).view(B, T, w.n_heads, hd).transpose(1, 2)
    k = F.linear(hk, w.w_k, w.b_k).view(B, K, w.n_kv_heads, hd).transpose(1, 2)
    v = F.linear(hk, w.w_v, w.b_v).view(B, K, w.n_kv_heads, hd).transpose(1, 2)
    q, k = w.heads(q, "q", rope), w.heads(k, "k", rk)
    mask = w.visible(pos, kpos)
    mask = None if mask is None else mask[:, None]
    o = w.attend(q, k, v, mask)
    if head_gates is not None:
        o = o * head_gates.transpose(1, 2)[..., None].to(o.dtype)
    return F.linear(o.transpose(1, 2).reshape(B, T, -1), w.w_o, w.b_o)


def estimator_mlp(w: MLPWeights, h: Tensor, unit_gates: Tensor | None, units: tuple | None = None) -> Tensor:
    """Training estimator of expert routing: the dense MLP with each hidden unit scaled by its
    expert's gate (1/0 in value, straight-through gradient); unit_gates [n, E]. units=(capacity,
    probe gates [n, F] or None): single units chosen as ``RoutedMLP`` does, the others x 0 (or every
    unit x its probe gate, for Taylor scores)."""
    hidden = mlp_hidden(w, h)
    if unit_gates is not None:
        hidden = hidden * unit_gates.repeat_interleave(w.width // unit_gates.shape[-1], -1).to(hidden.dtype)
    if units is not None:
        capacity, probe = units
        if probe is None:
            probe = torch.zeros_like(hidden).scatter_(-1, choose_units(mlp_gate(w, h), capacity), 1.0)
        hidden = hidden * probe.to(hidden.dtype)
    y = F.linear(hidden, w.w_out)
    return y if w.b_out is None else y + w.b_out


class RoutedMLP(nn.Module):
    """The MLP on the chosen rows only, optionally with only k of E hidden-unit slices per row.

    ``backend``: "auto" runs the Triton kernels (elastilab_kernels) on CUDA tensors when no
    gradient is needed and the torch path otherwise; "torch" or "triton" force one.
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, w: MLPWeights, h: Tensor, experts: tuple[Tensor, Tensor] | None = None,
                n_experts: int = 1, residual: tuple[Tensor, Tensor, Tensor] | None = None,
                units: tuple[float, Tensor | None] | None = None) -> Tensor:
        """mlp(h) for the rows of h; with residual=(x, rows, gate), h holds every row and the
        result is x with gate * mlp(h[rows]) added to the chosen rows (gather, MLP, add: fused).
        units=(capacity, scores [n, F] or None): each row computes the gate projection, then only
        its top units by score (None: by the size of its gate activations, CATS); scores a ``UnitPlan``:
        the units were chosen without the gate, and only theirs are computed (``elastilab.unit_plan``)."""
        if residual is not None:
            x, rows, gate = residual
            return ops.routed_mlp_residual(x, h, rows, w, gate, backend=self.backend)
        if units is not None and isinstance(units[1], UnitPlan):
            return unit_mlp_planned(w, h, units[1])
        if units is not None:
            gate = mlp_gate(w, h)
            return ops.unit_mlp(h, gate, choose_units(gate, *units), w, backend=self.backend)
        if experts is None:
            return mlp_forward(w, h)
        return ops.expert_mlp(h, experts[0], experts[1], w, n_experts, backend=self.backend)


def choose_units(gate: Tensor, capacity: float, scores: Tensor | None = None) -> Tensor:
    """Per-row top-k hidden units [n, k]: by ``scores`` [n, F], else by |gate activation|."""
    k = n_kept(capacity, gate.shape[-1])
    return (gate.abs() if scores is None else scores).topk(k, dim=-1, sorted=False).indices


def scatter_add_rows(x: Tensor, rows: Tensor, y: Tensor) -> Tensor:
    """x [N, d] with y [n, d] added to rows (out of place, so autograd keeps x intact)."""
    return x.index_add(0, rows, y.to(x.dtype))


__all__ = ["straight_through", "hard_gates", "n_kept", "running_threshold", "select_tokens", "keep_to_index",
           "choose_slots",
           "choose_units",
           "estimator_attention", "estimator_mlp",
           "RoutedAttention", "RoutedMLP", "scatter_add_rows", "BlockSpec"]
