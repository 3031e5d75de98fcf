"""OLMo 2: no norm *before* the sub-layers, RMSNorms of their outputs (before the residual add), and q/k
RMSNorms over the whole projection (every head's query at once), then RoPE; SwiGLU as Llama."""
from __future__ import annotations

from torch import nn

from elastilab.adapters.base import register
from elastilab.adapters.llama import LlamaAdapter, mlp_act, rope
from elastilab.core.spec import AttnWeights, BlockSpec, MLPWeights


class _AcrossHeads(nn.Module):
    """A norm over the whole q or k projection, applied to its heads x [B, n, K, hd]."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        B, n, K, hd = x.shape
        return self.norm(x.transpose(1, 2).reshape(B, K, n * hd)).view(B, K, n, hd).transpose(1, 2)


_WHY_NOT = {"attn_heads": "OLMo 2 normalises the query over every head at once (q_norm spans the whole "
                          "projection), so no head's query can be computed without all the others"}


@register
class Olmo2Adapter(LlamaAdapter):  # layers, final norm and call as in Llama
    name = "olmo2"
    model_classes = ("Olmo2ForCausalLM", "Olmo2Model")
    why_not = _WHY_NOT
    components = tuple(c for c in LlamaAdapter.components if c not in _WHY_NOT)

    def block_spec(self, layer, layer_idx):
        a, m = layer.self_attn, layer.mlp
        cfg = a.config
        act = mlp_act(cfg.hidden_act)
        attn = AttnWeights(
            a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
            cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim,
            a.q_proj.bias, a.k_proj.bias, a.v_proj.bias, a.o_proj.bias,
            causal=True, rope=rope, scaling=a.scaling, q_norm=_AcrossHeads(a.q_norm), k_norm=_AcrossHeads(a.k_norm))
        mlp = MLPWeights("swiglu", act, m.up_proj.weight, m.down_proj.weight, m.gate_proj.weight)
        return BlockSpec(nn.Identity(), nn.Identity(), attn, mlp, n_protected=1,
                         post_attn_norm=layer.post_attention_layernorm, post_mlp_norm=layer.post_feedforward_layernorm)
