"""One small adapter per model family: where its blocks are and how to read their weights.

Every adapter registered here runs through the same invariant tests (tests/test_invariants.py).
"""
from __future__ import annotations

from .base import Adapter, Call, REGISTRY, register
from . import llama, gemma, phi3, olmo2, gpt2, vit, hf_vit, siglip, siglip2, llava, smolvlm  # noqa: F401  (registers)


def find_adapter(model) -> Adapter:
    for adapter in REGISTRY.values():
        if adapter.matches(model):
            return adapter
    supported = "; ".join(f"{a.name}: {', '.join(a.model_classes)}" for a in REGISTRY.values())
    raise TypeError(f"elastilab has no adapter for {type(model).__name__}. Supported: {supported}")


__all__ = ["Adapter", "Call", "REGISTRY", "register", "find_adapter"]
