"""SigLIP 2 vision towers (``Siglip2VisionModel``, ``Siglip2ForImageClassification``): SigLIP's encoder layer
(siglip.py) behind NaFlex embeddings: the model takes images already cut into patches, pixel_values
[B, P, p*p*C] padded to P patches, ``pixel_attention_mask`` [B, P] (1 = a real patch) and ``spatial_shapes``
[B, 2] (each image's patch grid), and resizes its position grid to each image.

Padding patches are tokens of the sequence like any other: capacity counts them (batch images of one size,
unpadded, to route real patches only); the pooling head and the attention of every block ignore them."""
from __future__ import annotations

import torch
from torch import Tensor

from elastilab.adapters.base import register
from elastilab.adapters.siglip import SiglipVisionAdapter
from elastilab.adapters.vit import check_finite


def patchify(images: Tensor, patch: int) -> dict:
    """SigLIP 2's inputs for images [B, C, H, W] (H, W multiples of ``patch``), unpadded: the processor's patch
    order (row-major patches, each flattened (p, p, C)), every patch real, the grid of each image."""
    B, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of SigLIP 2's patch size {patch}")
    nh, nw = H // patch, W // patch
    x = images.reshape(B, C, nh, patch, nw, patch).permute(0, 2, 4, 3, 5, 1).reshape(B, nh * nw, -1)
    return {"pixel_values": x, "pixel_attention_mask": torch.ones(B, nh * nw, dtype=torch.long, device=x.device),
            "spatial_shapes": torch.tensor([[nh, nw]] * B, device=x.device)}


@register
class Siglip2VisionAdapter(SiglipVisionAdapter):
    name = "siglip2"
    model_classes = ("Siglip2VisionModel", "Siglip2ForImageClassification")

    def check_inputs(self, model, args, kwargs):
        cfg = self.tower(model).config
        name = type(model).__name__
        x = kwargs.get("pixel_values", args[0] if args else None)
        mask, shapes = kwargs.get("pixel_attention_mask"), kwargs.get("spatial_shapes")
        width = cfg.num_channels * cfg.patch_size ** 2
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[-1] != width or not x.is_floating_point():
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} takes patchified images, pixel_values [B, n_patches, {width}] "
                             f"({cfg.patch_size}x{cfg.patch_size} px x {cfg.num_channels} channels), got {shape}; "
                             "elastilab.adapters.siglip2.patchify(images, patch_size) makes them from [B, C, H, W]")
        check_finite(x, "pixel_values")
        B, P = x.shape[:2]
        if not torch.is_tensor(shapes) or tuple(shapes.shape) != (B, 2):
            raise ValueError(f"{name} needs spatial_shapes [B, 2] (each image's patch grid) with pixel_values "
                             f"{tuple(x.shape)}, got {None if shapes is None else tuple(shapes.shape)}")
        if not torch.is_tensor(mask) or tuple(mask.shape) != (B, P):
            raise ValueError(f"{name} needs pixel_attention_mask [B, n_patches] = {(B, P)} (1 = a real patch), "
                             f"got {None if mask is None else tuple(mask.shape)}")
        n = shapes.prod(-1)
        if bool((n > P).any()) or not torch.equal(mask.sum(-1).to(n.dtype), n):
            raise ValueError(f"spatial_shapes {shapes.tolist()} do not match the real patches of each image "
                             f"(pixel_attention_mask sums {mask.sum(-1).tolist()}, {P} patches per row)")
