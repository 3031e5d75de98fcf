"""SigLIP vision towers (``SiglipVisionModel``, the image encoder of PaliGemma, SmolVLM / Idefics3 and many
other VLMs): pre-norm LayerNorm, q/k/v/out projections with biases, a GELU MLP, non-causal attention and
no CLS token: every token is a patch, none is protected. The final LayerNorm normalises every token; the
attention-pooling head after it (``vision_use_head``) is not a block and stays dense."""
from __future__ import annotations

from ..spec import AttnWeights, BlockSpec, MLPWeights
from .base import Adapter, Call, register
from .hf_vit import _ACTS
from .vit import check_image


@register
class SiglipVisionAdapter(Adapter):
    name = "siglip"
    model_classes = ("SiglipVisionModel",)  # (SigLIP 2 takes patchified pixels and shapes: not yet)
    causal = False

    def layers(self, model):
        return model.encoder.layers

    def block_spec(self, layer, layer_idx):
        a, m = layer.self_attn, layer.mlp
        act = _ACTS.get(a.config.hidden_act)
        if act is None:
            raise ValueError(f"unsupported MLP activation {a.config.hidden_act!r}; supported: {sorted(_ACTS)}")
        attn = AttnWeights(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.out_proj.weight,
                           a.num_heads, a.num_heads, a.head_dim, a.q_proj.bias, a.k_proj.bias, a.v_proj.bias,
                           a.out_proj.bias, causal=False, rope=None, scaling=a.scale)
        mlp = MLPWeights("gelu", act, m.fc1.weight, m.fc2.weight, None, m.fc1.bias, m.fc2.bias)
        return BlockSpec(layer.layer_norm1, layer.layer_norm2, attn, mlp, n_protected=0)  # no CLS

    def parse_call(self, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        return Call(hidden, mask, None, None)

    def final_norm(self, model):
        return model.post_layernorm

    def check_inputs(self, model, args, kwargs):
        cfg = model.config
        fixed = None if kwargs.get("interpolate_pos_encoding") else (cfg.image_size,) * 2
        check_image(kwargs.get("pixel_values", args[0] if args else None), cfg.num_channels, (cfg.patch_size,) * 2,
                    fixed, type(model).__name__)
