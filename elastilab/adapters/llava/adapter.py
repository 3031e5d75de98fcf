"""LLaVA-1.5 family (``LlavaForConditionalGeneration`` with a Llama-family language model): the LM's
blocks as in llama.py; the image-token router lives in ``elastilab.adapters.llava.model.ElasticLlava``."""
from __future__ import annotations

from elastilab.adapters.base import register
from elastilab.adapters.llama import LlamaAdapter
from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS, VISUAL_COMPONENTS


@register
class LlavaAdapter(LlamaAdapter):
    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    components = LAYER_COMPONENTS + GATED_COMPONENTS + VISUAL_COMPONENTS
    kind = "vlm"
    #: ElasticLlava, set by elastilab.adapters.llava.model (which the package imports): it builds on
    #: ElasticModel, whose module imports the adapters, so it points at this adapter, not the reverse
    elastic_class = None

    def language_model(self, model):
        """The inner decoder (a LlamaModel) that ElasticLlava runs on the merged embeddings."""
        return model.model.language_model

    def layers(self, model):
        return self.language_model(model).layers

    def final_norm(self, model):
        return self.language_model(model).norm

    def hidden_size(self, model):
        return model.config.text_config.hidden_size
