"""Routers trained for a LLaVA's language model *as a text LM* (e.g. data/routers/smollm2-135m for
tiny-llava), loaded into the LLaVA, optionally with a visual-token router of the LLaVA itself."""
from __future__ import annotations

from typing import TYPE_CHECKING

from elastilab.core.checkpoint import config_of, fingerprint, read_checkpoint
from elastilab.core.loading import elastify_with

if TYPE_CHECKING:  # (model.py re-exports this function, so it cannot import model.py at run time)
    from elastilab.adapters.llava.model import ElasticLlava


def load_lm_routers(model, path, visual_tokens: float | None = None, visual_from=None) -> ElasticLlava:
    """A LLaVA with the LM-component routers trained for its language model *as a text LM* (e.g.
    data/routers/smollm2-135m for tiny-llava, whose LM is the same SmolLM2 plus one <image> row),
    optionally with a fresh visual_tokens router. The check is the router layout (layers, components,
    shapes), since the LLaVA's fingerprint differs from the text LM's by construction.
    ``visual_from``: a visual-router checkpoint of this very LLaVA (fingerprint checked) to load too."""
    meta, state = read_checkpoint(path)  # everything is checked before the model is changed
    state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    if visual_from is not None:
        vmeta, vstate = read_checkpoint(visual_from)
        if vmeta["fingerprint"] != fingerprint(model):
            raise ValueError(f"the visual router in {visual_from} was trained for a different model")
        state.update({k: v for k, v in vstate.items() if k.startswith("visual.")})
        if visual_tokens is None:
            visual_tokens = vmeta["elastic_config"].get("visual_tokens")
    config = config_of(meta, path, visual_tokens=visual_tokens)
    keep_fresh_visual = visual_from is None  # a new visual router (if any) keeps its initial weights
    return elastify_with(model, config, state, path,
                         select=lambda k: not (keep_fresh_visual and k.startswith("visual.")))
