"""LLaVA-1.5 family (``LlavaForConditionalGeneration`` with a Llama-family language model): the LM's
blocks as in llama.py; the ``visual_tokens`` router lives in ``elastilab.vlm.ElasticLlava``."""
from __future__ import annotations

from ..config import LAYER_COMPONENTS
from .base import register
from .llama import LlamaAdapter


@register
class LlavaAdapter(LlamaAdapter):
    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    components = LAYER_COMPONENTS + ("visual_tokens",)

    @property
    def elastic_class(self):
        """What ``elastify`` wraps a LLaVA in (imported on use: elastilab.vlm imports the adapters)."""
        from ..vlm import ElasticLlava
        return ElasticLlava

    def layers(self, model):
        return model.model.language_model.layers

    def hidden_size(self, model):
        return model.config.text_config.hidden_size
