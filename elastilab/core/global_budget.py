"""One compute knob for the whole model: a budget over every (layer, component, level) cut.

``budget.allocate`` spreads one component's budget across its layers; here every routed component of
every layer competes for one budget in measured FLOPs, so the cheapest cuts may be heads in one layer,
MLP units in another and nothing in layer 0:

    el.allocate(em, calibration_task, budget="model")   # measures, stores the schedule in the model
    em.set_compute(0.8)          # the whole model at 80% of its dense FLOPs (measured)
    em.layer_capacities          # where it went

How. Each cut's *cost* is the task's distance from the teacher with only that layer's component routed
at that level (calibration data, as ``budget.layer_costs``), made non-increasing in capacity. Its
*saving* is measured: whole-model FLOPs from the counter (``torch.utils.flop_counter``), so heads, MLP
units and tokens are in one currency. A block's count depends only on its own capacities (top-k keeps a
fixed number of tokens, heads and units), and its attention side and MLP side add up, so one forward
measures one capacity combination per layer and a table of the combinations per layer shape is exact
(``flop_table``; every SmolLM2 layer has one shape). The schedule is greedy, least cost per FLOP saved
first, with two refinements that cost nothing: a layer may jump to any lower level (a bent cost curve
is not stuck behind a bad first step), and the saving of a cut is that of the layer's *current* state
(cutting heads in a layer whose tokens are cut already saves less). Each step stores the whole-model
compute after it, so ``set_compute(b)`` replays the steps until the compute is <= b: a smaller budget
contains the larger one's cuts, and the compute met is within one cut of the request. The costs are
measured one cut at a time (interactions between cuts are not), which ``check_schedule`` measures.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from elastilab.core.budget import monotone
from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS, TOKEN_COMPONENTS
from elastilab.core.cut_costs import EXCLUSIVE, FlopTable, cut_costs, cut_levels, flop_table


# ----------------------------------------------------------------------------- the schedule
def greedy_model_schedule(costs: dict[tuple[int, str], list[float]], caps: dict[str, list[float]],
                          table: FlopTable) -> list[tuple[int, str, float, float]]:
    """[(layer, component, capacity, whole-model compute after the cut)], cheapest added cost per
    measured FLOP saved first; a cut may jump a layer's component to any lower level."""
    mono = monotone(costs)  # capacities go from high to low: cost only grows along them
    at = {key: 0 for key in costs}
    state: dict[int, dict[str, float]] = {}
    for layer, comp in costs:
        state.setdefault(layer, {})[comp] = 1.0
    steps, change = [], 0
    while True:
        best = None
        for (layer, comp), i in at.items():
            lv = caps[comp]
            cur = state[layer]
            if comp in EXCLUSIVE and any(cur.get(o, 1.0) < 1.0 for o in EXCLUSIVE if o != comp):
                continue
            before = table.block(layer, cur)
            for j in range(i + 1, len(lv)):
                saved = before - table.block(layer, {**cur, comp: lv[j]})
                if saved <= 0:
                    continue
                ratio = (mono[(layer, comp)][j] - mono[(layer, comp)][i]) / saved
                if best is None or (ratio, -saved) < best[0]:
                    best = ((ratio, -saved), layer, comp, j, saved)
        if best is None:
            return steps
        _, layer, comp, j, saved = best
        at[(layer, comp)] = j
        state[layer][comp] = caps[comp][j]
        change -= saved
        steps.append((layer, comp, caps[comp][j], (table.dense_total + change) / table.dense_total))


def allocate_model(em, task, step: float = 0.125, scorer="learned", components=None, progress: bool = True,
                   cache: str | Path | None = None, levels=None) -> list[tuple[int, str, float, float]]:
    """Measure every (layer, component, level) cut of ``components`` (default: every routed layer
    component) on ``task`` (calibration data: never the data you report) as ``scorer`` chooses, order
    them by cost per measured FLOP saved, store the schedule in the model (saved with the routers)
    and return it. The compute of each step is measured on ``task.measure_input`` (its sequence length).
    ``levels``: the capacities to measure each cut at (``cut_levels``), instead of multiples of ``step``;
    ``cache``: a JSON file of the measured costs, so an interrupted run resumes (``cut_costs``)."""
    elastic = [c for c in em.capacities if c in LAYER_COMPONENTS + GATED_COMPONENTS]
    comps = list(components) if components is not None else elastic
    if not comps:
        raise ValueError(f"no routed layer component to allocate; elastic components: {', '.join(em.capacities)}")
    if bad := [c for c in comps if c not in elastic or not any(c in b.capacity for b in em.blocks)]:
        raise ValueError(f"{', '.join(bad)} not routed in any layer of this model; routed layer components: "
                         f"{', '.join(elastic)}")
    if not hasattr(task, "distance") or not hasattr(task, "measure_input"):
        raise TypeError("allocate needs a task with distance(em) and measure_input(em) (LMTask, ViTTask)")
    if em.elastic_config.mode != "topk" and any(c in TOKEN_COMPONENTS for c in comps):
        raise ValueError("allocate the whole-model budget in top-k mode (em.set_mode('topk')): a threshold keeps "
                         "a data-dependent number of tokens, so their FLOPs cannot be measured once")
    caps = {c: cut_levels(em, c, step, levels) for c in comps}
    args, kwargs = task.measure_input(em)
    with em.scoring(scorer):
        costs = cut_costs(em, task, caps, progress, cache)
        table = flop_table(em, caps, args, kwargs)
    schedule = greedy_model_schedule(costs, caps, table)
    set_model_allocation(em, schedule)
    em._model_costs = {"costs": costs, "levels": caps, "table": table}  # for check_schedule and notes
    return schedule


# ----------------------------------------------------------------------------- the knob
def set_model_allocation(em, schedule) -> None:
    """Store a whole-model schedule in ``em.elastic_config.model_allocation`` (checked)."""
    from elastilab.core.config import check_model_allocation, layer_indices
    steps = check_model_allocation(schedule, em.elastic_config.components)
    layer_indices([s[0] for s in steps], len(em.adapter.layers(em.model)), "model_allocation")
    if steps != em.elastic_config.model_allocation:
        em.recommended = None  # chosen for another schedule (``core.recommend``)
    em.elastic_config.model_allocation = steps
    em.elastic_config.compute = None


def capacities_for(em, fraction: float) -> tuple[dict[int, dict[str, float]], float]:
    """({layer: {component: capacity}}, predicted whole-model compute) of the schedule's first cuts
    whose compute is still > fraction, plus the one that brings it to <= fraction."""
    steps = em.elastic_config.model_allocation
    if not steps:
        raise ValueError("no whole-model schedule yet: run el.allocate(em, calibration_task, budget='model') first "
                         "(or load routers saved after one)")
    n = len(em.adapter.layers(em.model))
    routed = {(b.layer_idx, c) for b in em.blocks for c in b.capacity}
    for layer, comp, _, _ in steps:
        if (layer % n, comp) not in routed:
            raise ValueError(f"the whole-model schedule cuts {comp} in layer {layer}, which is not routed in this "
                             f"model; routed components: {', '.join(em.capacities)}")
    if fraction < steps[-1][3] - 1e-9:
        raise ValueError(f"compute {fraction:g} is below the least the schedule reaches ({steps[-1][3]:.4f} of the "
                         "dense model); allocate with lower levels (step) or more components for less")
    per_layer: dict[int, dict[str, float]] = {}
    current = 1.0
    for layer, comp, cap, compute in steps:
        if current <= fraction + 1e-9:
            break
        per_layer.setdefault(layer % n, {})[comp] = cap
        current = compute
    return per_layer, current


def set_compute(em, fraction: float):
    """Put the whole model at ``fraction`` of its dense FLOPs (measured at allocation): every routed
    layer component takes the schedule's capacities, everything else is dense. The component knobs
    (``em.capacities``) show the mean capacity over their routed layers, ``em.layer_capacities`` each layer.
    A target such as "x1.05": the compute recommended for it, saved with the routers (``core.recommend``)."""
    if isinstance(fraction, str) and fraction[:1] in "xX":
        from elastilab.core.recommend import use_recommended
        return use_recommended(em, fraction)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or math.isnan(fraction):
        raise TypeError(f"compute must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"compute must be in (0, 1] (a fraction of the dense model's FLOPs), got {fraction}")
    per_layer, _ = capacities_for(em, float(fraction))
    cfg = em.elastic_config
    for b in em.blocks:
        for comp in b.capacity:
            b.capacity[comp] = per_layer.get(b.layer_idx, {}).get(comp, 1.0)
    for comp, layers in em.layer_capacities.items():
        if comp in LAYER_COMPONENTS + GATED_COMPONENTS:
            setattr(cfg, comp, sum(layers.values()) / len(layers))
    cfg.compute = float(fraction)
    return em


def schedule_table(em):
    """The stored schedule as a DataFrame: step, layer, component, capacity, compute after it."""
    import pandas as pd
    return pd.DataFrame([{"step": i + 1, "layer": layer, "component": comp, "capacity": cap, "compute": compute}
                         for i, (layer, comp, cap, compute) in enumerate(em.elastic_config.model_allocation)])


@contextmanager
def knob_kept(em):
    """Leave ``em`` as it was after trying other knob settings: every block's capacities, the component knobs
    and the whole-model compute."""
    cfg = em.elastic_config
    saved = ([dict(b.capacity) for b in em.blocks], cfg.capacities(), cfg.compute)
    try:
        yield em
    finally:
        for b, caps in zip(em.blocks, saved[0]):
            b.capacity = caps
        for comp, value in saved[1].items():
            setattr(cfg, comp, value)
        cfg.compute = saved[2]


@torch.no_grad()
def check_schedule(em, task, computes=(0.95, 0.9, 0.8), scorer="learned") -> list[dict]:
    """The schedule's prediction against a measurement on ``task`` at a few budgets: the sum of the
    cuts' isolated costs (what the greedy order assumed) and the distance measured with all of them
    at once (the interactions the isolated costs leave out). Needs the costs of ``allocate_model``."""
    info = getattr(em, "_model_costs", None)
    if info is None:
        raise ValueError("check_schedule needs the costs of allocate_model on this model (run it first)")
    out = []
    with knob_kept(em):
        for c in computes:
            per_layer, predicted = capacities_for(em, c)
            summed = 0.0
            for layer, caps in per_layer.items():
                for comp, cap in caps.items():
                    summed += info["costs"][(layer, comp)][info["levels"][comp].index(cap)]
            set_compute(em, c)
            with em.scoring(scorer):
                measured = float(task.distance(em))
            out.append({"compute": c, "predicted_compute": predicted, "summed_costs": summed, "measured": measured})
    return out
