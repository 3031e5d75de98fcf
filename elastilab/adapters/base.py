"""The adapter contract: every hook the library calls on an adapter, declared here with its default.

A family's adapter overrides ``layers``, ``block_spec`` and ``parse_call`` (required) and whichever
other hook differs from the default; code outside ``adapters/`` calls ``adapter.<hook>`` directly,
never through getattr/hasattr.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS
from elastilab.core.spec import BlockSpec

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
    """One instance per family (in REGISTRY), shared by every model of it: keep no per-model state."""

    name = "base"
    model_classes: tuple[str, ...] = ()   # class names of the models this adapter accepts
    causal = True                         # False: bidirectional attention (ViTs)
    #: the model kind scorers declare support for (``scorers.base.KINDS``): "lm" (causal), "vit"
    #: (bidirectional), "vlm" (a visual-language model whose image tokens a scorer may choose)
    kind = property(lambda self: "lm" if self.causal else "vit")
    #: components this family supports: every per-layer one (a VLM's image tokens are its elastic model's)
    components = LAYER_COMPONENTS + GATED_COMPONENTS
    #: why each component left out of ``components`` is not supported (elastify's error says it)
    why_not: dict[str, str] = {}
    #: the ElasticModel subclass ``elastify`` wraps this family in; None: ElasticModel itself (a
    #: subclass cannot be named here: its module imports elastic, which imports the adapters)
    elastic_class: type | None = None

    # -- required ------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's transformer blocks, in order (the list ElasticBlocks are put into)."""
        raise NotImplementedError

    def block_spec(self, layer: nn.Module, layer_idx: int) -> BlockSpec:
        """The block's norms and weights as the routed path reads them (views, never copies)."""
        raise NotImplementedError

    def parse_call(self, args: tuple, kwargs: dict) -> Call:
        """What the model passed to one of its blocks."""
        raise NotImplementedError

    # -- defaults ------------------------------------------------------------------------------
    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    def pack_output(self, hidden: Tensor, args: tuple, kwargs: dict):
        """A block's output as the model expects it back (default: the hidden states alone)."""
        return hidden

    def hidden_size(self, model: nn.Module) -> int:
        return model.config.hidden_size

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The module whose output is the final hidden state [B, T, d] (the last norm)."""
        raise NotImplementedError(f"the {self.name} adapter does not name its model's final norm")

    def check_inputs(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Raise a clear error for inputs the model cannot take, before it fails deep inside
        (default: no check; ViTs check image size, channels and finiteness)."""

    def prefix_tokens(self, model: nn.Module) -> int:
        """Tokens in front of the content (CLS + registers for ViTs; default none)."""
        return 0

    def has_cls(self, model: nn.Module) -> bool:
        """Whether position 0 is a CLS token (probe features, CLS-attention scoring; default no)."""
        return False

    @staticmethod
    def bool_mask(mask: Tensor | None) -> Tensor | None:
        """The model's 4-D mask as bool (True = may attend), whatever form transformers chose."""
        if mask is None or not torch.is_tensor(mask):
            return None
        return mask if mask.dtype == torch.bool else mask == 0
