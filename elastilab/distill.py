"""Self-distillation of the routers: the frozen model (routers disabled) teaches the routed one.

Built on Hugging Face Accelerate, so the same loop runs on one CPU, on several processes
(``torchrun --nproc_per_node 2 ...`` or ``accelerate launch``) and on GPUs without code changes.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PARAM_COMPONENTS, TOKEN_COMPONENTS, ElasticConfig

#: written next to the routers at every checkpoint: what ``resume`` needs to continue the run exactly
TRAINER_STATE_FILE = "trainer_state.safetensors"
#: DistillConfig fields a resumed run may change: they do not alter the training trajectory
RESUMABLE_CHANGES = ("steps", "checkpoint_dir", "checkpoint_every", "progress", "resume", "overwrite")


class TrainingDiverged(RuntimeError):
    """The loss or the router weights became non-finite; nothing non-finite was saved."""


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
            raise ValueError(f"steps and batch_size must be >= 1, got steps={self.steps}, batch_size={self.batch_size}")
        if self.capacity_range is not None:
            lo, hi = self.capacity_range
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"capacity_range must satisfy 0 < low <= high <= 1, got {self.capacity_range}")
        if self.components_per_step is not None and self.components_per_step < 1:
            raise ValueError(f"components_per_step must be >= 1 or None, got {self.components_per_step}")
        for name in ("lr", "temperature"):
            _check_number(name, getattr(self, name), positive=True)
        for name in ("weight_decay", "grad_clip", "bce_weight", "balance_weight"):
            _check_number(name, getattr(self, name), positive=False)
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: only after the last step), got {self.checkpoint_every}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the checkpoint or replace it")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir: the folder of the run to continue")


def _check_number(name: str, value, positive: bool) -> None:
    """A finite number, > 0 (positive) or >= 0: NaN passes comparisons like ``value <= 0``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


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
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    # a validated copy: a config changed after it was made (cfg.lr = inf) is checked again
    cfg = replace(config or DistillConfig(), **overrides)
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
    check_checkpoint_dir(cfg)  # before step 1, not at the first checkpoint

    acc = accelerator or Accelerator(split_batches=True, kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    if cfg.init_routers and not cfg.resume:
        init_routers(em, cfg.seed)
    data_order = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=data_order)
    optimizer = torch.optim.AdamW(em.router_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = _run_identity(em, data, cfg) if cfg.checkpoint_dir else None  # before set_mode: the caller's config
    em.model.eval()  # frozen base: no dropout; routers have none
    mode = em.elastic_config.mode
    em.set_mode("topk")  # training always ranks within the sequence; threshold is calibrated after
    wrapped, opt, loader = acc.prepare(em, optimizer, loader)
    rng = random.Random(cfg.seed)  # same draws on every process
    base_caps = dict(em.capacities)
    step, in_epoch, log = 0, 0, []
    if cfg.resume:
        step, in_epoch, log = restore_trainer_state(Path(cfg.checkpoint_dir), em, optimizer, rng, data_order,
                                                    run, cfg)
    last_saved = step if cfg.resume else None
    t0 = time.perf_counter() - (log[-1]["seconds"] if log else 0.0)  # seconds count on across a resume
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", disable=not (cfg.progress and acc.is_main_process))
    estimator = em.training_estimator()
    estimator.__enter__()
    try:
        while step < cfg.steps:
            epoch_start = data_order.get_state()  # this epoch's shuffle is drawn from it as iteration starts
            for batch in itertools.islice(loader, in_epoch, None):  # on resume, skip the batches already seen
                if cfg.capacity_range is not None or cfg.components_per_step:
                    em.set_capacity(**sample_capacities(rng, base_caps, cfg))
                main, metrics = loss_fn(em, wrapped, batch, cfg)
                bce, bal = router_aux_losses(em)
                loss = main + cfg.bce_weight * bce + cfg.balance_weight * bal
                parts = {"loss": loss.detach().item(), "kl": metrics["kl"], "bce": bce.detach().item(),
                         "balance": bal.detach().item()}
                _check_loss(step + 1, parts, cfg, last_saved)  # before the update: the routers stay finite
                acc.backward(loss)
                if cfg.grad_clip:
                    acc.clip_grad_norm_(em.router_parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                in_epoch += 1
                _check_routers(em, step, cfg, last_saved)
                log.append({"step": step, **parts, **metrics,
                            **{f"cap_{k}": v for k, v in em.capacities.items()},
                            "seconds": time.perf_counter() - t0})
                bar.update(1)
                bar.set_postfix(kl=f"{metrics['kl']:.3f}", agree=f"{metrics['agreement']:.2f}")
                every = cfg.checkpoint_every
                if cfg.checkpoint_dir and acc.is_main_process and (step == cfg.steps or every and step % every == 0):
                    with em.capacity(**base_caps):  # not this step's sampled capacities
                        em.save_routers(Path(cfg.checkpoint_dir), step=step, distill=asdict(cfg))
                    position = {"step": step, "batch_in_epoch": in_epoch, "epoch_start": epoch_start}
                    save_trainer_state(Path(cfg.checkpoint_dir), em, optimizer, rng, position, run, cfg, log)
                    last_saved = step
                if step >= cfg.steps:
                    break
            else:
                in_epoch = 0  # the epoch ran out: the next one starts from its first batch
    finally:
        estimator.__exit__(None, None, None)
        bar.close()
        em.set_capacity(**base_caps)
        em.set_mode(mode)
    return pd.DataFrame(log)


def init_routers(em, seed: int) -> None:
    """Re-draw every router's initial weights from ``seed``, in a fixed (name) order and on a
    private generator: the same seed gives the same routers whatever the global RNG state."""
    from .routers import Router
    generator = torch.Generator().manual_seed(seed)
    routers = {name: m for name, m in em.named_modules() if isinstance(m, Router)}
    for name in sorted(routers):
        routers[name].reset_parameters(generator)


# -- checks before and during training ---------------------------------------------------------
def check_checkpoint_dir(cfg: DistillConfig) -> None:
    """Fail before step 1 when checkpoint_dir cannot take this run's checkpoints: a file, an
    existing checkpoint without resume/overwrite, nothing to resume, or a folder we cannot write."""
    from .checkpoint import META_FILE, ROUTERS_FILE
    if not cfg.checkpoint_dir:
        return
    folder = Path(cfg.checkpoint_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} is a file, not a folder; choose another path")
    if cfg.resume and not (folder / TRAINER_STATE_FILE).is_file():
        raise FileNotFoundError(f"nothing to resume in {folder}: it holds no {TRAINER_STATE_FILE} "
                                "(written at every checkpoint of a run)")
    held = [n for n in (ROUTERS_FILE, META_FILE, TRAINER_STATE_FILE) if (folder / n).exists()]
    if held and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{folder} already holds a router checkpoint ({', '.join(held)}); continue it with "
                         "resume=True (elastilab train --resume), replace it with overwrite=True (--overwrite), "
                         "or choose another folder")
    check_writable(folder)
    if cfg.overwrite:  # start over: a later resume must not continue the replaced run
        (folder / TRAINER_STATE_FILE).unlink(missing_ok=True)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write (and sync, so a full disk shows) then remove a probe file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".elastilab-probe-", suffix=".tmp")
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write checkpoints to {folder}: {exc.strerror or exc}") from exc


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
    params = em.router_parameters()
    if torch.stack([p.detach().isfinite().all() for p in params]).all():
        return
    bad = next(n for n, p in em.named_parameters() if p.requires_grad and not p.detach().isfinite().all())
    raise TrainingDiverged(f"training diverged at step {step}: the update made router weights non-finite "
                           f"(first: {bad}) with lr={cfg.lr}; lower the learning rate (or grad_clip); "
                           f"{_kept(cfg, last_saved)}. The routers in memory are unusable: reload a checkpoint")


# -- trainer state: what resume needs, as safetensors (tensors) + JSON in its header -------------
def _run_identity(em, data, cfg: DistillConfig) -> dict:
    """What a resumed run must share with the one it continues: model, elastic layout and
    capacities, data, and every setting that shapes the trajectory."""
    from .checkpoint import fingerprint
    elastic = {k: v for k, v in em.elastic_config.to_dict().items() if k != "mode"}  # training is top-k
    for key in ("attn_tokens_variant", "skipped_tokens"):  # defaults: runs saved before the fields resume
        if elastic.get(key) == "drop":
            del elastic[key]
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    identity = {"fingerprint": fingerprint(em), "elastic_config": elastic, "distill": settings,
                "data": {"n": len(data)}}
    if torch.is_tensor(data):
        raw = data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        identity["data"]["sha256"] = hashlib.sha256(raw).hexdigest()
    return json.loads(json.dumps(identity, default=repr))  # tuples become lists, as read back from the file


def save_trainer_state(folder: Path, em, optimizer, rng: random.Random, position: dict, run: dict,
                       cfg: DistillConfig, log: list[dict]) -> Path:
    """Write ``trainer_state.safetensors`` atomically: one file, so its parts never disagree."""
    from safetensors.torch import save_file
    from .files import atomic_write
    tensors = {f"routers.{k}": v.detach().cpu().contiguous().clone() for k, v in em.router_state().items()}
    for i, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v.detach().cpu().contiguous().clone() for k, v in state.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors["rng.data_epoch_start"] = position["epoch_start"]
    version, mt, gauss = rng.getstate()
    meta = {"format": 1, "step": position["step"], "batch_in_epoch": position["batch_in_epoch"],
            "capacity_rng": [version, list(mt), gauss], "run": run, "log": log}
    header = {"elastilab_trainer_state": json.dumps(meta)}
    return atomic_write(folder / TRAINER_STATE_FILE, lambda f: save_file(tensors, f, metadata=header))


def read_trainer_state(folder: Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    path = Path(folder) / TRAINER_STATE_FILE
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["elastilab_trainer_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise ValueError(f"cannot resume from {path}: not a readable elastilab trainer state ({exc})") from None
    return tensors, meta


def restore_trainer_state(folder: Path, em, optimizer, rng: random.Random, data_order: torch.Generator,
                          run: dict, cfg: DistillConfig) -> tuple[int, int, list[dict]]:
    """Put the saved run back in place; returns (step, batches already taken this epoch, log)."""
    tensors, meta = read_trainer_state(folder)
    _check_same_run(folder, meta["run"], run)
    if meta["step"] > cfg.steps:
        raise ValueError(f"the checkpoint in {folder} is at step {meta['step']}, past steps={cfg.steps}; "
                         f"resume with steps >= {meta['step']}")
    own = em.router_state()
    saved = {k[len("routers."):]: v for k, v in tensors.items() if k.startswith("routers.")}
    if saved.keys() != own.keys() or any(saved[k].shape != v.shape for k, v in own.items()):
        raise ValueError(f"the routers in {folder / TRAINER_STATE_FILE} do not fit this model's elastic layout")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(saved[k])
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    version, mt, gauss = meta["capacity_rng"]
    rng.setstate((version, tuple(mt), gauss))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    data_order.set_state(tensors["rng.data_epoch_start"])
    return meta["step"], meta["batch_in_epoch"], meta["log"]


def _check_same_run(folder: Path, saved: dict, now: dict) -> None:
    if saved["fingerprint"] != now["fingerprint"]:
        raise ValueError(f"the run in {folder} trained routers for a different model (fingerprint "
                         f"{saved['fingerprint'][:12]}, this one {now['fingerprint'][:12]}); load that model")
    # a field added to ElasticConfig after the run started takes its default, as when routers load
    defaults = ElasticConfig.from_dict(saved["elastic_config"]).to_dict()
    saved = {**saved, "elastic_config": {k: saved["elastic_config"].get(k, defaults[k]) for k in now["elastic_config"]}}
    diffs = [f"{part}.{k}: {saved[part].get(k)!r} then, {now[part].get(k)!r} now"
             for part in ("elastic_config", "distill", "data")
             for k in sorted(set(saved[part]) | set(now[part])) if saved[part].get(k) != now[part].get(k)]
    if diffs:
        raise ValueError(f"cannot resume the run in {folder} with other settings ({'; '.join(diffs)}); give the "
                         f"same settings and data (only {', '.join(RESUMABLE_CHANGES[:3])} and progress may change), "
                         "or start a new run from its routers (elastilab train --init-from)")


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
