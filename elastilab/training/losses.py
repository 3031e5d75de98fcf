"""The distillation objective every task shares: KL(teacher || student) between output distributions,
and the routers' auxiliary losses that ``distill`` adds to each task's loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from elastilab.core.trace import RoutingTrace


def kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
            mask: Tensor | None = None) -> Tensor:
    """KL(teacher || student) per token, averaged over tokens (optionally only where mask)."""
    t = temperature
    logp_s = F.log_softmax(student_logits.float() / t, -1)
    logp_t = F.log_softmax(teacher_logits.float() / t, -1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1) * t * t
    return kl.mean() if mask is None else kl[mask].mean()


def router_aux_losses(em) -> tuple[Tensor, Tensor]:
    """(top-k BCE of token routers, load-balance loss of head/expert routers), averaged over layers."""
    bce, bal, n_bce, n_bal = 0.0, 0.0, 0, 0
    for d in RoutingTrace.of(em).values():  # the last forward's own tensors: scores carry the gradient
        if d.kind == "tokens":
            bce = bce + F.binary_cross_entropy_with_logits(d.scores.float(), d.chosen.float())
            n_bce += 1
        elif d.kind == "params":
            frac = torch.bincount(d.chosen.reshape(-1), minlength=d.n_slots).float() / d.chosen.numel()
            bal = bal + d.n_slots * (frac * d.scores.float().softmax(-1).mean(0)).sum()
            n_bal += 1
    zero = torch.zeros((), device=em.device)
    return (bce / n_bce if n_bce else zero), (bal / n_bal if n_bal else zero)
