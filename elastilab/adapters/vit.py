"""timm VisionTransformer (``vit_*`` incl. the DINOv2 variants): pre-norm LayerNorm, fused qkv, GELU MLP,
optional LayerScale (ls1/ls2), CLS and register tokens in front of the patches, non-causal attention.

The prefix tokens (``model.num_prefix_tokens``: CLS + registers) are protected: never routed away.
Unsupported block variants (qk-norm, gated or normed attention, SwiGLU / normed MLPs, parallel or
post-norm blocks) raise a clear error instead of running a different function.
"""
from __future__ import annotations

import torch
from torch import nn

from elastilab.adapters.base import Adapter, Call, register
from elastilab.core.spec import AttnWeights, BlockSpec, MLPWeights

PREFIX_ATTR = "_elastilab_prefix_tokens"  # set once on each block by layers(): CLS + registers of its model


def gelu_kind(act: nn.Module, where: str) -> str:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    raise ValueError(f"{where}: unsupported MLP activation {type(act).__name__}; supported: nn.GELU "
                     "(exact or tanh). SwiGLU MLPs (e.g. dinov2 giant) are not supported yet")


def check_finite(x, name: str) -> None:
    """Refuse image tensors holding NaN or inf (they would spread through every token silently)."""
    bad = ~torch.isfinite(x)
    if bad.any():
        images = bad.flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{name}: the image tensor holds {int(bad.sum())} NaN or inf values (in image"
                         f"{'s' if len(images) > 1 else ''} {', '.join(map(str, images[:5]))}"
                         f"{', ...' if len(images) > 5 else ''}); check how the pixels were produced")


def check_image(x, channels: int, patch: tuple[int, int], fixed: tuple[int, int] | None, name: str) -> None:
    """Clear errors for pixel tensors the model cannot take (before timm/transformers fail deep inside)."""
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} expects a float image tensor [B, {channels}, H, W], got {shape}; "
                         "use elastilab.zoo.dinov2.preprocess(images, size) for PIL/numpy images")
    if x.shape[1] != channels:
        raise ValueError(f"{name} expects {channels} channels, got an image tensor of shape {tuple(x.shape)} "
                         f"({x.shape[1]} channels); gray images must be repeated to {channels} channels")
    check_finite(x, name)
    H, W = x.shape[-2:]
    if fixed is not None and (H, W) != tuple(fixed):
        raise ValueError(f"{name} has a fixed input size {fixed[0]}x{fixed[1]}, got {H}x{W}; resize the "
                         "images (or build the model with a dynamic image size)")
    if H % patch[0] or W % patch[1]:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch[0]}x{patch[1]} "
                         f"of {name}; use e.g. {H // patch[0] * patch[0] or patch[0]}"
                         f"x{W // patch[1] * patch[1] or patch[1]}")


@register
class TimmViTAdapter(Adapter):
    name = "timm_vit"
    model_classes = ("VisionTransformer",)
    causal = False

    def layers(self, model):
        blocks = model.blocks
        first = getattr(blocks[0], "base_layer", blocks[0]) if len(blocks) else None
        if first is not None and not hasattr(first, PREFIX_ATTR):  # once per model: block_spec sees only a block
            for blk in blocks:
                setattr(blk, PREFIX_ATTR, model.num_prefix_tokens)
        return blocks

    def block_spec(self, layer, layer_idx):
        where = f"timm block {layer_idx} ({type(layer).__name__})"
        if not hasattr(layer, "norm1") or not hasattr(layer.attn, "qkv") or not hasattr(layer.mlp, "fc1"):
            raise ValueError(f"{where}: only timm's pre-norm vision_transformer.Block with Attention(qkv, proj) "
                             "and Mlp(fc1, fc2) is supported")
        a, m = layer.attn, layer.mlp
        for part, ok in (("qk_norm", isinstance(a.q_norm, nn.Identity) and isinstance(a.k_norm, nn.Identity)),
                         ("scale_norm", isinstance(getattr(a, "norm", nn.Identity()), nn.Identity)),
                         ("gated attention", getattr(a, "gate", None) is None),
                         ("scale_mlp_norm", isinstance(getattr(m, "norm", nn.Identity()), nn.Identity))):
            if not ok:
                raise ValueError(f"{where}: {part} is not supported by elastilab's routed block")
        n = a.num_heads * a.head_dim
        w, b = a.qkv.weight, a.qkv.bias  # nn.Linear: [3n, d], rows q | k | v
        split = (None, None, None) if b is None else (b[:n], b[n:2 * n], b[2 * n:])
        attn = AttnWeights(w[:n], w[n:2 * n], w[2 * n:], a.proj.weight, a.num_heads, a.num_heads, a.head_dim,
                           *split, a.proj.bias, causal=False, rope=None, scaling=a.scale)
        mlp = MLPWeights("gelu", gelu_kind(m.act, where), m.fc1.weight, m.fc2.weight, None, m.fc1.bias, m.fc2.bias)
        gamma = lambda ls: ls.gamma if hasattr(ls, "gamma") else None  # nn.Identity when no LayerScale
        return BlockSpec(layer.norm1, layer.norm2, attn, mlp, gamma(layer.ls1), gamma(layer.ls2),
                         n_protected=getattr(layer, PREFIX_ATTR, 0))

    def parse_call(self, args, kwargs):
        if kwargs.get("is_causal"):
            raise ValueError("is_causal=True: elastic ViTs route non-causal (bidirectional) attention only")
        x = args[0] if args else kwargs["x"]
        mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        if mask is not None and mask.dim() == 2:  # timm accepts [T, T]; the routed path wants [B, 1, T, T]
            mask = mask[None, None]
        return Call(x, mask, None, None)

    def hidden_size(self, model):
        return model.embed_dim

    def check_inputs(self, model, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        pe = model.patch_embed
        fixed = tuple(pe.img_size) if pe.strict_img_size and not getattr(pe, "dynamic_img_pad", False) else None
        check_image(x, pe.proj.in_channels, tuple(pe.patch_size), fixed, f"timm {type(model).__name__}")

    def final_norm(self, model):
        return model.norm

    def prefix_tokens(self, model) -> int:
        return model.num_prefix_tokens

    def has_cls(self, model) -> bool:
        return getattr(model, "cls_token", None) is not None
