"""Hugging Face ViTModel / ViTMAEModel / Dinov2Model / Dinov2WithRegistersModel and their
*ForImageClassification heads: pre-norm LayerNorm, separate q/k/v/o projections, GELU MLP, LayerScale
(DINOv2 only), CLS (+ registers) in front of the patches, non-causal attention.

Module names differ across transformers releases: 5.x uses ``attention.{q,k,v,o}_proj`` and ``mlp.fc1/fc2``;
4.x used ``attention.attention.{query,key,value}``, ``attention.output.dense`` and, for ViT, an MLP
split into ``intermediate.dense`` + ``output.dense``. Both layouts are read.
"""
from __future__ import annotations

from elastilab.adapters.base import Adapter, Call, register
from elastilab.adapters.vit import check_image
from elastilab.core.spec import AttnWeights, BlockSpec, MLPWeights

_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_FAMILIES = ("ViT", "ViTMAE", "Dinov2", "Dinov2WithRegisters")


def _find(module, *paths):
    """The first dotted attribute path that exists on module (None if none does)."""
    for path in paths:
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def base_model(model):
    """The backbone (ViTModel, Dinov2Model, ...) inside a model with a head, or the model itself."""
    return model if hasattr(model, "embeddings") else getattr(model, model.base_model_prefix)


def _prefix(config) -> int:
    """CLS + register tokens (Dinov2WithRegisters) in front of the patches."""
    return 1 + getattr(config, "num_register_tokens", 0)


@register
class HFViTAdapter(Adapter):
    name = "hf_vit"
    model_classes = tuple(f"{f}{k}" for f in _FAMILIES for k in ("Model", "ForImageClassification"))
    causal = False

    def layers(self, model):
        return _find(base_model(model), "layers", "encoder.layer", "encoder.layers")

    def block_spec(self, layer, layer_idx):
        where = f"layer {layer_idx} ({type(layer).__name__})"
        att = layer.attention
        q, k, v = (_find(att, f"{a}_proj", f"attention.{b}")
                   for a, b in (("q", "query"), ("k", "key"), ("v", "value")))
        o = _find(att, "o_proj", "output.dense")
        cfg = _find(att, "config", "attention.config")
        if cfg is None:
            raise ValueError(f"{where}: the attention module carries no config; unsupported transformers layout")
        act = _ACTS.get(cfg.hidden_act) if isinstance(cfg.hidden_act, str) else None
        if act is None:
            raise ValueError(f"{where}: unsupported MLP activation {cfg.hidden_act!r}; supported: {sorted(_ACTS)}")
        if getattr(cfg, "use_swiglu_ffn", False):
            raise ValueError(f"{where}: SwiGLU MLPs (use_swiglu_ffn=True) are not supported yet "
                             "(their gate has a bias)")
        fc1 = _find(layer, "mlp.fc1", "intermediate.dense")
        fc2 = _find(layer, "mlp.fc2", "output.dense")
        if None in (q, k, v, o, fc1, fc2):
            raise ValueError(f"{where}: unrecognised module layout (expected q/k/v/o projections and a 2-layer MLP)")
        n_heads = cfg.num_attention_heads
        head_dim = q.weight.shape[0] // n_heads
        attn = AttnWeights(q.weight, k.weight, v.weight, o.weight, n_heads, n_heads, head_dim,
                           q.bias, k.bias, v.bias, o.bias, causal=False, rope=None, scaling=head_dim ** -0.5)
        mlp = MLPWeights("gelu", act, fc1.weight, fc2.weight, None, fc1.bias, fc2.bias)
        norm1 = _find(layer, "norm1", "layernorm_before")
        norm2 = _find(layer, "norm2", "layernorm_after")
        ls = lambda name: getattr(getattr(layer, name, None), "lambda1", None)  # DINOv2 LayerScale
        return BlockSpec(norm1, norm2, attn, mlp, ls("layer_scale1"), ls("layer_scale2"),
                         n_protected=_prefix(cfg))  # the attention's config is the model's

    def parse_call(self, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        return Call(hidden, mask, None, None)

    def check_inputs(self, model, args, kwargs):
        x = kwargs.get("pixel_values", args[0] if args else None)
        cfg = base_model(model).config
        patch = (cfg.patch_size,) * 2 if isinstance(cfg.patch_size, int) else tuple(cfg.patch_size)
        size = (cfg.image_size,) * 2 if isinstance(cfg.image_size, int) else tuple(cfg.image_size)
        # DINOv2 always interpolates its position embeddings; ViT / ViT-MAE only when asked
        dynamic = "Dinov2" in type(model).__name__ or kwargs.get("interpolate_pos_encoding")
        check_image(x, cfg.num_channels, patch, None if dynamic else size, type(model).__name__)

    def final_norm(self, model):
        return base_model(model).layernorm

    def prefix_tokens(self, model) -> int:
        return _prefix(base_model(model).config)

    def has_cls(self, model) -> bool:
        return True
