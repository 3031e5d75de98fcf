"""Elastic SmolVLM / Idefics3: ``ElasticLlava``'s visual-token router and LM components on a VLM whose image
tokens come from a SigLIP tower and a pixel-shuffle connector.

Each image tile becomes ``image_seq_len`` connector tokens (one per scale_factor x scale_factor patches); the
visual-token router keeps the top ``ceil(c * N)`` of each tile and removes the others from the sequence
before the LM, exactly as for LLaVA (adapters/llava/model.py). The tile's own text tokens
(``<fake_token_around_image>``, ``<row_i_col_j>``, the global-image marker) are text and always kept.

    em = el.elastify(smolvlm, el.ElasticConfig(visual_tokens=0.5, mlp_units=0.75))   # an ElasticSmolVLM
    out = em(input_ids, pixel_values=pixel_values)        # pixel_values [B, n_tiles, 3, H, W], as the processor gives
"""
from __future__ import annotations

import torch
from torch import Tensor

from elastilab.adapters.llava.model import ElasticLlava
from elastilab.adapters.smolvlm.adapter import SmolVLMAdapter
from elastilab.adapters.vit import check_finite


class ElasticSmolVLM(ElasticLlava):
    """ElasticLlava for SmolVLM / Idefics3; ``pixel_values`` are the processor's [B, n_tiles, 3, H, W] (all-zero
    tiles are padding and dropped, as transformers does) or the tiles flattened [n_tiles, 3, H, W]."""

    def image_features(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None) -> Tensor:
        """Tower + connector: [n_real_tiles, N, d_lm]."""
        if not torch.is_tensor(pixel_values) or pixel_values.dim() not in (4, 5):
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be [B, n_tiles, 3, H, W] (or [n_tiles, 3, H, W]), got {shape}")
        check_finite(pixel_values, "pixel_values")
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[None]
            pixel_attention_mask = None if pixel_attention_mask is None else pixel_attention_mask[None]
        out = self.model.model.get_image_features(pixel_values=pixel_values,
                                                  pixel_attention_mask=pixel_attention_mask)
        feats = torch.cat(list(out.pooler_output))  # per batch row, tiles flattened: [n_tokens, d]
        return feats.view(-1, self.model.model.image_seq_len, feats.shape[-1])

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None, image_features: Tensor | None = None,
                attention_mask: Tensor | None = None, past_key_values=None, position_ids: Tensor | None = None,
                use_cache: bool = False, logits_at: Tensor | None = None, logits_to_keep: int = 0,
                pixel_attention_mask: Tensor | None = None, **kwargs):
        """As ``ElasticLlava.forward``, with SmolVLM's pixel inputs (and their ``pixel_attention_mask``)."""
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("pass either pixel_values or image_features, not both")
            image_features = self.image_features(pixel_values, pixel_attention_mask)
        elif pixel_attention_mask is not None:
            raise ValueError("pixel_attention_mask was given without pixel_values")
        if image_features is not None and image_features.dim() == 4:  # [B, tiles, N, d]: batched per prompt
            image_features = image_features.flatten(0, 1)
        return super().forward(input_ids, None, image_features, attention_mask, past_key_values, position_ids,
                               use_cache, logits_at, logits_to_keep, **kwargs)


SmolVLMAdapter.elastic_class = ElasticSmolVLM  # what elastify wraps a SmolVLM / Idefics3 in
__all__ = ["ElasticSmolVLM"]
