"""Oracle-supervised warm start of the routers (issue 10, lever a): fit each router to the oracle's
ranking of its candidates, measured on dense forward passes only (no backpropagation through the
model). A router is linear, so the fit is one ridge regression per layer and component: seconds, where
self-distillation takes many forward + backward passes. Distillation can start from the result."""
from __future__ import annotations

import torch

from elastilab.core.components import COMPONENTS
from elastilab.core.config import LAYER_COMPONENTS
from elastilab.scorers import Candidates, get_scorer

#: just below 1: the component runs routed (so the scorer is asked) but keeps every candidate
#: (routing.n_kept rounds up: all of n for any n below 10**7)
_ALL_KEPT = 1.0 - 1e-7


@torch.no_grad()
def warm_start(em, inputs: torch.Tensor, components=None, scorer="oracle", batch_size: int = 4,
               ridge: float = 1e-2) -> dict[str, float]:
    """Set the routers of ``components`` (default: every routed one) to the ridge-regression fit of
    log(scorer's score) from the router's input, centred per candidate set (only the ranking
    matters), on ``inputs`` (token ids [N, T] or pixel values [N, C, H, W]; the model's calibration
    data, never the data a frontier reports). Every candidate is kept while measuring, so each layer
    sees the dense model's hidden states. Returns {component: R² of the fit, averaged over layers}."""
    comps = [c for c in (components or em.capacities) if c in LAYER_COMPONENTS]
    missing = [c for c in comps if c not in em.capacities]
    if missing or not comps:
        raise ValueError(f"warm_start fits routers of {', '.join(LAYER_COMPONENTS)} that are elastic here "
                         f"(elastic: {', '.join(em.capacities)}); got {list(components or [])}")
    if not torch.is_tensor(inputs) or inputs.dim() < 2 or len(inputs) == 0:
        raise ValueError("inputs must be a non-empty batch tensor: token ids [N, T] or pixel values [N, C, H, W]")
    samples: dict = {}
    s = get_scorer(scorer)

    def record(layer: int, args, scores):  # the Scoring slot of one block: its candidates and their scores
        c: Candidates = args[0]
        h, y = c.h, scores
        if c.valid is not None:  # attention rows: padding rows are not candidates
            h, y = h[c.valid], y[c.valid]
        y = torch.log(y.float().clamp_min(1e-8))
        if COMPONENTS[c.component].kind == "tokens":  # one score per token: rank within the sequence
            y = (y - y.mean(-1, keepdim=True)).reshape(-1, 1)
        else:  # one score per head / slice: rank within the row
            y = y.reshape(-1, y.shape[-1])
            y = y - y.mean(-1, keepdim=True)
        samples.setdefault((layer, c.component), []).append((h.reshape(-1, h.shape[-1]).double(), y.double()))

    hooks = []
    for b in em.blocks:
        hooks.append(b.scoring.register_forward_hook(lambda m, args, out, i=b.layer_idx: record(i, args, out)))
    mode = em.elastic_config.mode
    try:
        em.set_mode("topk")
        for comp in comps:  # one component at a time: the others dense, as the frontier measures them
            with em.capacity(**{c: 1.0 for c in em.capacities}), em.capacity(**{comp: _ALL_KEPT}), em.scoring(s):
                for chunk in inputs.split(batch_size):
                    em(chunk.to(em.device)) if inputs.dtype == torch.long else em(pixel_values=chunk.to(em.device))
    finally:
        for h in hooks:
            h.remove()
        em.set_mode(mode)
    fit: dict[str, list[float]] = {}
    for b in em.blocks:
        for comp in comps:
            if (b.layer_idx, comp) not in samples:
                continue
            fit.setdefault(comp, []).append(_ridge_fit(b.routers[comp].proj, samples[(b.layer_idx, comp)], ridge))
    return {c: sum(v) / len(v) for c, v in fit.items()}


def _ridge_fit(proj, samples: list, ridge: float) -> float:
    """Set the router's Linear to the ridge fit of the scores y from its inputs x (pairs of [n, d], [n, k]);
    returns the fit's R²."""
    X = torch.cat([x for x, _ in samples])
    Y = torch.cat([y for _, y in samples])
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    lam = ridge * Xc.pow(2).sum(0).mean()
    W = torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(X.shape[1], dtype=X.dtype), Xc.T @ Yc)  # [d, n]
    proj.weight.copy_(W.T.to(proj.weight.dtype))
    proj.bias.copy_((my - mx @ W).to(proj.bias.dtype))
    resid = (Yc - Xc @ W).pow(2).sum()
    return float(1 - resid / Yc.pow(2).sum().clamp_min(1e-12))
