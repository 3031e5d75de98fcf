"""The language-model task: the distillation loss of a batch of token blocks (``lm_loss``, the default
of ``distill``) and the evaluation against the teacher (perplexities, KL, top-1 agreement)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import kl_loss


def lm_loss(em, wrapped, ids: Tensor, cfg) -> tuple[Tensor, dict]:
    """One LM batch: KL(teacher || student) over next-token distributions, and top-1 agreement.
    ``cfg``: the ``DistillConfig`` (its temperature)."""
    with torch.no_grad(), em.routers_disabled():
        teacher = em(ids, use_cache=False).logits
    student = wrapped(ids, use_cache=False).logits
    kl = kl_loss(student, teacher, cfg.temperature)
    agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    return kl, {"kl": kl.detach().item(), "agreement": agree.item()}


def safe_exp(x: float) -> float:
    """exp that gives inf instead of raising OverflowError (a broken model's perplexity)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate(em, blocks: Tensor, batch_size: int = 4, teacher: list[Tensor] | None = None) -> dict:
    """Teacher and student perplexity, KL and top-1 agreement on token blocks [N, T]. ``teacher``:
    the teacher's logits per batch (``teacher_logits``), to reuse them over many evaluations."""
    nll_t = nll_s = kl = agree = 0.0
    n_tok = 0
    for i, ids in enumerate(blocks.split(batch_size)):
        ids = ids.to(em.device)
        t = teacher[i] if teacher is not None else teacher_logits(em, ids, len(ids))[0]
        s = em(ids).logits[:, :-1].float()
        target = ids[:, 1:]
        n = target.numel()
        nll_t += F.cross_entropy(t.reshape(-1, t.shape[-1]), target.reshape(-1), reduction="sum").item()
        nll_s += F.cross_entropy(s.reshape(-1, s.shape[-1]), target.reshape(-1), reduction="sum").item()
        kl += kl_loss(s, t).item() * n
        agree += (s.argmax(-1) == t.argmax(-1)).float().sum().item()
        n_tok += n
    return {"teacher_ppl": safe_exp(nll_t / n_tok), "student_ppl": safe_exp(nll_s / n_tok),
            "ppl_ratio": safe_exp((nll_s - nll_t) / n_tok),  # finite even where both perplexities overflow
            "kl": kl / n_tok, "agreement": agree / n_tok, "tokens": n_tok}


@torch.no_grad()
def teacher_logits(em, blocks: Tensor, batch_size: int = 4) -> list[Tensor]:
    """The frozen model's next-token logits [b, T-1, V] for each batch of token blocks."""
    with em.routers_disabled():
        return [em(ids.to(em.device)).logits[:, :-1].float() for ids in blocks.split(batch_size)]
