"""Elastic vision transformers: distillation loss, trainer, evaluation, baselines, routing maps.

Works for every ViT adapter (timm VisionTransformer, HF ViT / ViT-MAE / DINOv2) and the offline DINOv2-S:

    model = el.zoo.dinov2.load_hf()
    em = el.elastify(model, el.ElasticConfig(attn_tokens=0.5, mlp_tokens=0.5, attn_heads=0.5, mlp_experts=0.5))
    x = el.zoo.dinov2.preprocess(images, size=112)
    log = distill_vit(em, x, probe=el.zoo.dinov2.load_probe(), steps=40)
    evaluate_vit(em, x_test, labels, probe)      # accuracy, teacher agreement, cosine, measured compute

Loss (student vs teacher = the same model with routers disabled): ``cos_weight * (1 - cos)`` +
``mse_weight * relative MSE`` over the final hidden states (CLS and every patch), plus
``kl_weight * KL(teacher || student)`` on the probe's (or the model's own head's) logits.
It runs in distill.py's loop (same capacities, sampling, logs and checkpoints as the LMs).

Baselines at matched measured compute come from the scorer registry (``elastilab.scorers``):
``with em.scoring("random")``, ``"cls_attention"`` (tokens ranked by the attention the CLS token pays
them in that layer; its cost is measured as routing FLOPs), ``"oracle"``, ...

Commands (results go where ``--out`` says: the shipped ones are benchmarks/results/vision.json and
data/routers/dinov2-small-*/):

    python -m elastilab.vision train --domain digits04 --out runs/dinov2-digits04
    python -m elastilab.vision bench --routers data/routers/dinov2-small-digits04 --out runs/vision.json
    python -m elastilab.vision crossdomain --out runs/vision.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LAYER_COMPONENTS, TOKEN_COMPONENTS
from .distill import DistillConfig, distill, kl_loss
from .files import atomic_write

ROOT = Path(__file__).resolve().parent.parent
SIZE = 112  # 8x8 patches of 14 px: the probe's resolution, cheap on a CPU
DOMAINS = ("digits04", "digits59", "photos")
DEFAULT_CAPS = dict(attn_tokens=0.5, mlp_tokens=0.5, attn_heads=0.5, mlp_experts=0.5)


def check_components(components) -> tuple[str, ...]:
    """The components a ViT routes, validated: a non-empty subset of DEFAULT_CAPS, in order, no repeats."""
    comps = tuple(dict.fromkeys(components))
    allowed = ", ".join(DEFAULT_CAPS)
    bad = [c for c in comps if c not in DEFAULT_CAPS]
    if bad:
        hint = " (visual_tokens belongs to visual-language models: python -m elastilab.vlm)" \
            if "visual_tokens" in bad else ""
        raise ValueError(f"unknown ViT component{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}{hint}; "
                         f"allowed: {allowed}")
    if not comps:
        raise ValueError(f"no component to route; give one or more of: {allowed}")
    return comps


def _components_arg(text: str) -> tuple[str, ...]:
    """argparse type of --components: comma-separated names."""
    try:
        return check_components(c.strip() for c in text.split(",") if c.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------- model plumbing
def _unwrap(model):
    """The plain model inside an ElasticModel / DDP wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "model", model) if hasattr(model, "elastic_config") else model


def _adapter(model):
    from .adapters import find_adapter
    return find_adapter(_unwrap(model))


def _final_norm(model):
    """The module whose output is the final hidden state [B, T, d] (after the last LayerNorm)."""
    inner = _unwrap(model)
    if hasattr(inner, "blocks") and hasattr(inner, "norm"):  # timm VisionTransformer
        return inner.norm
    from .adapters.hf_vit import base_model
    return base_model(inner).layernorm


def _call_kwargs(model, x: Tensor) -> tuple[tuple, dict]:
    inner = _unwrap(model)
    if _adapter(inner).name == "timm_vit":
        return (x,), {}
    kwargs = {"pixel_values": x}
    if "ViTMAE" in type(inner).__name__:  # keep the patch order (MAE shuffles patches by random noise)
        n = math.prod(s // p for s, p in zip(x.shape[-2:], _patch(inner)))
        kwargs["noise"] = torch.arange(n, device=x.device, dtype=x.dtype).expand(len(x), n)
    return (), kwargs


def _patch(inner) -> tuple[int, int]:
    if hasattr(inner, "patch_embed"):
        return tuple(inner.patch_embed.patch_size)
    from .adapters.hf_vit import base_model
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
    data = torch.utils.data.TensorDataset(pixels, *teacher_outputs(em, pixels, probe)) if cache_teacher \
        else torch.utils.data.TensorDataset(pixels)
    loss = ViTLoss(probe, cos_weight, mse_weight, kl_weight)
    return distill(em, data, config, loss_fn=loss, **overrides)


# ---------------------------------------------------------------- evaluation
_DENSE_FLOPS: dict = {}


def compute_fraction(em, x: Tensor) -> float:
    """Measured FLOPs of the routed forward (routers included) over the dense model's, on x."""
    from .compute import measure_flops
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


# ---------------------------------------------------------------- routing maps and usage
@torch.no_grad()
def routing_maps(em, x: Tensor) -> dict[str, np.ndarray]:
    """After one forward on x: for each token component, keep masks [layers, B, patches] (bool, prefix
    tokens dropped); a layer whose router is off (capacity 1.0, dense layer) shows every patch kept."""
    hidden, _ = vit_outputs(em, x)
    P, (B, T) = prefix_tokens(em), hidden.shape[:2]
    layers = em.adapter.layers(em.model)
    out = {}
    for comp in TOKEN_COMPONENTS:
        if comp in em.capacities:
            maps = np.ones((len(layers), B, T - P), bool)
            for b in em.blocks:
                if comp in b.aux:
                    maps[b.layer_idx] = b.aux[comp][1][:, P:].cpu().numpy()
            out[comp] = maps
    return out


@torch.no_grad()
def slot_usage(em, x: Tensor) -> dict[str, np.ndarray]:
    """After one forward on x: fraction of tokens choosing each head [layers, H] / expert [layers, E]."""
    vit_outputs(em, x)
    out = {}
    for comp in ("attn_heads", "mlp_experts"):
        rows = [torch.bincount(b.aux[comp][1].reshape(-1), minlength=b.routers[comp].proj.out_features).float()
                / len(b.aux[comp][1]) for b in em.blocks if comp in b.aux]
        if rows:
            out[comp] = torch.stack(rows).numpy()
    return out


def overlay(ax, image: np.ndarray, keep: np.ndarray, title: str = "", size: int = SIZE):
    """Draw image (uint8 HxW[xC]) resized to size, darkening the patches that were skipped."""
    from PIL import Image
    im = np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.BILINEAR))
    g = int(round(math.sqrt(keep.size)))
    mask = np.kron(keep.reshape(g, g), np.ones((size // g, size // g)))[..., None]
    ax.imshow((im * (0.25 + 0.75 * mask)).astype(np.uint8))
    ax.set_title(title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])


# ---------------------------------------------------------------- data domains
def domain(name: str, split: str, n: int, seed: int = 0) -> tuple[list | np.ndarray, Tensor | None]:
    """(uint8 images, labels or None) of a named domain. digits04 / digits59: the handwritten digits of
    classes 0-4 / 5-9 (train: the first 400 of each class, test: the last 100); photos: random square
    crops of scikit-image's photos (train crops from even-numbered photos, test from odd ones)."""
    from .data import digits, photos
    from .zoo.dinov2 import digit_split
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(seed + (split == "test"))
    if name in ("digits04", "digits59", "digits"):
        images, labels = digits()
        idx = rng.permutation(digit_split(labels)[split == "test"])
        classes = {"digits04": range(5), "digits59": range(5, 10), "digits": range(10)}[name]
        per_class = math.ceil(n / len(classes))
        pick = np.sort(np.concatenate([idx[labels[idx] == c][:per_class] for c in classes]))[:n]
        return images[pick], torch.from_numpy(labels[pick])
    if name == "photos":
        pool = [p["image"] for p in photos()][split == "test"::2]
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
    from .elastic import ElasticConfig, elastify, load_routers
    from .zoo import dinov2
    model = dinov2.load_hf()
    em = load_routers(model, routers) if routers else elastify(model, ElasticConfig(**(config or DEFAULT_CAPS)))
    return em, dinov2.load_probe()


def pixels(images, size: int = SIZE) -> Tensor:
    from .zoo.dinov2 import preprocess
    if isinstance(images, np.ndarray) and images.ndim == 3:  # a stack of gray images
        images = list(images)
    return preprocess(images, size)


# ---------------------------------------------------------------- commands
def train(domain_name: str, out: str, n: int = 256, steps: int = 40, batch_size: int = 8, lr: float = 2e-2,
          capacity_range=(0.5, 1.0), components_per_step: int | None = 1, components=tuple(DEFAULT_CAPS),
          seed: int = 0, command: str = "") -> dict:
    """Distill the four routers of DINOv2-S on one domain; each step routes one random component at a
    random capacity in capacity_range (the others at 1.0), so each slider is trained where it is used."""
    components = check_components(components)
    torch.manual_seed(seed)
    em, probe = load_dinov2(config={c: DEFAULT_CAPS[c] for c in components})
    images, _ = domain(domain_name, "train", n, seed)
    x = pixels(images)
    t0 = time.perf_counter()
    log = distill_vit(em, x, probe, steps=steps, batch_size=batch_size, lr=lr, capacity_range=capacity_range,
                      components_per_step=components_per_step, seed=seed, progress=False)
    info = {"domain": domain_name, "components": list(components), "images": n, "steps": steps, "batch_size": batch_size, "lr": lr,
            "capacity_range": list(capacity_range), "components_per_step": components_per_step, "size": SIZE, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": float(log.loss.tail(5).mean()), "first_loss": float(log.loss.head(5).mean()),
            "command": command}
    em.save_routers(out, **info)
    log.to_csv(Path(out) / "log.csv", index=False)
    return info


def _update_results(out, key: str, value) -> None:
    """Set ``key`` of the results JSON ``out`` (other keys kept); ``out=None`` writes nothing."""
    if out is None:
        return
    out = Path(out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[key] = value
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def bench(routers: str, n: int = 16, caps=(0.75, 0.5), command: str = "", out=None) -> list[dict]:
    """Per component, at each capacity: learned vs random vs CLS attention (tokens) on held-out digits;
    the rows are returned, and stored under "bench" in the JSON file ``out`` if given."""
    em, probe = load_dinov2(routers)
    images, labels = domain("digits", "test", n)
    x = pixels(images)
    teacher = teacher_outputs(em, x, probe)
    rows = []
    base = {c: 1.0 for c in em.capacities}
    for comp in em.capacities:
        for cap in caps:
            em.set_capacity(**{**base, comp: cap})
            for method in ("learned", "random") + (("cls_attention",) if comp in TOKEN_COMPONENTS else ()):
                with em.scoring(method):
                    r = evaluate_vit(em, x, labels, probe, teacher=teacher)
                rows.append({"component": comp, "capacity": cap, "method": method, **r})
                print(json.dumps(rows[-1]))
    em.set_capacity(**base)
    rows.append({"component": "all", "capacity": 1.0, "method": "learned",
                 **evaluate_vit(em, x, labels, probe, teacher=teacher)})
    _update_results(out, "bench", {"routers": os.path.relpath(routers, ROOT), "eval": f"{n} held-out digits (all 10 classes), {SIZE}px",
                              "command": command, "rows": rows})
    return rows


def crossdomain(n: int = 24, caps: dict | None = None, command: str = "", out=None) -> list[dict]:
    """Routers trained on each domain, evaluated on every domain at the same capacities; random
    routing (``trained_on="random"``) as the floor. Stored under "crossdomain" in ``out`` if given."""
    caps = caps or {"attn_tokens": 1.0, "mlp_tokens": 1.0, "attn_heads": 1.0, "mlp_experts": 0.75}
    tests = {d: domain(d, "test", n) for d in DOMAINS}
    rows = []
    for trained in (*DOMAINS, "random"):
        path = ROOT / "data" / "routers" / f"dinov2-small-{DOMAINS[0] if trained == 'random' else trained}"
        em, probe = load_dinov2(path)
        em.set_capacity(**caps)
        for target, (images, labels) in tests.items():
            with em.scoring("random" if trained == "random" else "learned"):
                r = evaluate_vit(em, pixels(images), labels, probe)
            rows.append({"trained_on": trained, "evaluated_on": target, **r})
            print(json.dumps(rows[-1]))
    _update_results(out, "crossdomain", {"capacities": caps, "eval": f"{n} test images per domain, {SIZE}px",
                                    "command": command, "rows": rows})
    return rows


def main(argv=None) -> None:
    import sys
    parser = argparse.ArgumentParser(prog="python -m elastilab.vision", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="distill DINOv2-S routers on one image domain")
    p.add_argument("--domain", choices=DOMAINS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--components", type=_components_arg, default=tuple(DEFAULT_CAPS),
                   help=f"comma-separated components to route, from {','.join(DEFAULT_CAPS)} (default: all)")
    p = sub.add_parser("bench", help="learned vs random vs CLS-attention routing per component")
    p.add_argument("--routers", default=str(ROOT / "data" / "routers" / "dinov2-small-digits04"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--out", required=True, help="results JSON (its \"bench\" key is replaced, others kept)")
    p = sub.add_parser("crossdomain", help="routers of each domain evaluated on every domain")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--out", required=True, help="results JSON (its \"crossdomain\" key is replaced, others kept)")
    args = parser.parse_args(argv)
    command = "python -m elastilab.vision " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.cmd == "train":
        print(json.dumps(train(args.domain, args.out, args.images, args.steps, args.batch_size, args.lr,
                               components=args.components, command=command), indent=1))
    elif args.cmd == "bench":
        bench(args.routers, args.images, command=command, out=args.out)
    else:
        crossdomain(args.images, command=command, out=args.out)


if __name__ == "__main__":
    main()
