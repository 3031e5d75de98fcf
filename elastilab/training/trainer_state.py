"""What ``distill`` keeps on disk besides the routers: the checks of its checkpoint folder (made before
step 1) and the trainer state from which ``resume=True`` continues a run exactly. The router pair
itself (routers.safetensors + routers.json) is ``checkpoint``'s format, written by ``save_routers``;
the trainer state is one more file beside it, ``trainer_state.safetensors``: routers, optimizer, step,
RNG states, data position and log as tensors + JSON in the safetensors header (no pickle)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from elastilab.core.checkpoint import META_FILE, ROUTERS_FILE, fingerprint
from elastilab.core.config import ElasticConfig
from elastilab.files import atomic_write

#: written next to the routers at every checkpoint: what ``resume`` needs to continue the run exactly
TRAINER_STATE_FILE = "trainer_state.safetensors"
#: DistillConfig fields a resumed run may change: they do not alter the training trajectory
RESUMABLE_CHANGES = ("steps", "checkpoint_dir", "checkpoint_every", "progress", "resume", "overwrite")


# -- the folder, checked before step 1 ------------------------------------------------------------
def check_checkpoint_dir(cfg) -> None:
    """Fail before step 1 when ``cfg.checkpoint_dir`` (a DistillConfig's) cannot take this run's
    checkpoints: a file, an existing checkpoint without resume/overwrite, nothing to resume, or a
    folder we cannot write."""
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


# -- the trainer state ------------------------------------------------------------------------------
def run_identity(em, data, cfg) -> dict:
    """What a resumed run must share with the one it continues: model, elastic layout and
    capacities, data, and every setting (of the DistillConfig ``cfg``) that shapes the trajectory."""
    elastic = {k: v for k, v in em.elastic_config.to_dict().items() if k != "mode"}  # training is top-k
    for key in ("attn_tokens_variant", "skipped_tokens"):  # defaults: runs saved before the fields resume
        if elastic.get(key) == "drop":
            del elastic[key]
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    if not em.lora_parameters():  # shapes nothing without a LoRA (and runs saved before it resume)
        settings.pop("lora_lr", None)
    identity = {"fingerprint": fingerprint(em), "elastic_config": elastic, "distill": settings,
                "data": {"n": len(data)}}
    if torch.is_tensor(data):
        raw = data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        identity["data"]["sha256"] = hashlib.sha256(raw).hexdigest()
    return json.loads(json.dumps(identity, default=repr))  # tuples become lists, as read back from the file


def save_trainer_state(folder: Path, em, optimizer, rng: random.Random, position: dict, run: dict,
                       cfg, log: list[dict]) -> Path:
    """Write ``trainer_state.safetensors`` atomically: one file, so its parts never disagree."""
    tensors = {f"routers.{k}": v.detach().cpu().contiguous().clone() for k, v in em.trainable_state().items()}
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
    path = Path(folder) / TRAINER_STATE_FILE
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["elastilab_trainer_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise ValueError(f"cannot resume from {path}: not a readable elastilab trainer state ({exc})") from None
    return tensors, meta


def restore_trainer_state(folder: Path, em, optimizer, rng: random.Random, data_order: torch.Generator,
                          run: dict, cfg) -> tuple[int, int, list[dict]]:
    """Put the saved run back in place; returns (step, batches already taken this epoch, log)."""
    tensors, meta = read_trainer_state(folder)
    _check_same_run(folder, meta["run"], run)
    if meta["step"] > cfg.steps:
        raise ValueError(f"the checkpoint in {folder} is at step {meta['step']}, past steps={cfg.steps}; "
                         f"resume with steps >= {meta['step']}")
    own = em.trainable_state()  # routers and LoRA factors
    saved = {k[len("routers."):]: v for k, v in tensors.items() if k.startswith("routers.")}
    if saved.keys() != own.keys() or any(saved[k].shape != v.shape for k, v in own.items()):
        raise ValueError(f"the routers (and LoRA) in {folder / TRAINER_STATE_FILE} do not fit this model's "
                         "elastic layout")
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
    saved = {**saved, "elastic_config": {k: saved["elastic_config"].get(k, defaults[k])
                                         for k in now["elastic_config"]}}
    diffs = [f"{part}.{k}: {saved[part].get(k)!r} then, {now[part].get(k)!r} now"
             for part in ("elastic_config", "distill", "data")
             for k in sorted(set(saved[part]) | set(now[part])) if saved[part].get(k) != now[part].get(k)]
    if diffs:
        raise ValueError(f"cannot resume the run in {folder} with other settings ({'; '.join(diffs)}); give the "
                         f"same settings and data (only {', '.join(RESUMABLE_CHANGES[:3])} and progress may change), "
                         "or start a new run from its routers (elastilab train --init-from)")
