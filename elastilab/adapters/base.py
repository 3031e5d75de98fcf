"""The adapter contract: five small functions per model family."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..spec import BlockSpec

REGISTRY: dict[str, "Adapter"] = {}


def register(cls):
    REGISTRY[cls.name] = cls()
    return cls


class Call(NamedTuple):
    hidden: Tensor
    mask: Tensor | None = None   # the model's 4-D attention mask (None: no padding)
    cache: object = None         # a transformers Cache, or None
    rope: tuple | None = None    # (cos, sin) [B, T, hd] for rotary models


class Adapter:
    name = "base"
    model_classes: tuple[str, ...] = ()   # class names of the models this adapter accepts
    causal = True
    #: components this family supports (visual_tokens lives in the VLM wrapper)
    components = ("attn_tokens", "mlp_tokens", "attn_heads", "mlp_experts")

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def block_spec(self, layer: nn.Module, layer_idx: int) -> BlockSpec:
        raise NotImplementedError

    def parse_call(self, args: tuple, kwargs: dict) -> Call:
        raise NotImplementedError

    def pack_output(self, hidden: Tensor, args: tuple, kwargs: dict):
        return hidden

    def hidden_size(self, model: nn.Module) -> int:
        return model.config.hidden_size

    @staticmethod
    def bool_mask(mask: Tensor | None) -> Tensor | None:
        """The model's 4-D mask as bool (True = may attend), whatever form transformers chose."""
        if mask is None or not torch.is_tensor(mask):
            return None
        return mask if mask.dtype == torch.bool else mask == 0
