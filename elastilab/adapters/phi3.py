"""Phi-3 / Phi-4-mini: Llama's block with fused projections (qkv_proj, gate_up_proj) and partial rotary.

The spec reads the fused weights through row slices, which are views: the routed path computes each
head's or hidden unit's part of the fused matmul without copying a weight.
"""
from __future__ import annotations

from elastilab.adapters.base import register
from elastilab.adapters.llama import LlamaAdapter, mlp_act, rope, window
from elastilab.core.spec import AttnWeights, BlockSpec, MLPWeights


def _rows(t, *bounds):
    """Consecutive row blocks of a fused weight or bias (views); None stays None."""
    return [None] * (len(bounds) - 1) if t is None else [t[i:j] for i, j in zip(bounds, bounds[1:])]


@register
class Phi3Adapter(LlamaAdapter):  # layers, final norm and call as in Llama
    name = "phi3"
    model_classes = ("Phi3ForCausalLM", "Phi3Model")

    def block_spec(self, layer, layer_idx):
        a, m = layer.self_attn, layer.mlp
        cfg = a.config
        act = mlp_act(cfg.hidden_act)
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim
        q, k, v = H * hd, H * hd + Hkv * hd, H * hd + 2 * Hkv * hd
        attn = AttnWeights(*_rows(a.qkv_proj.weight, 0, q, k, v), a.o_proj.weight, H, Hkv, hd,
                           *_rows(a.qkv_proj.bias, 0, q, k, v), a.o_proj.bias,
                           causal=True, rope=rope, scaling=a.scaling, window=window(a))
        F = m.down_proj.weight.shape[1]  # gate_up_proj = [gate; up], as Phi3MLP chunks it
        gate, up = _rows(m.gate_up_proj.weight, 0, F, 2 * F)
        b_gate, b_up = _rows(m.gate_up_proj.bias, 0, F, 2 * F)
        mlp = MLPWeights("swiglu", act, up, m.down_proj.weight, gate, b_up, m.down_proj.bias, b_gate=b_gate)
        return BlockSpec(layer.input_layernorm, layer.post_attention_layernorm, attn, mlp, n_protected=1)
