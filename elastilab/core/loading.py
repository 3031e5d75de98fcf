"""Routers from a checkpoint into a model, all or nothing: ``load_routers`` (checked against the
model's fingerprint) and ``elastify_with`` (any router state, e.g. a VLM's LM routers)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from elastilab.core.checkpoint import ROUTERS_FILE, config_of, fingerprint, read_checkpoint
from elastilab.core.config import GATED_COMPONENTS, ElasticConfig
from elastilab.core.model import ElasticModel, elastify


def elastify_with(model: nn.Module, config: ElasticConfig, state: dict[str, torch.Tensor], path,
                  select=lambda name: True) -> ElasticModel:
    """``elastify(model, config)`` with its routers (those ``select`` names) set from ``state``,
    whose names and shapes must match exactly; on any failure the model is left as it was."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    em = elastify(model, config)
    try:
        own = {k: v for k, v in em.trainable_state().items() if select(k)}  # routers and LoRA factors
        if set(state) != set(own):
            raise ValueError(
                f"router checkpoint {path} does not match the elastic layout of this model (missing "
                f"{sorted(set(own) - set(state))[:3]}, unexpected {sorted(set(state) - set(own))[:3]})")
        for k, v in own.items():
            if state[k].shape != v.shape:
                raise ValueError(f"router tensor {k!r} in {Path(path) / ROUTERS_FILE} has shape "
                                 f"{list(state[k].shape)}, but this model needs {list(v.shape)}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])
    except BaseException:
        em.unelastify()
        for p, g in grads:
            p.requires_grad_(g)
        raise
    return em


def load_routers(model: nn.Module, path: str | os.PathLike, strict_fingerprint: bool = True,
                 add_components=()) -> ElasticModel:
    """Elastify ``model`` with the routers saved in ``path``; refuses routers trained on another model.
    ``add_components``: components that need no router (the gated ones) added at capacity 1.0, to combine
    with the checkpoint's. Everything is checked before the model is changed: on any error it is left as it was."""
    path = Path(path)
    if isinstance(model, ElasticModel):
        raise TypeError("model is already elastic; call .unelastify() first to load other routers into it")
    meta, state = read_checkpoint(path)
    config = config_of(meta, path, **{c: 1.0 for c in add_components if c in GATED_COMPONENTS})
    if other := [c for c in add_components if c not in GATED_COMPONENTS]:
        raise ValueError(f"only components without routers ({', '.join(GATED_COMPONENTS)}) can be added to the "
                         f"routers in {path}, not {', '.join(other)}")
    found = fingerprint(model)
    if strict_fingerprint and meta["fingerprint"] != found:
        raise ValueError(
            f"the routers in {path} were trained for a different model: {meta.get('model_class', '?')} with "
            f"fingerprint {meta['fingerprint'][:12]}, but this is {type(model).__name__} with fingerprint "
            f"{found[:12]}. Load the model they were trained on (or pass strict_fingerprint=False at your own risk).")
    from elastilab.core.recommend import check_recommended
    recommended = check_recommended(meta.get("recommended"), path)
    em = elastify_with(model, config, state, path)
    em.recommended = recommended
    return em
