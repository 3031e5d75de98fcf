"""The vision towers of VLMs, SigLIP and CLIP: the same encoder layer (pre-norm LayerNorm, q/k/v/out
projections with biases, a GELU MLP, non-causal attention).

SigLIP (``SiglipVisionModel``: PaliGemma, SmolVLM / Idefics3...) has no CLS token: every token is a patch,
none is protected; its final LayerNorm normalises every token, and the attention-pooling head after it
(``vision_use_head``) is not a block and stays dense. CLIP (LLaVA-1.5's tower) has a CLS token in front,
a LayerNorm *before* the encoder, and a final LayerNorm of the CLS token only (the pooled output), so its
final hidden states are the last block's output; OpenAI's checkpoints use quick_gelu."""
from __future__ import annotations

from elastilab.adapters.base import Adapter, Call, register
from elastilab.adapters.hf_vit import _ACTS as _HF_ACTS
from elastilab.adapters.vit import check_image
from elastilab.core.spec import AttnWeights, BlockSpec, MLPWeights

_ACTS = {**_HF_ACTS, "quick_gelu": "quick_gelu"}


@register
class SiglipVisionAdapter(Adapter):
    name = "siglip"
    model_classes = ("SiglipVisionModel",)  # (SigLIP 2 takes patchified pixels and shapes: not yet)
    causal = False

    def tower(self, model):
        """The vision transformer (CLIPVisionModelWithProjection keeps it as ``vision_model``)."""
        return getattr(model, "vision_model", model)

    def layers(self, model):
        return self.tower(model).encoder.layers

    def block_spec(self, layer, layer_idx):
        a, m = layer.self_attn, layer.mlp
        act = _ACTS.get(a.config.hidden_act)
        if act is None:
            raise ValueError(f"unsupported MLP activation {a.config.hidden_act!r}; supported: {sorted(_ACTS)}")
        attn = AttnWeights(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.out_proj.weight,
                           a.num_heads, a.num_heads, a.head_dim, a.q_proj.bias, a.k_proj.bias, a.v_proj.bias,
                           a.out_proj.bias, causal=False, rope=None, scaling=a.scale)
        mlp = MLPWeights("gelu", act, m.fc1.weight, m.fc2.weight, None, m.fc1.bias, m.fc2.bias)
        return BlockSpec(layer.layer_norm1, layer.layer_norm2, attn, mlp, n_protected=self.prefix_tokens(None))

    def parse_call(self, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        return Call(hidden, mask, None, None)

    def final_norm(self, model):
        return self.tower(model).post_layernorm

    def prefix_tokens(self, model) -> int:
        return 0  # no CLS

    def check_inputs(self, model, args, kwargs):
        cfg = self.tower(model).config
        fixed = None if kwargs.get("interpolate_pos_encoding") else (cfg.image_size,) * 2
        check_image(kwargs.get("pixel_values", args[0] if args else None), cfg.num_channels, (cfg.patch_size,) * 2,
                    fixed, type(model).__name__)


@register
class CLIPVisionAdapter(SiglipVisionAdapter):
    name = "clip"
    model_classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection")

    def final_norm(self, model):
        return self.layers(model)[-1]  # (its post_layernorm sees the CLS token only)

    def prefix_tokens(self, model) -> int:
        return 1

    def has_cls(self, model) -> bool:
        return True
