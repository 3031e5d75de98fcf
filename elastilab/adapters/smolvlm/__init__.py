"""SmolVLM and Idefics3: the adapter (``adapter``: the Llama-family LM and the SigLIP tower) and the elastic wrapper
choosing image tokens per tile (``model``: builds on ``adapters.llava.model.ElasticLlava``)."""
