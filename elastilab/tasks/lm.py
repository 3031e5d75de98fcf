"""The language-model task: the distillation loss of a batch of token blocks (``lm_loss``, the default
of ``distill``) and the evaluation against the teacher (perplexities, KL, top-1 agreement)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from elastilab.training.losses import kl_loss


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


class LMTask:
    """Causal LM quality on held-out token blocks [N, T] (``evaluate``); the teacher's logits
    are computed once and reused for every point of a frontier."""

    metric, higher_is_better = "ppl_ratio", False

    def __init__(self, blocks: torch.Tensor, batch_size: int = 4):
        if not torch.is_tensor(blocks) or blocks.dim() != 2 or blocks.dtype != torch.long or len(blocks) == 0:
            raise ValueError("LMTask takes token blocks: a non-empty LongTensor [n_blocks, seq_len]")
        self.blocks, self.batch_size = blocks, batch_size
        self.teacher: list | None = None

    def measure_input(self, em):
        return (self.blocks[:1],), {}

    def evaluate(self, em) -> dict:
        if self.teacher is None:
            self.teacher = teacher_logits(em, self.blocks, self.batch_size)
        r = evaluate(em, self.blocks, self.batch_size, teacher=self.teacher)
        return {"quality": r["ppl_ratio"], **r}

    def distance(self, em) -> float:
        """How far the elastic model is from the teacher: mean KL of the next-token distributions
        (what ``budget.allocate`` minimises)."""
        return self.evaluate(em)["kl"]
