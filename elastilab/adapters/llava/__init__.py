"""LLaVA-style models: the adapter (``adapter``), the elastic wrapper with visual-token routing (``model``)
and the language model's routed components (``lm``). ``model`` is imported lazily, by ``elastify``."""
