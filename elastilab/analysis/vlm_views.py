"""Views of one tiny-llava answer (notebook 03): which image tokens a scorer keeps, the answer the routed model
then generates, and the kept patches drawn on the image."""
from __future__ import annotations

import numpy as np
import torch

from elastilab.analysis import plots
from elastilab.zoo import tiny_llava as tl


def answer_and_keep(em, tokenizer, item: dict, scorer="learned", capacity: float = 0.25, max_new_tokens: int = 4,
                    **lm: float) -> tuple[torch.Tensor, str]:
    """(keep [N] bool: the image tokens ``scorer`` keeps at visual capacity ``capacity``, the answer text the
    routed model generates with them) for one item ({"question", "image"}); ``lm``: capacities of the LM
    components for the same forward, by name. The model's capacities are restored after."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch = tl.build_inputs(tokenizer, item["question"], item["image"])
    with torch.no_grad(), em.capacity(visual_tokens=capacity, **lm), em.scoring(scorer):
        keep = em(**batch, logits_to_keep=1).image_keep[0]
        words = tokenizer.decode(em.generate(**batch, max_new_tokens=max_new_tokens)[0], skip_special_tokens=True)
    return keep, words


def overlay_kept(ax, image, keep: torch.Tensor, title: str, n_prefix: int = 1) -> None:
    """The kept patches of ``image`` bright, the dropped ones dark, as the tower saw the image; the first
    ``n_prefix`` tokens of ``keep`` are not patches (tiny-llava's CLS) and the title says whether it was kept."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if keep.dim() != 1 or keep.numel() <= n_prefix:
        raise ValueError(f"keep must be one image's tokens [N] with N > n_prefix ({n_prefix}), got "
                         f"{tuple(keep.shape)}")
    if n_prefix:
        title += "  CLS kept" if bool(keep[:n_prefix].all()) else "  CLS dropped"
    pixels = (tl.display_image(image) * 255).astype(np.uint8)
    plots.overlay(ax, pixels, keep[n_prefix:].numpy(), title)
