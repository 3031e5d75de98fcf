"""Threshold mode's calibration: each token router in use gets the quantile table of the scores it gives
on sample text, so a threshold keeps the target fraction of tokens (``ElasticModel.calibrate``)."""
from __future__ import annotations

import torch

from elastilab.core.trace import RoutingTrace


@torch.no_grad()
def calibrate(em, input_ids: torch.Tensor, batch_size: int = 4):
    """Fill the score-quantile table of each token router in use (capacity below 1.0) from sample
    text, so threshold mode keeps the target fraction. Scores are recorded while running top-k
    routing at the current capacities, i.e. on the hidden states the routed model really produces."""
    mode = em.elastic_config.mode
    em.set_mode("topk")
    scores: dict[tuple[int, str], list] = {}
    no_cache = {"use_cache": False} if em.adapter.causal else {}  # no prompt into a cache (ElasticConfig.prefill)
    try:
        for chunk in input_ids.split(batch_size):
            em.model(chunk.to(em.device), **no_cache)
            for key, d in RoutingTrace.of(em).items():
                if d.kind == "tokens":
                    scores.setdefault(key, []).append(d.scores.flatten())
    finally:
        em.set_mode(mode)
    if not scores:
        raise RuntimeError("no token router was routing during calibration (every token capacity 1.0?); "
                           "calibrate at a capacity below 1.0")
    blocks = {b.layer_idx: b for b in em.blocks}
    for (layer, comp), s in scores.items():  # the routers in use; the others keep their tables (NaN: refused)
        blocks[layer].routers[comp].set_quantiles(torch.cat(s))
    return em
