"""Gemma 2 and Gemma 3 text models: (1 + w) RMSNorms before *and after* each sub-layer, GeGLU (gelu_tanh),
attention scaled by query_pre_attn_scalar, sliding-window layers between global ones; Gemma 2's
attention-logit soft-capping, Gemma 3's per-head q/k norms.

The scaled embeddings and the final logit soft-capping happen outside the blocks (in the model), so
they need nothing here.
"""
from __future__ import annotations

from elastilab.adapters.base import register
from elastilab.adapters.llama import LlamaAdapter, mlp_act, rope, window
from elastilab.core.spec import AttnWeights, BlockSpec, MLPWeights


@register
class GemmaAdapter(LlamaAdapter):  # layers, final norm and call as in Llama
    name = "gemma"
    model_classes = ("Gemma2ForCausalLM", "Gemma2Model", "Gemma3ForCausalLM", "Gemma3TextModel")

    def block_spec(self, layer, layer_idx):
        a, m = layer.self_attn, layer.mlp
        cfg = a.config
        if not a.is_causal:
            raise ValueError("Gemma with use_bidirectional_attention=True (an encoder, e.g. EmbeddingGemma) is "
                             "not supported; elastilab routes the causal language model")
        act = mlp_act(cfg.hidden_activation)
        attn = AttnWeights(
            a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
            cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim,
            a.q_proj.bias, a.k_proj.bias, a.v_proj.bias, a.o_proj.bias,
            causal=True, rope=rope, scaling=a.scaling, q_norm=getattr(a, "q_norm", None),
            k_norm=getattr(a, "k_norm", None), window=window(a), softcap=cfg.attn_logit_softcapping)
        mlp = MLPWeights("swiglu", act, m.up_proj.weight, m.down_proj.weight, m.gate_proj.weight)  # GeGLU
        # Gemma's post_attention_layernorm normalises the attention *output* (Llama's is the MLP's input norm)
        return BlockSpec(layer.input_layernorm, layer.pre_feedforward_layernorm, attn, mlp, n_protected=1,
                         post_attn_norm=layer.post_attention_layernorm, post_mlp_norm=layer.post_feedforward_layernorm)
