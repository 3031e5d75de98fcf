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

import numpy as np
import pandas as pd
import torch

from .compute import measure_flops
from .distill import evaluate, teacher_logits
from .scorers import SCORERS, supports

#: the sub-layer each component saves compute in (its FLOPs are the frontier's x axis)
PART = {"attn_tokens": "attention", "attn_heads": "attention", "mlp_tokens": "mlp", "mlp_experts": "mlp", "mlp_units": "mlp",
        "visual_tokens": "total"}
ORACLES = tuple(n for n, s in SCORERS.items() if not s.counted)
TRAINING_FREE = tuple(n for n, s in SCORERS.items() if s.counted and n != "random")


class LMTask:
    """Causal LM quality on held-out token blocks [N, T] (``distill.evaluate``); the teacher's logits
    are computed once and reused for every point of a frontier."""

    metric, higher_is_better = "ppl_ratio", False

    def __init__(self, blocks: torch.Tensor, batch_size: int = 4):
        if not torch.is_tensor(blocks) or blocks.dim() != 2 or blocks.dtype != torch.long or len(blocks) == 0:
            raise ValueError("LMTask takes token blocks: a non-empty LongTensor [n_blocks, seq_len]")
        self.blocks, self.batch_size = blocks, batch_size
        self.teacher: list | None = None

    def measure_input(self, em):
        return (self.blocks[:1],), {}

    def evaluate(self, em) -> dict:
        if self.teacher is None:
            self.teacher = teacher_logits(em, self.blocks, self.batch_size)
        r = evaluate(em, self.blocks, self.batch_size, teacher=self.teacher)
        return {"quality": r["ppl_ratio"], **r}

    def distance(self, em) -> float:
        """How far the elastic model is from the teacher: mean KL of the next-token distributions
        (what ``budget.allocate`` minimises)."""
        return self.evaluate(em)["kl"]


class ViTTask:
    """ViT quality on held-out images: agreement of a probe's (or the model's own head's) top-1 with
    the teacher's, accuracy when labels are given, and cosine of the final hidden states."""

    higher_is_better = True

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor | None = None, probe=None, batch_size: int = 32):
        if not torch.is_tensor(pixels) or pixels.dim() != 4 or not bool(torch.isfinite(pixels).all()):
            raise ValueError("ViTTask takes finite preprocessed images [N, 3, H, W]")
        self.pixels, self.labels, self.probe, self.batch_size = pixels, labels, probe, batch_size
        self.teacher = None
        self.metric = "agreement"

    def measure_input(self, em):
        from .tasks.vit import _call_kwargs
        return _call_kwargs(em, self.pixels[:4])

    @torch.no_grad()
    def evaluate(self, em) -> dict:
        from .tasks.vit import evaluate_vit, teacher_outputs
        if self.teacher is None:
            self.teacher = teacher_outputs(em, self.pixels, self.probe, self.batch_size)
            if not self.teacher[1].numel():
                self.metric = "cosine"
        r = evaluate_vit(em, self.pixels, self.labels, self.probe, self.batch_size, teacher=self.teacher,
                         measure=False)
        return {"quality": r[self.metric], **r}

    def distance(self, em) -> float:
        """1 - cosine of the final hidden states with the teacher's (what ``budget.allocate`` minimises)."""
        return 1.0 - self.evaluate(em)["cosine"]


class VLMTask:
    """Visual-language quality on held-out questions: accuracy of the greedy answer's first token
    (digits and faces of tiny-llava), agreement and KL with the teacher. ``items`` and the projected
    ``image_features`` as ``elastilab.tasks.vlm.tiny_llava_data`` returns them."""

    metric, higher_is_better = "acc", True

    def __init__(self, tokenizer, items, image_features: torch.Tensor, batch_size: int = 16):
        if len(items) != len(image_features) or not items:
            raise ValueError(f"VLMTask needs one image per item, got {len(items)} items and "
                             f"{len(image_features)} images")
        self.tokenizer, self.items, self.features, self.batch_size = tokenizer, items, image_features, batch_size
        self._teacher: dict = {}  # the teacher's logits per batch, computed once per model
        self._teacher_of = None
        self.records: list[dict] = []

    def per_item_table(self) -> pd.DataFrame:
        """One row per item (task, answer), the teacher's hit, and per evaluation so far
        ("<selector>@<capacity>") the student's hit and its agreement with the teacher (0/1)."""
        cols = {"task": [it["task"] for it in self.items], "answer": [it["answer"] for it in self.items]}
        for rec in self.records:
            cols.setdefault("teacher", rec["teacher"])
            name = f"{rec['selector']}@{rec['capacity']:g}"
            cols[name], cols[f"{name}_agree"] = rec["student"], rec["agree"]
        return pd.DataFrame(cols)

    def measure_input(self, em):
        from .zoo.tiny_llava import text_batch
        it = self.items[0]
        b = text_batch(self.tokenizer, [it["question"]], [it["answer"]])
        return (), dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], image_features=self.features[:1])

    def evaluate(self, em) -> dict:
        from .tasks.vlm import evaluate
        if self._teacher_of is not em:
            self._teacher, self._teacher_of = {}, em
        r = evaluate(em, self.tokenizer, self.items, self.features, self.batch_size, measure=False,
                     teacher_cache=self._teacher, per_item=True)
        # per-item hits of each evaluation, for paired comparisons between scorers (``per_item_table``)
        self.records.append({"selector": getattr(em, "selector", None),
                             "capacity": getattr(em, "visual_capacity", None), **r.pop("per_item")})
        return {"quality": r["acc"], **r}


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
                         "model_compute": f["total"] / dense["total"], "scoring_cost": f["routers"] / dense["total"], **q})
            bar.update(1)
    bar.close()
    df = pd.DataFrame(rows)
    df.attrs.update(skipped=skipped, metric=task.metric, higher_is_better=task.higher_is_better)
    return df


def frontier_summary(df: pd.DataFrame, metric: str | None = None, higher_is_better: bool | None = None) -> pd.DataFrame:
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
        row = {"component": comp, "allocation": alloc, "capacity": cap,  # compute: the learned router's (random's without one)
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


STYLE = {"learned": ("C0", "o", "-"), "random": ("0.5", "x", ":"), "oracle": ("C3", "^", "--"),
         "taylor": ("C1", "v", "--"), "magnitude": ("C2", "s", "-."), "attention_received": ("C4", "s", "-."),
         "cls_attention": ("C5", "s", "-."), "fastv": ("C4", "s", "-."), "lowrank_gate": ("C9", "D", "-"),
         "two_stage": ("C1", "P", "-")}


def plot_frontier(df: pd.DataFrame, metric: str | None = None, x: str = "compute", axes=None, title: str = ""):
    """One panel per component: quality against measured compute, a line per scorer; the region
    beyond the best oracle (no router choosing by the same units gets there) shaded."""
    import matplotlib.pyplot as plt
    metric = metric or df.attrs.get("metric", "quality")
    hib = df.attrs.get("higher_is_better", True)
    comps = list(dict.fromkeys(df.component))
    if axes is None:
        fig, axes = plt.subplots(1, len(comps), figsize=(3.4 * len(comps), 3.0), squeeze=False, layout="constrained")
        axes = axes[0]
    for ax, comp in zip(axes, comps):
        g = df[df.component == comp]
        if not hib and metric == "ppl_ratio":
            ax.set_yscale("log")
        keys = ["scorer", "allocation"] if "allocation" in g else ["scorer"]
        for key, s in g.groupby(keys, sort=False):
            name, alloc = (key, "uniform") if len(keys) == 1 else key
            s = s.sort_values("capacity")  # a frontier is traced by the capacity knob
            color, marker, ls = STYLE.get(name, ("k", ".", "-"))
            if alloc == "budget":  # the same selector with its budget allocated across layers: filled, solid
                ax.plot(s[x], s[metric], color=color, marker=marker, ls="-", lw=2, ms=5, mfc=color,
                        label=f"{name}, budget across layers")
            else:
                ax.plot(s[x], s[metric], color=color, marker=marker, ls=ls, ms=4, label=name)
        orc = g[g.scorer.isin(ORACLES)]
        if len(orc):  # shade what lies beyond the best oracle: no selector by the same units gets there
            best = (orc.groupby(x)[metric].max() if hib else orc.groupby(x)[metric].min()).sort_index()
            lim = ax.get_ylim()
            ax.fill_between(best.index, best.values, lim[1] if hib else lim[0], color="C3", alpha=0.08, lw=0)
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
    axes[0].figure.legend(handles.values(), handles.keys(), fontsize=7, loc="outside right upper")
    if title:
        axes[0].figure.suptitle(title, fontsize=10)
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
