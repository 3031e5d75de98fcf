"""SmolVLM and Idefics3: the adapter (``adapter``: the Llama-family LM and the SigLIP tower) and the elastic wrapper
with ``visual_tokens`` per tile (``model``: builds on ``adapters.llava.model.ElasticLlava``)."""
