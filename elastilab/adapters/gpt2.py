"""GPT-2: pre-norm LayerNorm, fused Conv1D qkv ([in, out] weights), learned positions, GELU MLP."""
from __future__ import annotations

from elastilab.adapters.base import Adapter, Call, register
from elastilab.core.spec import AttnWeights, BlockSpec, MLPWeights

_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@register
class GPT2Adapter(Adapter):
    name = "gpt2"
    model_classes = ("GPT2LMHeadModel", "GPT2Model")

    def layers(self, model):
        return (model.transformer if hasattr(model, "transformer") else model).h

    def final_norm(self, model):
        return (model.transformer if hasattr(model, "transformer") else model).ln_f

    def block_spec(self, layer, layer_idx):
        a, m = layer.attn, layer.mlp
        cfg = a.config
        if getattr(layer, "crossattention", None) is not None:
            raise ValueError(f"GPT-2 layer {layer_idx} has cross-attention (add_cross_attention=True, a decoder "
                             "for an encoder); elastilab routes decoder-only GPT-2 (add_cross_attention=False)")
        act = _ACTS.get(cfg.activation_function)
        if act is None:
            raise ValueError(f"unsupported GPT-2 activation {cfg.activation_function!r}; supported: {sorted(_ACTS)}")
        d = a.embed_dim
        w, b = a.c_attn.weight, a.c_attn.bias  # Conv1D: y = x @ w + b, w is [in, out]
        scaling = a.head_dim ** -0.5 if a.scale_attn_weights else 1.0
        if a.scale_attn_by_inverse_layer_idx:
            scaling /= float(layer_idx + 1)
        attn = AttnWeights(
            w[:, :d].T, w[:, d:2 * d].T, w[:, 2 * d:].T, a.c_proj.weight.T,
            a.num_heads, a.num_heads, a.head_dim, b[:d], b[d:2 * d], b[2 * d:], a.c_proj.bias,
            causal=True, rope=None, scaling=scaling)
        mlp = MLPWeights("gelu", act, m.c_fc.weight.T, m.c_proj.weight.T, None, m.c_fc.bias, m.c_proj.bias)
        return BlockSpec(layer.ln_1, layer.ln_2, attn, mlp, n_protected=1)  # the attention sink, as in llama.py

    def parse_call(self, args, kwargs):
        # GPT2Model calls block(hidden_states, cache, attention_mask, encoder_hidden_states, ...)
        names = ("hidden_states", "cache", "attention_mask")
        got = dict(zip(names, args))
        got.update({k: v for k, v in kwargs.items() if k in names})
        if "cache" not in got and "past_key_values" in kwargs:
            got["cache"] = kwargs["past_key_values"]
        return Call(got["hidden_states"], got.get("attention_mask"), got.get("cache"), None)
