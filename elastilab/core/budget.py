"""A compute budget allocated across layers: one knob per component, per-layer capacities underneath.

One capacity for every layer spends the budget where it hurts most: in SmolLM2-135M the MLP of
layer 0 alone costs x44 perplexity at half its slices, while most layers lose a few percent.
``allocate`` measures what each layer's component costs at each level (that layer alone routed,
everything else dense, on *calibration* data: never the data you report), then orders the cuts
greedily, cheapest loss per unit of compute first. The result is a schedule of (layer, capacity)
steps; a budget b replays steps until the mean capacity over the routed layers is <= b, so every
budget's allocation contains the larger budgets' cuts (the slider moves smoothly) and the slider
value is the fraction of the component's compute, as with one uniform capacity.

    schedule = el.allocate(em, "mlp_experts", el.LMTask(calibration_blocks))
    em.set_capacity(mlp_experts=0.5)   # now a budget: em.layer_capacities shows where it went
"""
from __future__ import annotations

from itertools import accumulate

import torch

from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS

#: the deepest cut a layer is measured at (below it every layer is simply scaled: capacities_at)
LOWEST = 0.25


def levels(em, component: str, step: float = 0.125) -> list[float]:
    """Capacities a layer can take, realisable exactly: k/H heads, whole groups of expert slices,
    multiples of ``step`` of the tokens; from 1.0 down to LOWEST."""
    blocks = [b for b in em.blocks if component in b.capacity]
    if not blocks:
        raise ValueError(f"{component} is not routed in any layer of this model")
    b = blocks[0]
    if component == "attn_heads":
        n = b.adapter.block_spec(b.base_layer, b.layer_idx).attn.n_heads
        out = [k / n for k in range(n, 0, -1)]
    elif component == "mlp_experts":
        group = max(1, round(b.n_experts * step))  # e.g. 64 slices move 8 at a time
        out = [k / b.n_experts for k in range(b.n_experts, 0, -group)]
    else:
        n = round(1 / step)
        out = [k / n for k in range(n, 0, -1)]
    return [c for c in out if c >= LOWEST - 1e-9]


@torch.no_grad()
def layer_costs(em, component: str, task, capacities: list[float], progress: bool = True) -> dict[int, list[float]]:
    """{layer: [cost at each capacity]}: the task's ``distance`` from the teacher with only that
    layer's component routed (the other layers and components dense)."""
    from tqdm.auto import tqdm
    blocks = [b for b in em.blocks if component in b.capacity]
    saved = [dict(b.capacity) for b in em.blocks]
    costs = {b.layer_idx: [] for b in blocks}
    try:
        for b in em.blocks:
            b.capacity = {c: 1.0 for c in b.capacity}
        for b in tqdm(blocks, desc=f"{component} per layer", disable=not progress):
            for cap in capacities:
                b.capacity[component] = cap
                costs[b.layer_idx].append(0.0 if cap >= 1.0 else float(task.distance(em)))
            b.capacity[component] = 1.0
    finally:
        for b, s in zip(em.blocks, saved):
            b.capacity = s
    return costs


def monotone(costs: dict) -> dict:
    """Each cost curve (capacities from high to low) made non-increasing in capacity: a running maximum, so a
    noisy measurement never makes a deeper cut look cheaper than a shallower one."""
    return {key: list(accumulate(c, max, initial=0.0))[1:] for key, c in costs.items()}


def greedy_schedule(costs: dict[int, list[float]], capacities: list[float]) -> list[tuple[int, float]]:
    """The cut order: repeatedly the (layer, lower capacity) with the least added cost per unit of
    compute saved (any lower level, not only the next one, so a layer whose cost curve bends is
    not stuck behind a bad first step). Costs are made non-increasing in capacity first (a noisy
    measurement must not make a deeper cut look free)."""
    mono = monotone(costs)
    at = {layer: 0 for layer in costs}  # index into capacities, 0 = 1.0
    steps = []
    while True:
        best = None
        for layer, i in at.items():
            for j in range(i + 1, len(capacities)):
                saved = capacities[i] - capacities[j]
                ratio = (mono[layer][j] - mono[layer][i]) / saved
                if best is None or ratio < best[0] - 1e-12:
                    best = (ratio, layer, j)
        if best is None:
            return steps
        _, layer, j = best
        at[layer] = j
        steps.append((layer, capacities[j]))


def capacities_at(schedule, layers: list[int], budget: float, pinned=()) -> dict[int, float]:
    """Per-layer capacities for a budget: the schedule's cuts, in order, until the mean capacity of
    ``layers`` is <= budget (pinned layers stay at 1.0 and count in the mean). Below what the
    schedule reaches, every unpinned layer is capped at the budget's share, so the knob keeps going."""
    caps = {i: 1.0 for i in layers}
    free = [i for i in layers if i not in pinned]
    mean = lambda: sum(caps.values()) / len(caps)
    for layer, cap in schedule:
        if mean() <= budget + 1e-9:
            return caps
        if layer in caps and layer not in pinned:
            caps[layer] = cap
    if mean() > budget + 1e-9 and free:  # past the schedule's end: scale the rest down evenly
        scale = max(0.0, budget * len(caps) - (len(caps) - len(free))) / sum(caps[i] for i in free)
        for i in free:
            caps[i] = max(caps[i] * scale, 1e-6)
    return caps


def allocate(em, component, task=None, step: float = 0.125, scorer="learned", progress: bool = True,
             budget: str = "layers", **model_options) -> list[tuple]:
    """Measure every layer's cost of ``component`` on ``task`` (calibration data) when ``scorer``
    chooses (the routers by default; e.g. "oracle" for a model without trained routers), store the
    greedy schedule in the model (``em.set_allocation``; saved with the routers) and return it.

    ``allocate(em, task, budget="model")``: one schedule over every routed component and layer for the
    whole-model knob ``em.set_compute`` (``global_budget.allocate_model``, which takes ``model_options``)."""
    if budget == "model":
        from elastilab.core.global_budget import allocate_model
        if task is not None or isinstance(component, str):
            raise TypeError("budget='model' allocates every routed component at once: call "
                            "allocate(em, task, budget='model') (components=[...] to choose some)")
        return allocate_model(em, component, step=step, scorer=scorer, progress=progress, **model_options)
    if budget != "layers":
        raise ValueError(f"budget must be 'layers' (one component across its layers) or 'model' (one knob over "
                         f"every component and layer), got {budget!r}")
    if model_options:
        raise TypeError(f"allocate got unexpected arguments {sorted(model_options)} (they belong to budget='model')")
    if task is None:
        raise TypeError("allocate(em, component, task) needs a task (calibration data), e.g. el.LMTask(blocks)")
    if component not in LAYER_COMPONENTS + GATED_COMPONENTS:
        raise ValueError(f"a budget is allocated across layers for {', '.join(LAYER_COMPONENTS + GATED_COMPONENTS)}, "
                         f"not {component!r}")
    if component not in em.capacities:
        raise ValueError(f"{component} is not elastic in this model; elastic components: "
                         f"{', '.join(em.capacities)}")
    if not hasattr(task, "distance"):
        raise TypeError("allocate needs a task with a distance(em) method (LMTask, ViTTask)")
    caps = levels(em, component, step)
    with em.scoring(scorer):
        costs = layer_costs(em, component, task, caps, progress)
    schedule = greedy_schedule(costs, caps)
    em.set_allocation(**{component: schedule})
    return schedule

