"""Self-distillation of the routers: the frozen model (routers disabled) teaches the routed one.

Built on Hugging Face Accelerate, so the same loop runs on one CPU, on several processes
(``torchrun --nproc_per_node 2 ...`` or ``accelerate launch``) and on GPUs without code changes.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PARAM_COMPONENTS, TOKEN_COMPONENTS


@dataclass
class DistillConfig:
    steps: int = 200
    batch_size: int = 4            #: global batch (split across processes)
    seq_len: int = 256             #: used when data is text
    lr: float = 2e-3
    weight_decay: float = 0.0
    temperature: float = 1.0       #: softens teacher and student distributions in the KL
    bce_weight: float = 0.1        #: top-k BCE for token routers, so threshold mode tracks top-k
    balance_weight: float = 0.01   #: load balance of head / expert routers (Switch-style)
    #: sample each component's capacity uniformly from this range every step (None: keep fixed),
    #: so one set of routers serves the whole capacity slider
    capacity_range: tuple[float, float] | None = None
    #: route only this many randomly drawn components per step, the others at 1.0 (None: all);
    #: 1 trains each router in the setting it is evaluated in, one component at a time
    components_per_step: int | None = None
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got steps={self.steps}, batch_size={self.batch_size}")
        if self.capacity_range is not None:
            lo, hi = self.capacity_range
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"capacity_range must satisfy 0 < low <= high <= 1, got {self.capacity_range}")
        if self.components_per_step is not None and self.components_per_step < 1:
            raise ValueError(f"components_per_step must be >= 1 or None, got {self.components_per_step}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


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
    for b in em.blocks:
        for comp, (scores, chosen) in b.aux.items():
            if comp in TOKEN_COMPONENTS:
                bce = bce + F.binary_cross_entropy_with_logits(scores.float(), chosen.float())
                n_bce += 1
            elif comp in PARAM_COMPONENTS:
                n = scores.shape[-1]
                frac = torch.bincount(chosen.reshape(-1), minlength=n).float() / chosen.numel()
                bal = bal + n * (frac * scores.float().softmax(-1).mean(0)).sum()
                n_bal += 1
    zero = torch.zeros((), device=em.device)
    return (bce / n_bce if n_bce else zero), (bal / n_bal if n_bal else zero)


def sample_capacities(rng: random.Random, base: dict[str, float], cfg: DistillConfig) -> dict[str, float]:
    comps = list(base)
    k = cfg.components_per_step
    active = set(rng.sample(comps, min(k, len(comps)))) if k else set(comps)
    return {c: (rng.uniform(*cfg.capacity_range) if cfg.capacity_range else base[c]) if c in active else 1.0
            for c in comps}


def lm_loss(em, wrapped, ids: Tensor, cfg: DistillConfig) -> tuple[Tensor, dict]:
    """One LM batch: KL(teacher || student) over next-token distributions, and top-1 agreement."""
    with torch.no_grad(), em.routers_disabled():
        teacher = em(ids, use_cache=False).logits
    student = wrapped(ids, use_cache=False).logits
    kl = kl_loss(student, teacher, cfg.temperature)
    agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    return kl, {"kl": kl.detach().item(), "agreement": agree.item()}


def distill(em, data, config: DistillConfig | None = None, tokenizer=None, accelerator=None, loss_fn=None,
            **overrides) -> pd.DataFrame:
    """Train the routers of ``em`` to match the frozen model; returns the log as a DataFrame.

    data: LongTensor [N, seq_len] of token blocks, or a text (then pass ``tokenizer``).
    loss_fn(em, wrapped, batch, cfg) -> (loss, metrics dict with "kl" and "agreement"): the
    distillation loss of one batch (default ``lm_loss``; ``elastilab.vision.vit_loss`` for ViTs,
    whose data is then any tensor or Dataset the loss understands). Router aux losses are added here.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg = config or DistillConfig()
    if overrides:
        cfg = DistillConfig(**{**asdict(cfg), **overrides})
    if loss_fn is None and isinstance(data, str):
        if tokenizer is None:
            raise ValueError("data is text: pass tokenizer= to cut it into token blocks")
        from .data import token_blocks
        data = token_blocks(tokenizer, data, cfg.seq_len)
    if loss_fn is None and (not torch.is_tensor(data) or data.dim() != 2 or data.dtype != torch.long):
        raise TypeError("data must be a LongTensor [n_blocks, seq_len] of token ids or a text string")
    if len(data) < cfg.batch_size:
        raise ValueError(f"only {len(data)} training blocks for batch_size {cfg.batch_size}; give more data")
    loss_fn = loss_fn or lm_loss

    acc = accelerator or Accelerator(split_batches=True, kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    opt = torch.optim.AdamW(em.router_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    em.model.eval()  # frozen base: no dropout; routers have none
    mode = em.elastic_config.mode
    em.set_mode("topk")  # training always ranks within the sequence; threshold is calibrated after
    wrapped, opt, loader = acc.prepare(em, opt, loader)
    rng = random.Random(cfg.seed)  # same draws on every process
    base_caps = dict(em.capacities)
    log, step, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="distill", disable=not (cfg.progress and acc.is_main_process))
    estimator = em.training_estimator()
    estimator.__enter__()
    try:
        while step < cfg.steps:
            for batch in loader:
                if cfg.capacity_range is not None or cfg.components_per_step:
                    em.set_capacity(**sample_capacities(rng, base_caps, cfg))
                main, metrics = loss_fn(em, wrapped, batch, cfg)
                bce, bal = router_aux_losses(em)
                loss = main + cfg.bce_weight * bce + cfg.balance_weight * bal
                acc.backward(loss)
                if cfg.grad_clip:
                    acc.clip_grad_norm_(em.router_parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                log.append({"step": step, "loss": loss.detach().item(), "kl": metrics["kl"], "bce": float(bce.detach()),
                            "balance": float(bal.detach()), **metrics,
                            **{f"cap_{k}": v for k, v in em.capacities.items()},
                            "seconds": time.perf_counter() - t0})
                bar.update(1)
                bar.set_postfix(kl=f"{metrics['kl']:.3f}", agree=f"{metrics['agreement']:.2f}")
                if cfg.checkpoint_dir and acc.is_main_process and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                    with em.capacity(**base_caps):  # not this step's sampled capacities
                        em.save_routers(Path(cfg.checkpoint_dir), step=step, distill=asdict(cfg))
                if step >= cfg.steps:
                    break
    finally:
        estimator.__exit__(None, None, None)
        bar.close()
        em.set_capacity(**base_caps)
        em.set_mode(mode)
    return pd.DataFrame(log)


@torch.no_grad()
def evaluate(em, blocks: Tensor, batch_size: int = 4) -> dict:
    """Teacher and student perplexity, KL and top-1 agreement on token blocks [N, T]."""
    nll_t = nll_s = kl = agree = 0.0
    n_tok = 0
    for ids in blocks.split(batch_size):
        ids = ids.to(em.device)
        with em.routers_disabled():
            t = em(ids).logits[:, :-1].float()
        s = em(ids).logits[:, :-1].float()
        target = ids[:, 1:]
        n = target.numel()
        nll_t += F.cross_entropy(t.reshape(-1, t.shape[-1]), target.reshape(-1), reduction="sum").item()
        nll_s += F.cross_entropy(s.reshape(-1, s.shape[-1]), target.reshape(-1), reduction="sum").item()
        kl += kl_loss(s, t).item() * n
        agree += (s.argmax(-1) == t.argmax(-1)).float().sum().item()
        n_tok += n
    ppl_t, ppl_s = math.exp(nll_t / n_tok), math.exp(nll_s / n_tok)
    return {"teacher_ppl": ppl_t, "student_ppl": ppl_s, "ppl_ratio": ppl_s / ppl_t,
            "kl": kl / n_tok, "agreement": agree / n_tok, "tokens": n_tok}
