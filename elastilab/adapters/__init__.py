"""One small adapter per model family: where its blocks are and how to read their weights.

Every adapter registered here runs through the same invariant tests (tests/test_invariants.py).
"""
from __future__ import annotations

from elastilab.adapters import (  # noqa: F401  (registration)
    gemma,
    gpt2,
    hf_vit,
    llama,
    olmo2,
    phi3,
    siglip,
    siglip2,  # noqa: F401  (registration)
    vit,
)
from elastilab.adapters.base import REGISTRY, Adapter, Call, register
from elastilab.adapters.llava import adapter as llava  # noqa: F401  (registration)
from elastilab.adapters.smolvlm import adapter as smolvlm  # noqa: F401  (registration)


def find_adapter(model) -> Adapter:
    for adapter in REGISTRY.values():
        if adapter.matches(model):
            return adapter
    supported = "; ".join(f"{a.name}: {', '.join(a.model_classes)}" for a in REGISTRY.values())
    raise TypeError(f"elastilab has no adapter for {type(model).__name__}. Supported: {supported}")


__all__ = ["Adapter", "Call", "REGISTRY", "register", "find_adapter"]
