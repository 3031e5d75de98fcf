"""A recommended point per target quality of the whole-model knob, chosen on calibration data and stored
with the routers:

    el.allocate(em, calibration_task, budget="model")   # the schedule (core.global_budget)
    recommend(em, calibration_task, data="pydocs train") # per target: the least measured compute meeting it
    em.save_routers(folder)                              # routers.json "recommended"; load_routers reads it back
    em.use_recommended(1.05)                             # = em.set_compute(the compute chosen for x1.05)

A target t is a factor on the dense model's quality in the task's own direction (``task.higher_is_better``):
a perplexity ratio <= t x the dense one (1.0) for language models, a probe agreement or accuracy >= the dense
one / t for vision and visual-language tasks. Every compute level of the grid is set with ``set_compute``
and its whole-model compute *measured* with the FLOP counter on ``task.measure_input``; the point chosen
for t is the level of least measured compute whose calibration quality meets t (the dense model meets
every t >= 1, so there always is one). Choose on calibration data, report on held-out data: the
quality stored is the calibration one, what the choice is worth is measured elsewhere.
"""
from __future__ import annotations

import math

import torch

from elastilab.core.compute import measure_flops
from elastilab.core.global_budget import capacities_for, knob_kept, set_compute

#: default target factors on the dense model's quality
TARGETS = (1.01, 1.05)


def target_key(target) -> str:
    """"x1.05" for 1.05 or "x1.05"; anything else raises (what was given, what is allowed)."""
    value = target[1:] if isinstance(target, str) and target[:1] in "xX" else target
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if isinstance(target, bool) or not math.isfinite(t) or t < 1.0:
        raise ValueError(f"a target is a quality factor >= 1 such as 1.05 or 'x1.05', got {target!r}")
    return f"x{t:g}"


def meets(quality: float, dense: float, target: float, higher_is_better: bool) -> bool:
    """Whether ``quality`` is within a factor ``target`` of the dense model's (in the task's direction)."""
    if higher_is_better:
        return quality >= dense / target - 1e-12
    return quality <= dense * target + 1e-12


def compute_levels(em, step: float = 0.01) -> list[float]:
    """Knob values 1, 1 - step, ... down to the least the schedule reaches; two values that take the
    same cuts are one level (the larger kept)."""
    steps = em.elastic_config.model_allocation
    lowest = steps[-1][3] if steps else 1.0
    out, seen = [], set()
    for k in range(int(math.floor((1.0 - lowest) / step + 1e-9)) + 1):
        c = round(1.0 - k * step, 10)
        cuts = capacities_for(em, c)[1] if steps else 1.0
        if cuts not in seen:
            seen.add(cuts)
            out.append(c)
    return out


@torch.no_grad()
def evaluate_levels(em, task, computes, scorer="learned") -> list[dict]:
    """[{compute, model_compute (measured), quality}] of the knob at each value of ``computes`` on ``task``;
    the model is left as it was."""
    args, kwargs = task.measure_input(em)
    rows = []
    with knob_kept(em):
        with em.capacity(**{c: 1.0 for c in em.capacities}):
            dense = measure_flops(em, *args, **kwargs)["total"]
        for c in computes:
            set_compute(em, c)
            with em.scoring(scorer):
                q = float(task.evaluate(em)["quality"])
                flops = measure_flops(em, *args, **kwargs)["total"]
            rows.append({"compute": float(c), "model_compute": flops / dense, "quality": q})
    return rows


def choose(rows: list[dict], dense: float, targets, higher_is_better: bool) -> dict[str, dict]:
    """Per target: the row of least measured compute whose quality meets it (None when none does)."""
    out = {}
    for t in targets:
        ok = [r for r in rows if meets(r["quality"], dense, float(target_key(t)[1:]), higher_is_better)]
        out[target_key(t)] = min(ok, key=lambda r: (r["model_compute"], r["compute"])) if ok else None
    return out


def recommend(em, task, targets=TARGETS, computes=None, scorer="learned", data: str = "", step: float = 0.01):
    """Choose and store (``em.recommended``) a point per target on ``task`` (calibration data, named by
    ``data``) among ``computes`` (default: ``compute_levels(em, step)``); returns ``(recommended, rows)``."""
    if not em.elastic_config.model_allocation:
        raise ValueError("recommend needs a whole-model schedule: run el.allocate(em, calibration_task, "
                         "budget='model') first (or load routers saved after one)")
    computes = sorted({1.0, *(computes if computes is not None else compute_levels(em, step))}, reverse=True)
    rows = evaluate_levels(em, task, computes, scorer)
    dense = rows[0]["quality"]  # the knob at 1.0: every component dense
    higher = bool(task.higher_is_better)
    rec = {}
    for key, row in choose(rows, dense, targets, higher).items():
        rec[key] = {"target": float(key[1:]), "compute": row["compute"], "model_compute": row["model_compute"],
                    "quality": row["quality"], "dense_quality": dense, "metric": getattr(task, "metric", "quality"),
                    "higher_is_better": higher, "chosen_on": data, "scorer": str(scorer), "levels": len(rows),
                    "schedule_steps": len(em.elastic_config.model_allocation)}
    em.recommended = rec
    return rec, rows


def use_recommended(em, target):
    """``em.set_compute`` at the compute recommended for ``target`` (1.05 or "x1.05")."""
    rec = getattr(em, "recommended", None)
    if not rec:
        raise ValueError("these routers hold no recommended point: run elastilab.core.recommend.recommend(em, "
                         "calibration_task) (or elastilab frontier --allocate-model DATA --recommend) and save them")
    key = target_key(target)
    if key not in rec:
        raise ValueError(f"no recommended point for {key}; recommended targets: {', '.join(rec)}")
    n = len(em.elastic_config.model_allocation)
    if rec[key].get("schedule_steps", n) != n:
        raise ValueError(f"the recommendation was chosen for a schedule of {rec[key]['schedule_steps']} steps, "
                         f"this model holds {n}: recommend again after allocating")
    return set_compute(em, rec[key]["compute"])


def check_recommended(rec, path="") -> dict | None:
    """A checkpoint's "recommended" entry, validated (None: the routers hold none)."""
    if rec is None:
        return None
    ok = isinstance(rec, dict) and all(isinstance(v, dict) and isinstance(v.get("compute"), (int, float))
                                       and 0 < v["compute"] <= 1 for v in rec.values())
    if not ok:
        raise ValueError(f"{path} routers.json: 'recommended' must map targets ('x1.05') to points with a compute "
                         "in (0, 1]; save the routers again")
    return {target_key(k): v for k, v in rec.items()}
