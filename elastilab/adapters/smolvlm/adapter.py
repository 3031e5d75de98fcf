"""SmolVLM and Idefics3 (``SmolVLMForConditionalGeneration``, ``Idefics3ForConditionalGeneration``): a SigLIP
tower on image tiles, a pixel-shuffle connector (scale_factor**2 patches -> one token, a bias-free Linear) and a
Llama-family language model (``model.model.text_model``).

The LM's blocks route as llama.py's; the image-token choice (which connector tokens the LM sees) lives in
``elastilab.adapters.smolvlm.model.ElasticSmolVLM``. The tower is not part of the VLM's elastic model: it routes on
its own through the SigLIP adapter (``elastify(vlm.model.vision_model, ...)``, class ``*VisionTransformer``)."""
from __future__ import annotations

from elastilab.adapters.base import register
from elastilab.adapters.llama import LlamaAdapter
from elastilab.adapters.llava.adapter import LlavaAdapter
from elastilab.adapters.siglip import SiglipVisionAdapter
from elastilab.adapters.vit import check_image


@register
class SmolVLMAdapter(LlavaAdapter):
    name = "smolvlm"
    model_classes = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
    elastic_class = None  # ElasticSmolVLM, set by elastilab.elastic_smolvlm (as llava.py's)

    def language_model(self, model):
        lm = model.model.text_model
        if type(lm).__name__ not in LlamaAdapter.model_classes:
            raise TypeError(f"{type(model).__name__} with a {type(lm).__name__} language model: elastilab routes "
                            f"the LM through its llama adapter, which takes {', '.join(LlamaAdapter.model_classes)}")
        return lm


@register
class SmolVLMVisionAdapter(SiglipVisionAdapter):
    """The VLM's SigLIP tower alone: SigLIP's encoder layers behind NaViT-style embeddings that take any image
    up to ``image_size`` (and a ``patch_attention_mask`` for padded tiles)."""
    name = "smolvlm_vision"
    model_classes = ("SmolVLMVisionTransformer", "Idefics3VisionTransformer")

    def check_inputs(self, model, args, kwargs):
        cfg = model.config
        x = kwargs.get("pixel_values", args[0] if args else None)
        check_image(x, cfg.num_channels, (cfg.patch_size,) * 2, None, type(model).__name__)
        if max(x.shape[-2:]) > cfg.image_size:
            raise ValueError(f"{type(model).__name__} takes tiles of at most {cfg.image_size}x{cfg.image_size} px "
                             f"(its position grid), got {x.shape[-2]}x{x.shape[-1]}; split the image into tiles")
