"""Routing made visible: which patches each layer kept, which heads/experts tokens chose, and the
image overlays that show them. (The quality frontier plot is ``quality.plot_frontier``; the speed
plot, ``bench.plot_speed``.)"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from elastilab.core.config import PARAM_COMPONENTS, TOKEN_COMPONENTS
from elastilab.core.trace import RoutingTrace
from elastilab.tasks.vit import SIZE, prefix_tokens, vit_outputs


@torch.no_grad()
def routing_maps(em, x: Tensor) -> dict[str, np.ndarray]:
    """After one forward on x: for each token component, keep masks [layers, B, patches] (bool, prefix
    tokens dropped); a layer whose router is off (capacity 1.0, dense layer) shows every patch kept."""
    hidden, _ = vit_outputs(em, x)
    trace, P = RoutingTrace.of(em), prefix_tokens(em)
    return {c: trace.map(c, hidden.shape[:2])[:, :, P:] for c in TOKEN_COMPONENTS if c in em.capacities}


@torch.no_grad()
def slot_usage(em, x: Tensor) -> dict[str, np.ndarray]:
    """After one forward on x: fraction of tokens choosing each head [layers, H] / expert [layers, E]
    (1.0 in a layer that does not route it); a component no layer routed is left out."""
    vit_outputs(em, x)
    trace = RoutingTrace.of(em)
    return {c: trace.usage(c) for c in PARAM_COMPONENTS if c in trace.components}


def overlay(ax, image: np.ndarray, keep: np.ndarray, title: str = "", size: int = SIZE):
    """Draw image (uint8 HxW[xC]) resized to size, darkening the patches that were skipped."""
    from PIL import Image
    im = np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.BILINEAR))
    g = int(round(math.sqrt(keep.size)))
    mask = np.kron(keep.reshape(g, g), np.ones((size // g, size // g)))[..., None]
    ax.imshow((im * (0.25 + 0.75 * mask)).astype(np.uint8))
    ax.set_title(title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])


def routing_grid(images, maps: dict, layers=None, components=TOKEN_COMPONENTS, labels=None,
                 size: float = 1.1):
    """One row per (image, component), one column per layer: the patches each layer kept (bright) on the
    image. Layer numbers head the columns once and each row is named at its left, so no label sits over
    an image. ``maps`` as ``routing_maps`` returns them, for the same images in the same order."""
    import matplotlib.pyplot as plt
    layers = list(range(maps[components[0]].shape[0])) if layers is None else list(layers)
    rows = [(i, comp) for i in range(len(images)) for comp in components]
    fig, axes = plt.subplots(len(rows), len(layers), figsize=(len(layers) * size + 1.0, len(rows) * size + 0.3),
                             squeeze=False, layout="constrained")
    for r, (i, comp) in enumerate(rows):
        for j, layer in enumerate(layers):
            overlay(axes[r, j], images[i], maps[comp][layer, i], title=f"layer {layer}" if r == 0 else "")
        name = labels[i] if labels else f"image {i}"
        axes[r, 0].set_ylabel(f"{name}\n{comp.replace('_', ' ')}", fontsize=8, rotation=0, ha="right", va="center")
    return fig
