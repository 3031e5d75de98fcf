"""The ViT self-distillation task: outputs, loss, trainer, evaluation and the image domains.

Works for every ViT adapter (timm VisionTransformer, HF ViT / ViT-MAE / DINOv2) and the offline DINOv2-S:

    model = el.zoo.dinov2.load_hf()
    em = el.elastify(model, el.ElasticConfig(**DEFAULT_CAPS))  # every routed component at 0.5
    x = el.zoo.dinov2.preprocess(images, size=112)
    log = distill_vit(em, x, probe=el.zoo.dinov2.load_probe(), steps=40)
    evaluate_vit(em, x_test, labels, probe)      # accuracy, teacher agreement, cosine, measured compute

Loss (student vs teacher = the same model with routers disabled): ``cos_weight * (1 - cos)`` +
``mse_weight * relative MSE`` over the final hidden states (CLS and every patch), plus
``kl_weight * KL(teacher || student)`` on the probe's (or the model's own head's) logits.
It runs in distill.py's loop (same capacities, sampling, logs and checkpoints as the LMs).

Baselines at matched measured compute come from the scorer registry (``elastilab.scorers``):
``with em.scoring("random")``, ``"cls_attention"`` (tokens ranked by the attention the CLS token pays
them in that layer; its cost is measured as routing FLOPs), ``"oracle"``, ... Routing maps and their
plots: ``elastilab.analysis.plots``; the commands that train and benchmark DINOv2-S: ``elastilab vit`` \
(``elastilab.cli.vision``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from elastilab import data
from elastilab.adapters import find_adapter
from elastilab.adapters.hf_vit import base_model
from elastilab.adapters.siglip2 import patchify
from elastilab.core.compute import measure_flops
from elastilab.core.config import LAYER_COMPONENTS, ElasticConfig
from elastilab.core.loading import load_routers
from elastilab.core.model import elastify
from elastilab.training.distill import DistillConfig, distill
from elastilab.training.losses import kl_loss
from elastilab.zoo import dinov2

SIZE = 112  # 8x8 patches of 14 px: the probe's resolution, cheap on a CPU
DOMAINS = ("digits04", "digits59", "photos")
DEFAULT_CAPS = dict.fromkeys(LAYER_COMPONENTS, 0.5)


# ---------------------------------------------------------------- model plumbing
def _unwrap(model):
    """The plain model inside an ElasticModel / DDP wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "model", model) if hasattr(model, "elastic_config") else model


def _adapter(model):
    return find_adapter(_unwrap(model))


def _final_norm(model):
    """The module whose output is the final hidden state [B, T, d] (after the last LayerNorm)."""
    return _adapter(model).final_norm(_unwrap(model))


def _call_kwargs(model, x: Tensor) -> tuple[tuple, dict]:
    inner = _unwrap(model)
    if _adapter(inner).name == "timm_vit":
        return (x,), {}
    if _adapter(inner).name == "siglip2":  # NaFlex: the model takes the image's patches, their mask and grid
        return (), patchify(x, getattr(inner, "vision_model", inner).config.patch_size)
    kwargs = {"pixel_values": x}
    if "ViTMAE" in type(inner).__name__:  # keep the patch order (MAE shuffles patches by random noise)
        n = math.prod(s // p for s, p in zip(x.shape[-2:], _patch(inner)))
        kwargs["noise"] = torch.arange(n, device=x.device, dtype=x.dtype).expand(len(x), n)
    return (), kwargs


def _patch(inner) -> tuple[int, int]:
    if hasattr(inner, "patch_embed"):
        return tuple(inner.patch_embed.patch_size)
    p = base_model(inner).config.patch_size
    return (p, p) if isinstance(p, int) else tuple(p)


def prefix_tokens(model) -> int:
    """CLS + register tokens in front of the patches."""
    return _adapter(model).prefix_tokens(_unwrap(model))


def cls_and_mean(hidden: Tensor, model) -> Tensor:
    """Probe features [B, 2d]: the CLS token and the mean of the patch tokens (registers excluded)."""
    if not _adapter(model).has_cls(_unwrap(model)):
        raise ValueError(f"{type(_unwrap(model)).__name__} has no CLS token (built with class_token=False), "
                         "but probe features and CLS-attention routing need one; use a model with a CLS token")
    return torch.cat([hidden[:, 0], hidden[:, prefix_tokens(model):].mean(1)], dim=-1)


def vit_outputs(model, x: Tensor, probe=None) -> tuple[Tensor, Tensor | None]:
    """(final hidden states [B, T, d], logits [B, C] or None) of a timm or HF ViT, elastic or not.

    Logits come from ``probe`` (a Linear on ``cls_and_mean``) when given, else from the model's
    own classification head if it has one."""
    captured = []
    hook = _final_norm(model).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        args, kwargs = _call_kwargs(model, x)
        out = model(*args, **kwargs)
    finally:
        hook.remove()
    hidden = captured[-1]
    if probe is not None:
        return hidden, probe(cls_and_mean(hidden, model))
    logits = getattr(out, "logits", out if torch.is_tensor(out) and out.dim() == 2 else None)
    if logits is not None and _adapter(model).name == "timm_vit" and _unwrap(model).num_classes == 0:
        logits = None  # timm without a head returns pooled features, not logits
    return hidden, logits


# ---------------------------------------------------------------- loss and trainer
class ViTLoss:
    """loss_fn for ``distill``: feature cosine + relative MSE on every token, KL on logits.

    Batches are (pixels,) or (pixels, teacher_hidden, teacher_logits) when the teacher is cached."""

    def __init__(self, probe=None, cos_weight: float = 1.0, mse_weight: float = 1.0, kl_weight: float = 1.0):
        self.probe, self.cos_weight, self.mse_weight, self.kl_weight = probe, cos_weight, mse_weight, kl_weight

    def __call__(self, em, wrapped, batch, cfg: DistillConfig):
        x, *cached = batch if isinstance(batch, (list, tuple)) else (batch,)
        if cached:
            t_hidden, t_logits = cached[0], (cached[1] if cached[1].numel() else None)
        else:
            with torch.no_grad(), em.routers_disabled():
                t_hidden, t_logits = vit_outputs(em, x, self.probe)
        s_hidden, s_logits = vit_outputs(wrapped, x, self.probe)
        cos = F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1)
        mse = (s_hidden.float() - t_hidden.float()).pow(2).mean() / t_hidden.float().pow(2).mean()
        loss = self.cos_weight * (1 - cos.mean()) + self.mse_weight * mse
        metrics = {"kl": float("nan"), "agreement": float("nan"), "cosine": cos.mean().item(), "rel_mse": mse.item()}
        if t_logits is not None:
            kl = kl_loss(s_logits, t_logits, cfg.temperature)
            loss = loss + self.kl_weight * kl
            metrics.update(kl=kl.item(), agreement=(s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item())
        return loss, metrics


@torch.no_grad()
def teacher_outputs(em, x: Tensor, probe=None, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """Teacher hidden states and logits (empty [N, 0] when there are none) for every image."""
    hs, ls = [], []
    with em.routers_disabled():
        for chunk in x.split(batch_size):
            h, logits = vit_outputs(em, chunk, probe)
            hs.append(h)
            ls.append(logits if logits is not None else h.new_zeros(len(h), 0))
    return torch.cat(hs), torch.cat(ls)


def distill_vit(em, pixels: Tensor, probe=None, config: DistillConfig | None = None, cache_teacher: bool = True,
                cos_weight: float = 1.0, mse_weight: float = 1.0, kl_weight: float = 1.0, **overrides):
    """Train the routers of an elastic ViT on images [N, C, H, W] (preprocessed); returns the log.

    cache_teacher: compute the teacher's outputs once up front (the teacher does not change), which
    saves a forward pass per step. Other keywords are DistillConfig fields (steps, lr, capacity_range...)."""
    dataset = torch.utils.data.TensorDataset(pixels, *teacher_outputs(em, pixels, probe)) if cache_teacher \
        else torch.utils.data.TensorDataset(pixels)
    loss = ViTLoss(probe, cos_weight, mse_weight, kl_weight)
    return distill(em, dataset, config, loss_fn=loss, **overrides)


# ---------------------------------------------------------------- evaluation
_DENSE_FLOPS: dict = {}


def compute_fraction(em, x: Tensor) -> float:
    """Measured FLOPs of the routed forward (routers included) over the dense model's, on x."""
    args, kwargs = _call_kwargs(em, x)
    key = (id(_unwrap(em)), tuple(x.shape))
    if key not in _DENSE_FLOPS:
        with em.routers_disabled():
            _DENSE_FLOPS[key] = measure_flops(em, *args, **kwargs)["total"]
    return measure_flops(em, *args, **kwargs)["total"] / _DENSE_FLOPS[key]


@torch.no_grad()
def evaluate_vit(em, pixels: Tensor, labels: Tensor | None = None, probe=None, batch_size: int = 32,
                 teacher: tuple[Tensor, Tensor] | None = None, measure: bool = True) -> dict:
    """Student vs teacher on images: teacher agreement (top-1 of the logits), KL, feature cosine,
    accuracy of both when labels are given, and the measured compute fraction."""
    t_hidden, t_logits = teacher if teacher is not None else teacher_outputs(em, pixels, probe, batch_size)
    hs, ls = [], []
    for chunk in pixels.split(batch_size):
        h, logits = vit_outputs(em, chunk, probe)
        hs.append(h)
        ls.append(logits if logits is not None else h.new_zeros(len(h), 0))
    s_hidden, s_logits = torch.cat(hs), torch.cat(ls)
    out = {"cosine": F.cosine_similarity(s_hidden, t_hidden, dim=-1).mean().item(), "n": len(pixels)}
    if measure:
        out["compute"] = compute_fraction(em, pixels[:min(len(pixels), 4)])
    if t_logits.numel():
        out.update(agreement=(s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item(),
                   kl=kl_loss(s_logits, t_logits).item())
        if labels is not None:
            out.update(accuracy=(s_logits.argmax(-1) == labels).float().mean().item(),
                       teacher_accuracy=(t_logits.argmax(-1) == labels).float().mean().item())
    return out


# ---------------------------------------------------------------- data domains
def domain(name: str, split: str, n: int, seed: int = 0) -> tuple[list | np.ndarray, Tensor | None]:
    """(uint8 images, labels or None) of a named domain. digits04 / digits59: the handwritten digits of
    classes 0-4 / 5-9 (train: the first 400 of each class, test: the last 100); photos: random square
    crops of scikit-image's photos (train crops from even-numbered photos, test from odd ones)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(seed + (split == "test"))
    if name in ("digits04", "digits59", "digits"):
        images, labels = data.digits()
        idx = rng.permutation(dinov2.digit_split(labels)[split == "test"])
        classes = {"digits04": range(5), "digits59": range(5, 10), "digits": range(10)}[name]
        per_class = math.ceil(n / len(classes))
        pick = np.sort(np.concatenate([idx[labels[idx] == c][:per_class] for c in classes]))[:n]
        return images[pick], torch.from_numpy(labels[pick])
    if name == "photos":
        pool = [p["image"] for p in data.photos()][split == "test"::2]
        crops = []
        for _ in range(n):
            im = pool[rng.integers(len(pool))]
            s = int(rng.integers(min(im.shape[:2]) // 4, min(im.shape[:2]) + 1))
            y, x = rng.integers(0, im.shape[0] - s + 1), rng.integers(0, im.shape[1] - s + 1)
            crops.append(np.ascontiguousarray(im[y:y + s, x:x + s]))
        return crops, None
    raise ValueError(f"unknown domain {name!r}; allowed: digits04, digits59, digits, photos")


def load_dinov2(routers: str | Path | None = None, config: dict | None = None):
    """(elastic DINOv2-S, digit probe): with shipped routers, or fresh ones for config capacities."""
    model = dinov2.load_hf()
    em = load_routers(model, routers) if routers else elastify(model, ElasticConfig(**(config or DEFAULT_CAPS)))
    return em, dinov2.load_probe()


def pixels(images, size: int = SIZE) -> Tensor:
    """Images (uint8 arrays, a gray stack [N, H, W] included) as DINOv2 inputs [N, 3, size, size]."""
    if isinstance(images, np.ndarray) and images.ndim == 3:  # a stack of gray images
        images = list(images)
    return dinov2.preprocess(images, size)


class ViTTask:
    """ViT quality on held-out images: agreement of a probe's (or the model's own head's) top-1 with
    the teacher's, accuracy when labels are given, and cosine of the final hidden states."""

    higher_is_better = True

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor | None = None, probe=None, batch_size: int = 32):
        if not torch.is_tensor(pixels) or pixels.dim() != 4 or not bool(torch.isfinite(pixels).all()):
            raise ValueError("ViTTask takes finite preprocessed images [N, 3, H, W]")
        self.pixels, self.labels, self.probe, self.batch_size = pixels, labels, probe, batch_size
        self.teacher = None
        self.metric = "agreement"

    def measure_input(self, em):
        return _call_kwargs(em, self.pixels[:4])

    @torch.no_grad()
    def evaluate(self, em) -> dict:
        if self.teacher is None:
            self.teacher = teacher_outputs(em, self.pixels, self.probe, self.batch_size)
            if not self.teacher[1].numel():
                self.metric = "cosine"
        r = evaluate_vit(em, self.pixels, self.labels, self.probe, self.batch_size, teacher=self.teacher,
                         measure=False)
        return {"quality": r[self.metric], **r}

    def distance(self, em) -> float:
        """1 - cosine of the final hidden states with the teacher's (what ``budget.allocate`` minimises)."""
        return 1.0 - self.evaluate(em)["cosine"]
