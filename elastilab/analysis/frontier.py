"""The quality frontier: quality against *measured* compute, one line per selection method.

    df = el.frontier(em, blocks, scorers=("learned", "random", "magnitude", "oracle", "taylor"))
    el.plot_frontier(df)
    el.frontier_summary(df)     # learned vs best training-free vs oracle, router efficiency

A *task* holds the held-out data of one modality and turns a run of the elastic model into quality
numbers against the teacher (the same model with routers disabled), with one result schema:
``LMTask`` (perplexity ratio, KL, top-1 agreement), ``ViTTask`` (probe agreement, accuracy, feature
cosine) and ``VLMTask`` (answer accuracy, agreement). Every row of a frontier has the
same columns: scorer, component, capacity (requested), compute (measured FLOPs of the routed
sub-layer *plus the work of choosing* — a router, or e.g. the gate projection magnitude scores need —
over the dense sub-layer's), sublayer_compute (the routed sub-layer alone), model_compute (whole model,
choosing included, an oracle's excluded), scoring_cost (the choosing as a share of the dense model),
the task's quality numbers and its primary ``quality`` column.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import torch

from elastilab.analysis.palette import scorer_style
from elastilab.core.components import COMPONENTS
from elastilab.core.compute import measure_flops
from elastilab.scorers import SCORERS, supports
from elastilab.tasks.lm import LMTask
from elastilab.tasks.vit import ViTTask  # noqa: F401  (a frontier's tasks, one per modality)
from elastilab.tasks.vlm import VLMTask  # noqa: F401

#: the sub-layer each component saves compute in (its FLOPs are the frontier's x axis)
PART = {name: c.sublayer for name, c in COMPONENTS.items()}
ORACLES = tuple(n for n, s in SCORERS.items() if not s.counted)
TRAINING_FREE = tuple(n for n, s in SCORERS.items() if s.counted and n != "random")


def as_task(data):
    if hasattr(data, "evaluate") and hasattr(data, "measure_input"):
        return data
    if torch.is_tensor(data) and data.dtype == torch.long:
        return LMTask(data)
    raise TypeError("frontier data must be token blocks (LongTensor [N, T]) or a task (LMTask, ViTTask, VLMTask)")


def frontier(em, data, components=None, capacities=(0.9, 0.75, 0.5), scorers=("learned", "random", "oracle"),
             progress: bool = True) -> pd.DataFrame:
    """Quality vs measured compute for each scorer x component x capacity, one component routed at
    a time (the others dense). Combinations a scorer does not support are skipped (listed in
    ``df.attrs["skipped"]``). Capacity 1.0 is the teacher: one row per scorer and component."""
    from tqdm.auto import tqdm
    task = as_task(data)
    elastic = list(em.capacities)
    comps = list(components) if components else elastic
    missing = [c for c in comps if c not in elastic]
    if missing:
        raise ValueError(f"{missing} not elastic in this model; elastic components: {', '.join(elastic)}")
    caps = sorted({float(c) for c in capacities} - {1.0}, reverse=True)
    for c in caps:
        if not 0 < c < 1:
            raise ValueError(f"frontier capacities must be in (0, 1], got {c}")
    names = [s if isinstance(s, str) else s.name for s in scorers]
    base = {c: 1.0 for c in em.capacities}
    args, kwargs = task.measure_input(em)
    with em.capacity(**base):
        dense_q = task.evaluate(em)
        dense = measure_flops(em, *args, **kwargs)
    rows, skipped = [], []
    todo = [(c, s, n) for c in comps for s, n in zip(scorers, names)]
    bar = tqdm(total=len(todo) * len(caps), desc="frontier", disable=not progress)
    for comp, scorer, name in todo:
        if not supports(scorer, em, comp):
            skipped.append((name, comp))
            bar.update(len(caps))
            continue
        allocation = "budget" if comp in em.elastic_config.allocation else "uniform"
        rows.append({"scorer": name, "component": comp, "allocation": allocation, "capacity": 1.0, "compute": 1.0,
                     "sublayer_compute": 1.0,
                     "model_compute": 1.0, "scoring_cost": 0.0, **dense_q})
        for cap in caps:
            with em.capacity(**{**base, comp: cap}):
                if not supports(scorer, em, comp):  # e.g. ToMe where a budget cuts a layer below 0.5
                    skipped.append((name, f"{comp} at {cap:g}"))
                    bar.update(1)
                    continue
                with em.scoring(scorer):
                    q = task.evaluate(em)
                    f = measure_flops(em, *args, **kwargs)
            part = PART[comp]
            # the cost of choosing counts against the sub-layer it saves in (a router's Linear, or
            # e.g. the gate projection magnitude scores need first); an oracle's is not counted
            choosing = f["routers"] if part != "total" else 0
            rows.append({"scorer": name, "component": comp, "allocation": allocation, "capacity": cap,
                         "compute": (f[part] + choosing) / dense[part], "sublayer_compute": f[part] / dense[part],
                         "model_compute": f["total"] / dense["total"], "scoring_cost": f["routers"] / dense["total"],
                         **q})
            bar.update(1)
    bar.close()
    df = pd.DataFrame(rows)
    df.attrs.update(skipped=skipped, metric=task.metric, higher_is_better=task.higher_is_better)
    return df


def frontier_summary(df: pd.DataFrame, metric: str | None = None,
                     higher_is_better: bool | None = None) -> pd.DataFrame:
    """Per component and capacity: random, learned, the best training-free scorer, the best oracle,
    and the router efficiency = share of the random -> oracle gap the learned router closes
    (on log perplexity ratio for LMs, on the metric itself otherwise)."""
    metric = metric or df.attrs.get("metric", "quality")
    hib = df.attrs.get("higher_is_better", True) if higher_is_better is None else higher_is_better
    val = (lambda v: v) if hib else (lambda v: -np.log(v))  # larger is better on this scale
    out = []
    budgets = "allocation" in df  # results written before budgets existed have one capacity per layer
    if not budgets:
        df = df.assign(allocation="uniform")
    for (comp, alloc, cap), g in df[df.capacity < 1].groupby(["component", "allocation", "capacity"], sort=False):
        by = dict(zip(g.scorer, g[metric]))
        compute = dict(zip(g.scorer, g.compute))
        # compute: the learned router's (random's without one)
        row = {"component": comp, "allocation": alloc, "capacity": cap,
               "compute": compute.get("learned", compute.get("random", float(g.compute.min()))),
               "random": by.get("random", np.nan), "learned": by.get("learned", np.nan)}
        free = {k: v for k, v in by.items() if k in TRAINING_FREE}
        best = max(free, key=lambda k: val(free[k])) if free else None
        row.update(best_training_free=best, training_free=free[best] if best else np.nan,
                   training_free_compute=compute[best] if best else np.nan)
        orc = {k: v for k, v in by.items() if k in ORACLES}
        best = max(orc, key=lambda k: val(orc[k])) if orc else None
        row.update(best_oracle=best, oracle=orc[best] if best else np.nan)
        gap = val(row["oracle"]) - val(row["random"])
        row["router_efficiency"] = (val(row["learned"]) - val(row["random"])) / gap if gap > 0 else np.nan
        out.append(row)
    out = pd.DataFrame(out)
    return out if budgets else out.drop(columns="allocation")


def plot_frontier(df: pd.DataFrame, metric: str | None = None, x: str = "compute", axes=None, title: str = ""):
    """One panel per component: quality against measured compute, a line per scorer; the region
    beyond the best oracle (no router choosing by the same units gets there) shaded."""
    import matplotlib.pyplot as plt
    metric = metric or df.attrs.get("metric", "quality")
    hib = df.attrs.get("higher_is_better", True)
    comps = list(dict.fromkeys(df.component))
    if axes is None:
        # room for the legend at the right: a one-panel figure is wide enough for its title and labels
        fig, axes = plt.subplots(1, len(comps), figsize=(3.0 * len(comps) + 2.4, 3.2), squeeze=False,
                                 layout="constrained")
        axes = axes[0]
    for ax, comp in zip(axes, comps):
        g = df[df.component == comp]
        if not hib and metric == "ppl_ratio":
            ax.set_yscale("log")
        keys = ["scorer", "allocation"] if "allocation" in g else ["scorer"]
        for key, s in g.groupby(keys, sort=False):
            name, alloc = (key[0] if isinstance(key, tuple) else key, "uniform") if len(keys) == 1 else key
            s = s.sort_values("capacity")  # a frontier is traced by the capacity knob
            color, marker, ls = scorer_style(name)
            if alloc == "budget":  # the same selector with its budget allocated across layers: filled, solid
                ax.plot(s[x], s[metric], color=color, marker=marker, ls="-", lw=2, ms=5, mfc=color,
                        label=f"{name}, budget across layers")
            else:
                ax.plot(s[x], s[metric], color=color, marker=marker, ls=ls, ms=4, label=name)
        orc = g[g.scorer.isin(ORACLES)]
        if len(orc):  # shade what lies beyond the best oracle: no selector by the same units gets there
            best = (orc.groupby(x)[metric].max() if hib else orc.groupby(x)[metric].min()).sort_index()
            lim = ax.get_ylim()
            ax.fill_between(best.index, best.values, lim[1] if hib else lim[0], color=scorer_style("oracle").color,
                            alpha=0.08, lw=0)
            ax.set_ylim(lim)
        ax.set_title(comp, fontsize=9)
        ax.set_xlabel(f"measured {x.replace('_', ' ')} (fraction of dense)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric.replace("_", " "), fontsize=8)
    handles = {}
    for ax in axes:  # one legend for every scorer of every panel
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    # centred at the right, clear of the title
    axes[0].figure.legend(handles.values(), handles.keys(), fontsize=7, loc="outside right center")
    if title:  # wrapped to the figure's width, so a long title (a command line) fits
        fig = axes[0].figure
        width = max(20, int(fig.get_figwidth() * 72 / (10 * 0.6)))  # characters of 10 pt text per line
        fig.suptitle(textwrap.fill(title, width), fontsize=10)
    return axes[0].figure


def max_saving(df: pd.DataFrame, tolerance: float, metric: str | None = None, x: str = "compute") -> pd.DataFrame:
    """Per component and scorer: the largest measured saving (1 - compute) among the frontier points
    whose quality stays within ``tolerance`` of the teacher (a ratio <= 1 + tolerance for perplexity,
    a drop <= tolerance otherwise); 0 where no routed point does."""
    metric = metric or df.attrs.get("metric", "quality")
    hib = df.attrs.get("higher_is_better", metric != "ppl_ratio")
    teacher = 1.0 if metric == "ppl_ratio" else None
    rows = []
    if "allocation" in df:  # a budget across layers is another way to trace the frontier
        df = df.assign(scorer=[s if a == "uniform" else f"{s} ({a})" for s, a in zip(df.scorer, df.allocation)])
    for (comp, name), g in df.groupby(["component", "scorer"], sort=False):
        ref = teacher if teacher is not None else float(g[g.capacity == 1.0][metric].iloc[0])
        ok = g[(g[metric] >= ref - tolerance) if hib else (g[metric] <= ref * (1 + tolerance))]
        best = ok.loc[ok[x].idxmin()] if len(ok) else None
        rows.append({"component": comp, "scorer": name, "saving": 0.0 if best is None else 1 - float(best[x]),
                     "at_capacity": None if best is None else float(best.capacity),
                     metric: None if best is None else float(best[metric])})
    return pd.DataFrame(rows)
