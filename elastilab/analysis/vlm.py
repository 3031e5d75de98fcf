"""tiny-llava's visual-token router: train it (self-distillation, ``elastilab.tasks.vlm``) and benchmark
it against random keep and FastV at the same image-token budgets. Results go where ``--out`` says:

    elastilab vlm train --out runs/tiny-llava-visual
    elastilab vlm bench --out runs/tiny-llava-visual-tokens.json

(The model side, ``ElasticLlava``, is in ``elastilab.adapters.llava.model``; the command, ``cli/vlm.py``.)
"""
from __future__ import annotations

import json
from pathlib import Path

from elastilab.core.loading import load_routers
from elastilab.core.model import elastify
from elastilab.data import ROOT
from elastilab.files import atomic_write
from elastilab.tasks.vlm import (
    answer_dataset,
    answer_loss,
    evaluate,
    expand_tasks,
    llava_15_7b_config,
    llava_parameter_count,
    tiny_llava_data,
)
from elastilab.training.distill import distill
from elastilab.zoo import tiny_llava as tl

# read by default; written only where --out says
SHIPPED_ROUTERS = str(ROOT / "data" / "routers" / "tiny-llava-visual")
TRAIN_TASKS = ("digit", "face", "scenes")  # what the visual router is distilled on by default


def train_visual_router(steps: int = 150, batch_size: int = 8, lr: float = 1e-2, capacity_range=(0.15, 0.85),
                        out: str | None = None, seed: int = 0, tasks=TRAIN_TASKS):
    """Self-distil the visual_tokens router of tiny-llava (KL on the answer tokens) on the training
    questions of ``tasks`` (digit, face, scenes: see tasks.vlm.tiny_llava_data) and save it in the
    folder ``out`` (required: the shipped routers are never a default destination)."""
    if out is None:
        raise ValueError("out is required: the folder to save the routers in "
                         f"(the shipped ones are {SHIPPED_ROUTERS})")
    tasks = tuple(tasks)
    expand_tasks(tasks)  # unknown names fail before the model loads
    model, tok = tl.load()
    em = elastify(model, visual_tokens=0.5)
    items, feats = tiny_llava_data(model, tok, "train", tasks=tasks)
    log = distill(em, answer_dataset(tok, items, feats), loss_fn=answer_loss, steps=steps, batch_size=batch_size,
                  lr=lr, capacity_range=capacity_range, seed=seed, progress=False)
    command = (f"elastilab vlm train --steps {steps} --batch-size {batch_size} --lr {lr} "
               f"--capacity-range {capacity_range[0]} {capacity_range[1]} --seed {seed} --tasks {','.join(tasks)} "
               f"--out {out}")
    counts = {t: sum(it["task"] == t for it in items) for t in dict.fromkeys(it["task"] for it in items)}
    em.save_routers(out, command=command, train_examples=len(items), train_examples_per_task=counts,
                    seconds=round(float(log["seconds"].iloc[-1])), log=log.round(4).to_dict("records"),
                    visual_parameter_fraction=em.visual_parameter_fraction())
    print(log[["step", "kl", "agreement", "cap_visual_tokens", "seconds"]].to_string(index=False), flush=True)
    return em, log


def bench(routers: str = SHIPPED_ROUTERS, out: str | None = None, per_class: int = 10, faces: int = 30,
          capacities=(0.75, 0.5, 0.25), fastv_layer: int = 2) -> dict:
    """Teacher accuracy; accuracy and agreement at each image-token budget for the learned router,
    random keep and FastV (same numbers of image tokens); parameter fractions. Written to the JSON file
    ``out`` if given (never by default)."""
    model, tok = tl.load()
    em = load_routers(model, routers)
    items, feats = tiny_llava_data(model, tok, "test", per_class, faces)
    rows, teacher = [], {}  # the teacher's logits, computed once
    with em.capacity(visual_tokens=1.0):
        full = evaluate(em, tok, items, feats, teacher_cache=teacher)
    rows.append({"method": "teacher", "capacity": 1.0, **full})
    for c in capacities:
        for sel in ("router", "fastv", "random"):
            em.selector, em.fastv_layer = sel, fastv_layer
            with em.capacity(visual_tokens=c):
                r = evaluate(em, tok, items, feats, teacher_cache=teacher)
            rows.append({"method": {"router": "learned"}.get(sel, sel), "capacity": c, **r})
            print(json.dumps(rows[-1]), flush=True)
    em.selector = "router"
    command = f"elastilab vlm bench --routers {routers} --per-class {per_class} --faces {faces}"
    result = {
        "model": "tiny-llava", "command": command + (f" --out {out}" if out is not None else ""),
        "routers": routers,
        "router_training": json.loads((Path(routers) / "routers.json").read_text())["metadata"]["command"],
        "eval_examples": {"digit": sum(it["task"] == "digit" for it in items),
                          "face": sum(it["task"] == "face" for it in items)},
        "metric": "accuracy of the greedy answer's first token (digit names, yes/no are single tokens); "
                  "agreement: same greedy first token as the teacher; flops_fraction: LM + head FLOPs vs the "
                  "teacher on the first batch (image features precomputed)",
        "fastv_layer": fastv_layer, "image_tokens": feats.shape[1],
        "parameter_fraction": {"tiny-llava": em.visual_parameter_fraction(),
                               "llava-1.5-7b": llava_parameter_count(llava_15_7b_config())},
        "rows": rows,
    }
    if out is not None:
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return result


def scene_table(df, value: str = "acc"):
    """A scenes frontier (``elastilab frontier --model tiny-llava --domain scenes``) per scorer and
    capacity: ``value`` ("acc" or "agreement") per question type and overall, the teacher's accuracy,
    and the share of object patches kept (all objects / the object asked about)."""
    import pandas as pd

    from elastilab.zoo.scenes import QUESTION_TYPES
    df = df if isinstance(df, pd.DataFrame) else pd.read_csv(df)
    cols = {f"{value}_scene_{t}": t for t in QUESTION_TYPES}
    out = df[["scorer", "capacity", "image_tokens_kept", *cols, value, "object_patches_kept",
              "target_patches_kept"]].rename(columns={**cols, value: "all"})
    teacher = df[df.capacity == 1.0].iloc[0]
    first = out[out.capacity == 1.0].iloc[:1].assign(scorer="teacher")
    out = pd.concat([first, out[out.capacity < 1.0]], ignore_index=True)
    out.attrs["teacher_acc"] = {t: float(teacher[f"teacher_acc_scene_{t}"]) for t in QUESTION_TYPES}
    return out.set_index(["scorer", "capacity"])


def paired_differences(per_item, learned: str = "router", baselines=("random", "fastv")):
    """Learned minus each baseline on the same questions (``per_item.csv`` of a tiny-llava frontier:
    0/1 hits per question), per capacity: the difference in accuracy and in agreement with the teacher,
    in points, with its paired standard error (std of the per-question differences / sqrt(n))."""
    import numpy as np
    import pandas as pd
    df = per_item if isinstance(per_item, pd.DataFrame) else pd.read_csv(per_item)
    rows = []
    caps = sorted({c.split("@")[1] for c in df.columns if c.startswith(learned + "@") and not c.endswith("_agree")},
                  key=float, reverse=True)
    for cap in caps:
        if float(cap) == 1.0:
            continue
        for b in baselines:
            if f"{b}@{cap}" not in df:
                continue
            row = {"capacity": float(cap), "baseline": b, "n": len(df)}
            for what, suffix in (("acc", ""), ("agreement", "_agree")):
                d = df[f"{learned}@{cap}{suffix}"] - df[f"{b}@{cap}{suffix}"]
                row[f"{what}_diff"] = 100 * d.mean()
                row[f"{what}_se"] = 100 * d.std(ddof=1) / np.sqrt(len(d))
            rows.append(row)
    return pd.DataFrame(rows)
