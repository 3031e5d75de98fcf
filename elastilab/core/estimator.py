"""Router training's forward (``ElasticBlock`` calls it when its estimator is on and gradients are enabled):
every candidate is computed, and the skipped ones are gated to 0 in value with a straight-through gradient."""
from __future__ import annotations

import torch
from torch import Tensor

from elastilab.core.routing import choose_slots, estimator_attention, estimator_mlp, hard_gates, keep_to_index
from elastilab.core.trace import RoutingDecision
from elastilab.scorers import nearest_kept


def estimate(block, x: Tensor, rope) -> Tensor:
    """Router training: the same forward value as ``block.routed`` (same choices, skipped parts add
    exactly 0), but skipped tokens / heads / slices are computed too and multiplied by a gate
    that is 0 in value and has the straight-through gradient. So each router learns from what
    every candidate *would* contribute, not only from the ones it already picked (with
    gradients only on chosen rows, the ranking barely moves from its random start).

    With ``block.probe`` set (a dict), nothing is chosen: every candidate is computed with a gate
    of exactly 1, a leaf stored in the dict, whose gradient is a first-order (Taylor) estimate of
    what removing that candidate would change (``scorers.Taylor``).

    With skipped_tokens="merge" a token's update is gate·(its own output) + (1 − gate)·(the output
    of the most similar *other* kept token): the value is what ``routed`` gives (a skipped token
    receives its nearest kept token's output), and the gradient tells each token's router what
    being merged instead of computed would change, kept tokens included."""
    spec = block._spec()
    block.decisions = {}
    probe = _probes(block, spec, x) if block.probe is not None else {}
    x = x + _attention(block, spec, x, rope, probe)
    return x + _mlp(block, spec, x, probe)


def _probes(block, spec, x: Tensor) -> dict[str, Tensor]:
    """Taylor probing: a gate of ones per elastic component, a leaf (also stored in ``block.probe``) whose
    gradient scores the candidates."""
    B, T, _ = x.shape
    sizes = {"attn_tokens": (B, T), "attn_heads": (B, T, spec.attn.n_heads),
             "mlp_tokens": (B * T,), "mlp_experts": (B * T, block.n_experts), "mlp_units": (B * T, spec.mlp.width)}
    probe = {c: torch.ones(sizes[c], device=x.device, requires_grad=True) for c in block.capacity}
    block.probe.update(probe)
    return probe


def _attention(block, spec, x: Tensor, rope, probe: dict) -> Tensor:
    """The attention sub-layer's gated update [B, T, d]; its token and head choices are recorded."""
    B, T, _ = x.shape
    pos = torch.arange(T, device=x.device).expand(B, T)
    if rope is not None:
        rope = tuple(r.expand(B, -1, -1) for r in rope)
    h = spec.attn_norm(x)
    key_idx, tok_gate, head_gates, keep = None, probe.get("attn_tokens"), probe.get("attn_heads"), None
    if block._active("attn_tokens") and not probe:
        scores, keep = block._token_keep("attn_tokens", h, min(T, spec.n_protected))
        if block.attn_tokens_variant == "drop":  # else every token stays a key/value (key_idx None)
            key_idx = keep_to_index(keep)[0]  # top-k: the same count in every row, no padding
        tok_gate = hard_gates(keep, scores)
    if block._active("attn_heads") and not probe:
        hs = block.routers["attn_heads"](h)
        ids = choose_slots(hs, block.capacity["attn_heads"])[0]
        block.decisions["attn_heads"] = RoutingDecision(block.layer_idx, "attn_heads", hs.flatten(0, 1),
                                                        ids.flatten(0, 1))
        head_gates = hard_gates(ids, hs)
    y = estimator_attention(spec.attn, h, pos, rope, key_idx, head_gates)
    y = spec.attn_out(y)  # post-norm (Gemma), LayerScale (DINOv2)
    return _gated_tokens(block, y, tok_gate, h, keep)


def _mlp(block, spec, x: Tensor, probe: dict) -> Tensor:
    """The MLP sub-layer's gated update [B, T, d]; its token and expert choices are recorded."""
    B, T, d = x.shape
    h = spec.mlp_norm(x).reshape(B * T, d)
    tok_gate, unit_gates = probe.get("mlp_tokens"), probe.get("mlp_experts")
    keep = None
    if block._active("mlp_tokens") and not probe:
        scores, keep = block._token_keep("mlp_tokens", h.view(B, T, d), min(T, spec.n_protected))
        tok_gate = hard_gates(keep, scores)
    if block._active("mlp_experts") and not probe:
        es = block.routers["mlp_experts"](h)
        ids = choose_slots(es, block.capacity["mlp_experts"])[0]
        block.decisions["mlp_experts"] = RoutingDecision(block.layer_idx, "mlp_experts", es, ids)
        unit_gates = hard_gates(ids, es)
    units = block._units(h, torch.arange(B * T, device=x.device)) if not probe else None
    if "mlp_units" in probe:
        units = (1.0, probe["mlp_units"])
    elif units is not None and units[1] is not None:
        raise ValueError("router training chooses mlp_units by their gate activations; leave em.scoring() first")
    y = estimator_mlp(spec.mlp, h, unit_gates, units)
    y = spec.mlp_out(y)
    return _gated_tokens(block, y.view(B, T, d), tok_gate, h.view(B, T, d), keep)


def _gated_tokens(block, y: Tensor, gate: Tensor | None, h: Tensor, keep: Tensor | None) -> Tensor:
    """The estimator's token-routed update [B, T, d]: y times the token gates, or, with
    skipped_tokens="merge", the gated mix of each token's own output and that of its most similar
    other kept token (see ``estimate``). No token routing (gate None): y as it is."""
    if gate is None:
        return y
    gate = gate.view(y.shape[:2])  # Taylor probes are flat over B x T
    if block.skipped_tokens == "drop" or keep is None:
        return y * gate[..., None]
    other = nearest_kept(h, keep, exclude_self=True)
    stand_in = torch.gather(y, 1, other[..., None].expand_as(y))
    return stand_in + (y - stand_in) * gate[..., None]
