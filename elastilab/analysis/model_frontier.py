"""The "one knob" frontier: whole-model measured compute against held-out quality for the global
budget (``global_budget``), next to the single-component points, with two oracle lines that tell
where the limit is:

- ``model`` (the routers, or a training-free scorer, choose; costs measured as they choose),
- ``model, learned schedule`` (the same schedule, the oracle chooses): the gap to the first line is
  the cost of *choosing*,
- ``model`` with scorer ``oracle`` (the oracle's own costs and choices): its gap to the second line
  is what a better *allocation* would buy; what it still loses is the *model's* limit at these cuts.

``elastilab frontier --allocate-model DOMAIN`` runs it (``commands.cmd_frontier``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from elastilab.core.compute import measure_flops
from elastilab.core.global_budget import allocate_model, capacities_for, set_model_allocation

#: default whole-model compute targets of the frontier
COMPUTES = (0.97, 0.95, 0.92, 0.9, 0.87, 0.85, 0.8)


def model_frontier(em, task, calibration, chooser="learned", oracle="oracle", computes=COMPUTES, levels=None,
                   step: float = 0.125, cache: str | Path | None = None, progress: bool = True,
                   oracle_schedule: bool = True) -> pd.DataFrame:
    """Rows of the global budget's frontier on ``task`` (held-out), its schedule measured on
    ``calibration`` (disjoint data): for ``chooser``, for ``oracle`` choosing under the chooser's
    schedule, and (``oracle_schedule``) for ``oracle`` with its own schedule, a second calibration
    pass (``oracle=None``: only the first line). Leaves the chooser's schedule in ``em`` (to be saved
    with the routers)."""
    for c in computes:
        if not 0 < c <= 1:
            raise ValueError(f"compute targets must be in (0, 1], got {c}")
    args, kwargs = task.measure_input(em)
    base = {c: 1.0 for c in em.capacities}
    with em.capacity(**base):
        dense_q = task.evaluate(em)
        dense = measure_flops(em, *args, **kwargs)
    schedules = {}
    for name in [chooser] + ([oracle] if oracle and oracle_schedule else []):
        sub = None if cache is None else Path(cache) / f"costs-{name}"
        schedules[name] = allocate_model(em, calibration, step=step, scorer=name, levels=levels,
                                         progress=progress, cache=sub)
    lines = [(chooser, chooser, "model")]
    if oracle:
        lines.append((chooser, oracle, f"model, {chooser} schedule"))
        if oracle_schedule:
            lines.append((oracle, oracle, "model"))
    rows = []
    for schedule, scorer, allocation in lines:
        set_model_allocation(em, schedules[schedule])
        rows.append({"scorer": scorer, "component": "model", "allocation": allocation, "capacity": 1.0,
                     "compute": 1.0, "sublayer_compute": 1.0, "model_compute": 1.0, "scoring_cost": 0.0,
                     "predicted_compute": 1.0, **dense_q})
        for target in sorted(set(computes) - {1.0}, reverse=True):
            em.set_compute(target)
            with em.scoring(scorer):
                q = task.evaluate(em)
                f = measure_flops(em, *args, **kwargs)
            mc = f["total"] / dense["total"]
            rows.append({"scorer": scorer, "component": "model", "allocation": allocation, "capacity": target,
                         "compute": mc, "sublayer_compute": mc, "model_compute": mc,
                         "scoring_cost": f["routers"] / dense["total"],
                         "predicted_compute": capacities_for(em, target)[1], **q})
    set_model_allocation(em, schedules[chooser])
    em.set_capacity(**base)  # dense again, the chooser's schedule stored
    return pd.DataFrame(rows)


def model_savings(df: pd.DataFrame, tolerances=(0.01, 0.05)) -> pd.DataFrame:
    """Per line (component, scorer, allocation): the largest measured whole-model saving among the
    points whose perplexity ratio is <= 1 + tolerance, and the point's capacity and ratio."""
    rows = []
    for (comp, scorer, alloc), g in df.groupby(["component", "scorer", "allocation"], sort=False):
        row = {"component": comp, "scorer": scorer, "allocation": alloc}
        for tol in tolerances:
            ok = g[g.ppl_ratio <= 1 + tol + 1e-12]
            best = ok.loc[ok.model_compute.idxmin()] if len(ok) else None
            row[f"saving@{1 + tol:g}"] = 0.0 if best is None else 1 - float(best.model_compute)
            row[f"capacity@{1 + tol:g}"] = np.nan if best is None else float(best.capacity)
            row[f"ppl_ratio@{1 + tol:g}"] = np.nan if best is None else float(best.ppl_ratio)
        rows.append(row)
    return pd.DataFrame(rows)


def plot_model_frontier(df: pd.DataFrame, title: str = ""):
    """Perplexity ratio against whole-model measured compute: the global budget's lines bold, each
    single component's points thin behind them, the x1.01 and x1.05 marks dotted."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    ax.set_yscale("log")
    single = df[df.component != "model"]
    colors = {}
    for (comp, scorer, alloc), g in single.groupby(["component", "scorer", "allocation"], sort=False):
        g = g.sort_values("model_compute")
        color = colors.setdefault(comp, f"C{len(colors) + 4}")
        marker = {"oracle": "^", "taylor": "v", "random": "x", "magnitude": "s"}.get(scorer, "o")
        label = f"{comp}, {scorer}" + (", budget across layers" if alloc == "budget" else "")
        ax.plot(g.model_compute, g.ppl_ratio, color=color, marker=marker, ms=4, lw=0.8, alpha=0.7,
                ls="--" if scorer in ("oracle", "taylor") else "-", label=label)
    style = {"model": ("C0", "o", "-"), "model, oracle": ("C3", "^", "--")}
    for (scorer, alloc), g in df[df.component == "model"].groupby(["scorer", "allocation"], sort=False):
        g = g.sort_values("model_compute")
        key = "model" if alloc == "model" and scorer != "oracle" else "model, oracle"
        color, marker, ls = style[key]
        if alloc != "model":  # the oracle choosing under the chooser's schedule
            ls, marker = ":", "D"
        ax.plot(g.model_compute, g.ppl_ratio, color=color, marker=marker, ms=5, lw=2, ls=ls,
                label=f"one knob: {alloc}, {scorer} chooses")
    for y in (1.01, 1.05):
        ax.axhline(y, color="0.4", lw=0.7, ls=":")
    ax.set_xlabel("measured whole-model compute (fraction of dense FLOPs)", fontsize=8)
    ax.set_ylabel("held-out perplexity ratio", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper right")
    if title:
        ax.set_title(title, fontsize=8)
    return fig
