"""The router checkpoint format: a folder holding routers.safetensors (the router weights, fp32) and
routers.json (the ElasticConfig, the base model's fingerprint, parameter counts, metadata), written
as a pair and validated on reading. ``ElasticModel.save_routers`` and ``load_routers`` use it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from elastilab.core.config import ElasticConfig
from elastilab.files import atomic_files, current_files

ROUTERS_FILE, META_FILE = "routers.safetensors", "routers.json"
CHECKPOINT_TAG = "routers"  # names the pair's temporary files: .routers.*.tmp, .routers.pending


def write_checkpoint(path: str | os.PathLike, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """routers.safetensors + routers.json into the folder ``path``, as a pair: a reader (or a run
    killed mid-save) sees both old files or both new ones (``files.atomic_files``)."""
    path = Path(path)
    atomic_files(path, {ROUTERS_FILE: lambda f: save_file(tensors, f),
                        META_FILE: lambda f: Path(f).write_text(json.dumps(meta, indent=2))}, tag=CHECKPOINT_TAG)
    return path


def save_routers(em, path: str | os.PathLike, **metadata) -> Path:
    """``em.save_routers``: its trainable state (routers, and a LoRA's factors as "<layer>.lora.*", fp32) and
    what it fits (elastic_config, adapter, model class, fingerprint, parameter counts) with ``metadata``, and
    the recommended points of its whole-model schedule when it has some (``core.recommend``)."""
    meta = {"elastic_config": em.elastic_config.to_dict(), "adapter": em.adapter.name,
            "model_class": type(em.model).__name__, "fingerprint": fingerprint(em.model),
            **em.parameter_summary(), "metadata": metadata}
    if getattr(em, "recommended", None):  # the points chosen per target quality (``core.recommend``)
        meta["recommended"] = em.recommended
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in em.trainable_state().items()}
    return write_checkpoint(path, meta, tensors)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(routers.json as a dict, routers.safetensors as tensors) of the checkpoint folder ``path``,
    validated: readable, the metadata keys present, every tensor floating point and finite."""
    path = Path(path)
    files = current_files(path, (ROUTERS_FILE, META_FILE), tag=CHECKPOINT_TAG)
    if not all(f.is_file() for f in files.values()):
        raise FileNotFoundError(f"{path} holds no router checkpoint (expected {ROUTERS_FILE} and {META_FILE})")
    try:
        meta = json.loads(files[META_FILE].read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / META_FILE} is not valid JSON ({e}); save the routers again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path / META_FILE} must hold a JSON object, got a {type(meta).__name__}")
    missing = [k for k in ("elastic_config", "fingerprint") if k not in meta]
    if missing:
        raise ValueError(f"{path / META_FILE} lacks {missing}: it was not written by ElasticModel.save_routers")
    if not isinstance(meta["elastic_config"], dict) or not isinstance(meta["fingerprint"], str):
        raise ValueError(f"{path / META_FILE}: elastic_config must be an object and fingerprint a string")
    try:
        state = load_file(str(files[ROUTERS_FILE]))
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise ValueError(f"{path / ROUTERS_FILE} is not a readable safetensors file ({e}); "
                         "save the routers again") from None
    for k, v in state.items():
        if not v.is_floating_point():
            raise ValueError(f"router tensor {k!r} in {path / ROUTERS_FILE} is {v.dtype}, not floating point")
        finite = torch.isfinite(v)
        # a token router's quantile table is NaN until calibrate() fills it (all of it, or none)
        if not (finite.all() or (k.endswith("quantiles") and torch.isnan(v).all())):
            raise ValueError(f"router tensor {k!r} in {path / ROUTERS_FILE} holds NaN or infinite values "
                             "(training diverged?); these routers cannot be used")
    return meta, state


def config_of(meta: dict, path, **overrides) -> ElasticConfig:
    try:
        return ElasticConfig.from_dict({**meta["elastic_config"], **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{Path(path) / META_FILE} holds an invalid elastic_config: {e}") from None


#: values sampled from every parameter tensor for the fingerprint
FINGERPRINT_SAMPLES = 64


def fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture (every parameter's name and shape) and of the signs of
    values sampled from every parameter tensor (routers excluded). Signs survive a cast to any
    float dtype (a bf16 or fp16 copy is the same model), while a layer replaced, zeroed or
    retrained changes them; the values themselves would not survive rounding. Routers and LoRA
    factors are left out: they are what the checkpoint holds, not the model it fits."""
    if hasattr(model, "elastic_config"):  # an ElasticModel (not imported here: it builds on this module)
        model = model.model
    params = [(n.replace(".base_layer", ""), p) for n, p in model.named_parameters()
              if ".routers." not in n and ".lora_" not in n]  # the pretrained weights only
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(json.dumps([(n, list(p.shape)) for n, p in params]).encode())
    for _, p in params:
        flat = p.detach().reshape(-1)
        k = min(flat.numel(), FINGERPRINT_SAMPLES)  # evenly spaced, in integers (float32 rounds)
        idx = torch.arange(k, device=flat.device) * max(flat.numel() - 1, 0) // max(k - 1, 1)
        h.update(torch.sign(flat[idx].float()).to(torch.int8).cpu().numpy().tobytes())
    return h.hexdigest()
