"""Inside LLaVA's language model: the two ways ``ElasticLlava`` runs it on part of the image tokens
without removing them from the input sequence first.

Pruning inside the LM (FastV, an image-token scorer whose ``image_layer`` is K): the layers before K
see every token; the scorer scores the image tokens from layer K-1's input, and the dropped ones are
pruned by forward pre-hooks on the later layers.

Key-gated attention (the router's training estimator): the forward value is the hard top-k selection,
but while ``training_estimator()`` is on, the sequence keeps every token and each image token's *key*
is gated inside softmax attention by g = keep + (p - p.detach()), p = sigmoid(score):
    attn_i = sum_j g_j exp(s_ij) v_j / sum_j g_j exp(s_ij).
In value g is 1/0, which is exactly removing the dropped tokens (same positions, same masks); its
gradient d attn / d g_j = exp(s_ij) (v_j - attn_i) / Z tells a dropped token's score what it *would*
have contributed. (Gradients on the kept tokens alone barely move a ranking from its random start.)
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect

import torch
from torch import Tensor

_KEY_GATE: contextvars.ContextVar = contextvars.ContextVar("elastilab_key_gate", default=None)
GATED_ATTENTION = "elastilab_gated"


# -- pruning inside the LM (FastV) ---------------------------------------------------------------
def prune_after(lm, layers, K: int, emb: Tensor, mask: Tensor, pos: Tensor, choose) -> tuple[Tensor, Tensor, object]:
    """Run ``lm`` (a LlamaModel whose decoder ``layers`` are given) with layers < K on every token; at
    layer K, ``choose(x, rope)`` (layer K-1's input [B, T, d] and rotary tables, captured by a hook)
    returns (idx [B, T']: the positions kept, anything else), and layers >= K run on those tokens only
    (the mask and rotary tables are sliced to match). Returns (last hidden state [B, T', d], idx, else)."""
    B, T = emb.shape[:2]
    state = {}

    def capture(module, args, kwargs):
        state["x"] = args[0] if args else kwargs["hidden_states"]
        state["rope"] = kwargs["position_embeddings"]

    def prune(module, args, kwargs):
        if "idx" not in state:
            state["idx"], state["else"] = choose(state["x"], tuple(t.expand(B, -1, -1) for t in state["rope"]))
        idx = state["idx"]
        x = args[0] if args else kwargs.pop("hidden_states")
        if x.shape[1] == T:
            x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
        cos, sin = kwargs["position_embeddings"]
        g = lambda t: torch.gather(t.expand(B, -1, -1), 1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa
        kwargs["position_embeddings"] = (g(cos), g(sin))
        m = kwargs.get("attention_mask")
        if torch.is_tensor(m) and m.dim() == 4:
            m = m.expand(B, -1, -1, -1)
            m = torch.gather(m, 2, idx[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
            kwargs["attention_mask"] = torch.gather(m, 3, idx[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
        kwargs.pop("position_ids", None)
        return (x, *args[1:]), kwargs

    hooks = [layers[K - 1].register_forward_pre_hook(capture, with_kwargs=True)]
    hooks += [layers[i].register_forward_pre_hook(prune, with_kwargs=True) for i in range(K, len(layers))]
    try:
        out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    return out.last_hidden_state, state["idx"], state["else"]


# -- gated attention (the training estimator) ------------------------------------------------------
def _gated_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax attention whose key j is weighted by gate[b, j] inside the softmax (see module doc)."""
    gate = _KEY_GATE.get()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    s = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    Tq, Tk = s.shape[-2:]
    if attention_mask is None:
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=s.device).tril(Tk - Tq)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask == 0
    s = s.masked_fill(~allowed, float("-inf"))
    w = (s - s.amax(-1, keepdim=True).detach()).exp() * gate[:, None, None, :Tk].to(s.dtype)
    w = w / w.sum(-1, keepdim=True)
    return (w @ value).transpose(1, 2).contiguous(), None


def _register_gated():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(GATED_ATTENTION, _gated_attention)
    AttentionMaskInterface.register(GATED_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def gated_attention(lm, gate: Tensor):
    """Run ``lm`` (a LlamaModel) with every key gated by gate [B, T] inside its attention."""
    _register_gated()
    old = lm.config._attn_implementation
    token = _KEY_GATE.set(gate)
    lm.config._attn_implementation = GATED_ATTENTION
    try:
        yield
    finally:
        lm.config._attn_implementation = old
        _KEY_GATE.reset(token)


# -- small helpers of ElasticLlava's LM calls --------------------------------------------------------
def top_per_image(scores: Tensor, k: int) -> Tensor:
    """keep [n_images, N] bool: the k highest scores of each image."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)


def cache_kwarg(lm) -> str:
    """transformers renamed past_key_values to cache (5.2x); use whichever this version takes."""
    return _cache_kwarg_of(type(lm))


@functools.cache
def _cache_kwarg_of(lm_class) -> str:  # once per class, not once per decoding step
    return "cache" if "cache" in inspect.signature(lm_class.forward).parameters else "past_key_values"
