"""Self-distillation of the routers: the frozen model (routers disabled) teaches the routed one.

Built on Hugging Face Accelerate, so the same loop runs on one CPU, on several processes
(``torchrun --nproc_per_node 2 ...`` or ``accelerate launch``) and on GPUs without code changes.
This module is the trainer (its config, the loop, divergence checks); the objective is ``losses``,
the LM task ``tasks.lm``, the checkpoint folder checks and the resumable state ``trainer_state``.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from elastilab.core.config import GATED_COMPONENTS
from elastilab.core.lora import reset as reset_lora
from elastilab.core.routers import Router
from elastilab.data import token_blocks
from elastilab.files import interrupts_deferred
from elastilab.training.losses import router_aux_losses
from elastilab.training.trainer_state import (
    check_checkpoint_dir,
    restore_trainer_state,
    run_identity,
    save_trainer_state,
)


class TrainingDiverged(RuntimeError):
    """The loss or the router weights became non-finite; nothing non-finite was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``distill``, after ``step`` steps; the last checkpoint (of step ``saved``, or None:
    none was written) stays whole, and ``resume=True`` continues from it."""

    def __init__(self, message: str, step: int, saved: int | None):
        super().__init__(message)
        self.step, self.saved = step, saved


@dataclass
class DistillConfig:
    steps: int = 200
    batch_size: int = 4            #: global batch (split across processes)
    seq_len: int = 256             #: used when data is text
    lr: float = 2e-3
    #: learning rate of the LoRA factors (ElasticConfig.lora_rank), their own: a router only ranks,
    #: so its scale is free, while a LoRA changes the function the routers were chosen for
    lora_lr: float = 1e-3
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
    grad_clip: float = 1.0         #: max global norm of the router gradients (0: no clipping)
    #: seeds the data order, the capacity draws and torch's RNG (and the routers with init_routers)
    seed: int = 0
    #: re-draw every router's initial weights from ``seed`` before step 1, so a fresh run does not
    #: depend on the global RNG state when ``elastify`` made the routers. Off by default: the routers
    #: may be loaded or trained ones to fine-tune (``load_routers``). ``elastilab train`` sets it.
    init_routers: bool = False
    checkpoint_dir: str | None = None
    #: checkpoint every this many steps, and always after the last one (0: only after the last)
    checkpoint_every: int = 50
    #: continue the run saved in checkpoint_dir (routers, optimizer, step, RNG states, data
    #: position): the same settings then give the same routers as an uninterrupted run
    resume: bool = False
    #: replace a router checkpoint already in checkpoint_dir (without it, or resume, that is an error)
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got steps={self.steps}, "
                             f"batch_size={self.batch_size}")
        if self.capacity_range is not None:
            lo, hi = self.capacity_range
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"capacity_range must satisfy 0 < low <= high <= 1, got {self.capacity_range}")
        if self.components_per_step is not None and self.components_per_step < 1:
            raise ValueError(f"components_per_step must be >= 1 or None, got {self.components_per_step}")
        for name in ("lr", "lora_lr", "temperature"):
            _check_number(name, getattr(self, name), positive=True)
        for name in ("weight_decay", "grad_clip", "bce_weight", "balance_weight"):
            _check_number(name, getattr(self, name), positive=False)
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0 (0: only after the last step), "
                             f"got {self.checkpoint_every}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the checkpoint or replace it")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir: the folder of the run to continue")


def _check_number(name: str, value, positive: bool) -> None:
    """A finite number, > 0 (positive) or >= 0: NaN passes comparisons like ``value <= 0``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def sample_capacities(rng: random.Random, base: dict[str, float], cfg: DistillConfig) -> dict[str, float]:
    comps = list(base)
    k = cfg.components_per_step
    active = set(rng.sample(comps, min(k, len(comps)))) if k else set(comps)
    return {c: (rng.uniform(*cfg.capacity_range) if cfg.capacity_range else base[c]) if c in active else 1.0
            for c in comps}


def distill(em, data, config: DistillConfig | None = None, tokenizer=None, accelerator=None, loss_fn=None,
            **overrides) -> pd.DataFrame:
    """Train the routers of ``em`` (and its LoRA, ``ElasticConfig.lora_rank``, at ``lora_lr``) to match
    the frozen model; returns the log as a DataFrame.

    data: LongTensor [N, seq_len] of token blocks, or a text (then pass ``tokenizer``).
    loss_fn(em, wrapped, batch, cfg) -> (loss, metrics dict with "kl" and "agreement"): the
    distillation loss of one batch (default ``lm_loss``; ``elastilab.tasks.vit.ViTLoss`` for ViTs,
    whose data is then any tensor or Dataset the loss understands). Router aux losses are added here.

    Reproducible: the same seed and data give the same routers. The routers' *initial* weights come
    from ``elastify`` (the global RNG at that moment) unless ``init_routers=True`` re-draws them from
    ``seed``; routers are never re-initialised silently, since they may be loaded ones to fine-tune.
    Each checkpoint in ``checkpoint_dir`` holds the routers pair (``save_routers``) and
    ``trainer_state.safetensors`` (routers, optimizer, step, RNG states, data position, log; no
    pickle), from which ``resume=True`` continues to the routers an uninterrupted run reaches.
    The folder is checked before step 1. A non-finite loss or router weight stops training with
    ``TrainingDiverged``; the last checkpoint written stays (it was finite).
    """
    # a validated copy: a config changed after it was made (cfg.lr = inf) is checked again
    cfg = replace(config or DistillConfig(), **overrides)
    data = _training_data(data, cfg, tokenizer, default_loss=loss_fn is None)
    if loss_fn is None:  # the LM task's loss, reached up to lazily: tasks build on training, not the reverse
        from elastilab.tasks.lm import lm_loss as loss_fn
    check_checkpoint_dir(cfg)  # before step 1, not at the first checkpoint
    from tqdm.auto import tqdm  # (tqdm and accelerate are imported as a run starts: only training needs them)

    mode = em.elastic_config.mode
    loop = _start(em, data, cfg, accelerator, loss_fn)
    loop.t0 = time.perf_counter() - (loop.log[-1]["seconds"] if loop.log else 0.0)  # counts on across a resume
    loop.bar = tqdm(total=cfg.steps, initial=loop.step, desc="distill",
                    disable=not (cfg.progress and loop.acc.is_main_process))
    estimator = em.training_estimator()
    estimator.__enter__()
    try:
        while loop.step < cfg.steps:
            _epoch(loop)
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted at step {loop.step}; {_kept(cfg, loop.last_saved)}", loop.step,
                                  loop.last_saved) from None
    finally:
        estimator.__exit__(None, None, None)
        loop.bar.close()
        em.set_capacity(**loop.base_caps)
        em.set_mode(mode)
    return pd.DataFrame(loop.log)


@dataclass(eq=False)
class _Loop:
    """What the steps, the log and the checkpoints of one run share. ``optimizer`` is the one a checkpoint
    saves, ``opt`` the accelerator's wrapper of it that steps; ``data_order`` draws each epoch's shuffle."""
    em: object
    cfg: DistillConfig
    acc: object
    wrapped: object
    optimizer: torch.optim.Optimizer
    opt: object
    loader: object
    loss_fn: object
    data_order: torch.Generator
    rng: random.Random
    run: dict | None
    base_caps: dict
    step: int = 0
    in_epoch: int = 0
    log: list = field(default_factory=list)
    last_saved: int | None = None
    t0: float = 0.0
    bar: object = None


def _start(em, data, cfg: DistillConfig, accelerator, loss_fn) -> _Loop:
    """Seeds, the optimizer, the loader and the model in training shape (eval, topk), prepared by the
    accelerator; on resume, the step, data position, log and RNG states of the checkpoint."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    acc = accelerator or Accelerator(split_batches=True, kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    if cfg.init_routers and not cfg.resume:
        init_routers(em, cfg.seed)
    data_order = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=data_order)
    optimizer = _optimizer(em, cfg)
    run = run_identity(em, data, cfg) if cfg.checkpoint_dir else None  # before set_mode: the caller's config
    em.model.eval()  # frozen base: no dropout; routers have none
    em.set_mode("topk")  # training always ranks within the sequence; threshold is calibrated after
    wrapped, opt, loader = acc.prepare(em, optimizer, loader)
    rng = random.Random(cfg.seed)  # same draws on every process
    loop = _Loop(em, cfg, acc, wrapped, optimizer, opt, loader, loss_fn, data_order, rng, run, dict(em.capacities))
    if cfg.resume:
        loop.step, loop.in_epoch, loop.log = restore_trainer_state(Path(cfg.checkpoint_dir), em, optimizer, rng,
                                                                   data_order, run, cfg)
        loop.last_saved = loop.step
    return loop


def _epoch(loop: _Loop) -> None:
    """The rest of one epoch (on resume, after the batches already seen), up to the last step."""
    epoch_start = loop.data_order.get_state()  # this epoch's shuffle is drawn from it as iteration starts
    for batch in itertools.islice(loop.loader, loop.in_epoch, None):
        _step(loop, batch)
        every = loop.cfg.checkpoint_every
        if loop.cfg.checkpoint_dir and loop.acc.is_main_process and (
                loop.step == loop.cfg.steps or every and loop.step % every == 0):
            with interrupts_deferred(), loop.em.capacity(**loop.base_caps):  # not this step's sampled capacities
                position = {"step": loop.step, "batch_in_epoch": loop.in_epoch, "epoch_start": epoch_start}
                loop.last_saved = _checkpoint(loop.em, loop.optimizer, loop.rng, position, loop.run, loop.cfg,
                                              loop.log)
        if loop.step >= loop.cfg.steps:
            return
    loop.in_epoch = 0  # the epoch ran out: the next one starts from its first batch


def _step(loop: _Loop, batch) -> None:
    """One step on ``batch`` (at freshly drawn capacities when the config samples them), checked and logged."""
    em, cfg = loop.em, loop.cfg
    if cfg.capacity_range is not None or cfg.components_per_step:
        em.set_capacity(**sample_capacities(loop.rng, loop.base_caps, cfg))
    parts, metrics = _update(em, loop.wrapped, batch, loop.loss_fn, cfg, loop.acc, loop.opt, loop.step,
                             loop.last_saved)
    loop.step += 1
    loop.in_epoch += 1
    _check_routers(em, loop.step, cfg, loop.last_saved)
    loop.log.append({"step": loop.step, **parts, **metrics, **{f"cap_{k}": v for k, v in em.capacities.items()},
                     "seconds": time.perf_counter() - loop.t0})
    loop.bar.update(1)
    loop.bar.set_postfix(kl=f"{metrics['kl']:.3f}", agree=f"{metrics['agreement']:.2f}")


def _training_data(data, cfg: DistillConfig, tokenizer, default_loss: bool):
    """The data checked against the batch size; text is cut into token blocks first (the LM loss's data)."""
    if default_loss and isinstance(data, str):
        if tokenizer is None:
            raise ValueError("data is text: pass tokenizer= to cut it into token blocks")
        data = token_blocks(tokenizer, data, cfg.seq_len)
    if default_loss and (not torch.is_tensor(data) or data.dim() != 2 or data.dtype != torch.long):
        raise TypeError("data must be a LongTensor [n_blocks, seq_len] of token ids or a text string")
    if len(data) < cfg.batch_size:
        raise ValueError(f"only {len(data)} training blocks for batch_size {cfg.batch_size}; give more data")
    return data


def _optimizer(em, cfg: DistillConfig) -> torch.optim.AdamW:
    """AdamW over the routers, then a LoRA at its own rate (one parameter group each)."""
    groups = [{"params": params, "lr": lr} for params, lr in
              ((em.router_parameters(), cfg.lr), (em.lora_parameters(), cfg.lora_lr)) if params]
    if not groups:  # e.g. only gated components, which the gate chooses: torch would only say "empty parameter list"
        raise ValueError(f"nothing to train: no routed component of this model has a router (elastic: "
                         f"{', '.join(em.capacities)}; {', '.join(GATED_COMPONENTS)} is chosen by the MLP's gate "
                         "and needs no training)")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _update(em, wrapped, batch, loss_fn, cfg: DistillConfig, acc, opt, step: int, last_saved) -> tuple[dict, dict]:
    """One optimizer step on one batch: the task's loss plus the routers' auxiliary losses. Returns the
    loss parts and the task's metrics."""
    main, metrics = loss_fn(em, wrapped, batch, cfg)
    bce, bal = router_aux_losses(em)
    loss = main + cfg.bce_weight * bce + cfg.balance_weight * bal
    parts = {"loss": loss.detach().item(), "kl": metrics["kl"], "bce": bce.detach().item(),
             "balance": bal.detach().item()}
    _check_loss(step + 1, parts, cfg, last_saved)  # before the update: the routers stay finite
    acc.backward(loss)
    if cfg.grad_clip:  # each group on its own: LoRA gradients do not shrink the routers' steps
        for group in opt.param_groups:
            acc.clip_grad_norm_(group["params"], cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return parts, metrics


def _checkpoint(em, optimizer, rng, position: dict, run, cfg: DistillConfig, log) -> int:
    """The routers pair and the trainer state into ``cfg.checkpoint_dir``; returns the step saved."""
    em.save_routers(Path(cfg.checkpoint_dir), step=position["step"], distill=asdict(cfg))
    save_trainer_state(Path(cfg.checkpoint_dir), em, optimizer, rng, position, run, cfg, log)
    return position["step"]


def init_routers(em, seed: int) -> None:
    """Re-draw every router's initial weights from ``seed``, in a fixed (name) order and on a
    private generator: the same seed gives the same routers whatever the global RNG state. A LoRA
    starts afresh from ``seed`` too (B = 0: the model itself is unchanged)."""
    generator = torch.Generator().manual_seed(seed)
    routers = {name: m for name, m in em.named_modules() if isinstance(m, Router)}
    for name in sorted(routers):
        routers[name].reset_parameters(generator)
    reset_lora(em, seed)


# -- divergence: stop before anything non-finite is saved ------------------------------------
def _kept(cfg: DistillConfig, last_saved: int | None) -> str:
    if not cfg.checkpoint_dir:
        return "nothing was saved"
    if last_saved is None:
        return f"no checkpoint was written to {cfg.checkpoint_dir}"
    return f"the checkpoint of step {last_saved} in {cfg.checkpoint_dir} is kept"


def _check_loss(step: int, parts: dict[str, float], cfg: DistillConfig, last_saved: int | None) -> None:
    if math.isfinite(parts["loss"]):
        return
    bad = ", ".join(f"{k}={v}" for k, v in parts.items() if k != "loss" and not math.isfinite(v)) or "their sum"
    raise TrainingDiverged(f"training diverged at step {step}: the loss is {parts['loss']} (non-finite: {bad}) "
                           f"with lr={cfg.lr}, temperature={cfg.temperature}; lower the learning rate or check "
                           f"the data; {_kept(cfg, last_saved)}")


def _check_routers(em, step: int, cfg: DistillConfig, last_saved: int | None) -> None:
    params = em.trainable_parameters()
    if torch.stack([p.detach().isfinite().all() for p in params]).all():
        return
    bad = next(n for n, p in em.named_parameters() if p.requires_grad and not p.detach().isfinite().all())
    raise TrainingDiverged(f"training diverged at step {step}: the update made router weights non-finite "
                           f"(first: {bad}) with lr={cfg.lr}; lower the learning rate (or grad_clip); "
                           f"{_kept(cfg, last_saved)}. The routers in memory are unusable: reload a checkpoint")
