"""Llama-family causal LMs (SmolLM2, Llama, Mistral, Qwen2, Qwen3, SmolLM3): pre-norm RMSNorm, GQA, RoPE,
SwiGLU; Qwen3's per-head q/k norms; Mistral's and Qwen's sliding windows; SmolLM3's layers without RoPE."""
from __future__ import annotations

import torch

from elastilab.adapters.base import Adapter, Call, register
from elastilab.core.spec import AttnWeights, BlockSpec, MLPWeights

_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def mlp_act(name: str) -> str:
    """The spec's activation for a Llama-like config's MLP activation name, or a clear refusal."""
    if name not in _ACTS:
        raise ValueError(f"unsupported MLP activation {name!r}; supported: {sorted(_ACTS)}")
    return _ACTS[name]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x, cos, sin):
    """Rotary embedding of x [B, H, K, hd] with cos/sin [B, K, r] (as transformers' Llama); r < hd: only
    the first r dims rotate, the rest pass (partial rotary, Phi-4-mini)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([rope(x[..., :r], cos, sin), x[..., r:]], -1)
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def window(attn) -> int | None:
    """The layer's sliding window: Qwen2/3 and Gemma set one per layer (None on full layers), Mistral
    and Phi-3 one in the config for every layer."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


@register
class LlamaAdapter(Adapter):
    name = "llama"
    model_classes = tuple(f"{f}{k}" for f in ("Llama", "Mistral", "Qwen2", "Qwen3", "SmolLM3")
                          for k in ("ForCausalLM", "Model"))

    def layers(self, model):
        return (model.model if hasattr(model, "model") else model).layers

    def block_spec(self, layer, layer_idx):
        a, m = layer.self_attn, layer.mlp
        cfg = a.config
        act = mlp_act(cfg.hidden_act)
        attn = AttnWeights(
            a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
            cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim,
            a.q_proj.bias, a.k_proj.bias, a.v_proj.bias, a.o_proj.bias,
            causal=True, rope=rope if getattr(a, "use_rope", True) else None,  # SmolLM3: NoPE every 4th layer
            scaling=a.scaling, q_norm=getattr(a, "q_norm", None),
            k_norm=getattr(a, "k_norm", None), window=window(a))
        mlp = MLPWeights("swiglu", act, m.up_proj.weight, m.down_proj.weight, m.gate_proj.weight,
                         m.up_proj.bias, m.down_proj.bias, b_gate=m.gate_proj.bias)  # every bias (mlp_bias=True)
        # position 0 is the attention sink: its hidden state carries the massive activations
        # later layers rely on, so it is never routed away (costs 1/T of the compute)
        return BlockSpec(layer.input_layernorm, layer.post_attention_layernorm, attn, mlp, n_protected=1)

    def final_norm(self, model):
        return (model.model if hasattr(model, "model") else model).norm

    def parse_call(self, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return Call(hidden, kwargs.get("attention_mask"), cache, kwargs.get("position_embeddings"))
