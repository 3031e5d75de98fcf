"""Language-model experiments (SmolLM2 with the shipped routers in the README and notebook 01): what
each layer skips, quality per component against untrained routers, where token routing hurts and what
keeping those layers dense buys, the two attention-token variants, requested vs measured compute of
the causal modes. Each is a function of an elastic model and token blocks returning one tidy table,
built on ``analysis.frontier``; ``elastilab lm ...`` (``cli/lm.py``) runs them from the shell.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from elastilab.analysis.frontier import LMTask, frontier
from elastilab.core.config import TOKEN_COMPONENTS, ElasticConfig

EDGES = (0, 1, -2, -1)  # the layers where token routing of SmolLM2 costs most (layer_damage)
#: (layers kept dense, capacity of the others): pairs whose measured SmolLM2 compute matches within 1%
SETTINGS = (((), 0.75), (EDGES, 0.72), ((), 0.5), (EDGES, 0.43))


# ---------------------------------------------------------------- helpers
def _alone(em, component: str, capacity: float) -> dict:
    """Capacities routing only ``component`` (the others dense)."""
    return {**{c: 1.0 for c in em.capacities}, component: capacity}


def _n_layers(em) -> int:
    return len(em.adapter.layers(em.model))


@contextmanager
def _kept_dense(em, components, layers):
    """``em.keep_dense`` these layers of each component for the block, then the layers kept before."""
    old = {c: em.elastic_config.keep_dense.get(c, ()) for c in components}
    em.keep_dense(**{c: layers for c in components})
    try:
        yield em
    finally:
        em.keep_dense(**old)


def _label(layers) -> str:
    return " ".join(map(str, layers)) or "none"


def _learned(em, task, components, capacities, **kw) -> pd.DataFrame:
    """The learned routers' frontier rows, indexed by (component, capacity)."""
    df = frontier(em, task, components=components, capacities=capacities, scorers=("learned",), **kw)
    return df.set_index(["component", "capacity"])


# ---------------------------------------------------------------- what each layer chooses
@torch.no_grad()
def routing_map(em, ids: torch.Tensor, component: str, capacity: float) -> np.ndarray:
    """keep[layer, token] (bool) of one token component at ``capacity``, the others dense, for the
    first sequence of ``ids``; a layer that does not route it (no router, kept dense) keeps every token."""
    with em.capacity(**_alone(em, component, capacity)):
        trace = em.trace(ids)
    return trace.map(component, tuple(ids.shape))[:, 0]


@torch.no_grad()
def slot_usage(em, ids: torch.Tensor, component: str, capacity: float, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """For a head or expert component at ``capacity`` (others dense), on one sequence ids [1, T]:
    (token x slot map of ``layer``, 0/1 [T, n], and the share of tokens using each slot per layer [L, n])."""
    if ids.shape[0] != 1:
        raise ValueError(f"slot_usage takes one sequence, ids [1, T]; got {tuple(ids.shape)}")
    with em.capacity(**_alone(em, component, capacity)):
        trace = em.trace(ids)
    return trace.slot_map(component, layer), trace.usage(component)


# ---------------------------------------------------------------- experiments
def quality_table(em, domains: dict, capacities=(0.75, 0.5), label: str = "learned",
                  progress: bool = False) -> pd.DataFrame:
    """Quality vs the teacher and measured compute of each component alone (the others dense), per
    domain {name: token blocks}; capacity 1.0 rows are the measured teacher. ``label`` names the routers."""
    rows = []
    for domain, blocks in domains.items():
        df = frontier(em, blocks, capacities=capacities, scorers=("learned",), progress=progress)
        rows.append(pd.DataFrame({"routers": label, "domain": domain, "component": df.component,
                                  "capacity": df.capacity, "compute_fraction": df.sublayer_compute,
                                  "model_compute_fraction": df.model_compute,
                                  **{k: df[k]
                                     for k in ("teacher_ppl", "student_ppl", "ppl_ratio", "kl", "agreement")}}))
    return pd.concat(rows, ignore_index=True)


def untrained_like(em, seed: int = 0):
    """Fresh (untrained) routers on the same model and components, the baseline of ``quality_table``;
    ``em``'s wrapper is removed first (a model holds one elastic wrapper)."""
    from elastilab.core.model import elastify
    config = em.elastic_config
    model = em.unelastify()
    torch.manual_seed(seed)
    return elastify(model, ElasticConfig(**config.capacities(), n_experts=config.n_experts))


def layer_damage(em, blocks: torch.Tensor, components=TOKEN_COMPONENTS, capacity: float = 0.5) -> pd.DataFrame:
    """One layer at a time: ``capacity`` in that layer only (every other layer kept dense), perplexity
    ratio vs the teacher on ``blocks``. ``routed`` is False where the layer has no such router."""
    task, layers, rows = LMTask(blocks), range(_n_layers(em)), []
    for comp in components:
        for layer in layers:
            with _kept_dense(em, [comp], [i for i in layers if i != layer]), em.capacity(**_alone(em, comp, capacity)):
                routed = em.layer_capacities[comp].get(layer, 1.0) < 1.0  # attn_tokens: layer 0 never is
                rows.append({"component": comp, "layer": layer, "routed": routed,
                             "ppl_ratio": round(task.evaluate(em)["ppl_ratio"], 4)})
    return pd.DataFrame(rows)


def keep_dense_table(em, domains: dict, components=TOKEN_COMPONENTS, settings=SETTINGS,
                     progress: bool = False) -> pd.DataFrame:
    """Every layer routed vs some layers kept dense, per domain {name: token blocks}, component and
    setting (layers kept dense, capacity of the others): measured sub-layer compute and quality."""
    rows = []
    for domain, blocks in domains.items():
        task, runs = LMTask(blocks), {}
        for kept in dict.fromkeys(k for k, _ in settings):  # one frontier per set of dense layers
            with _kept_dense(em, components, kept):
                runs[kept] = _learned(em, task, components, [c for k, c in settings if k == kept], progress=progress)
        for comp in components:
            for kept, cap in settings:
                r = runs[kept].loc[(comp, float(cap))]
                rows.append({"domain": domain, "component": comp, "kept_dense": _label(kept), "capacity": cap,
                             "compute_fraction": round(r.sublayer_compute, 4), "ppl_ratio": round(r.ppl_ratio, 3),
                             "agreement": round(r.agreement, 4)})
    return pd.DataFrame(rows)


def attn_variants(em, blocks: torch.Tensor, capacities=(0.875, 0.75, 0.5), scorers=("learned", "random", "oracle"),
                  kept=((), EDGES), variants=("drop", "keep_kv"), progress: bool = False) -> pd.DataFrame:
    """``attn_tokens`` routing that drops skipped tokens vs one that keeps their keys and values, per
    set of layers kept dense, scorer and capacity: measured attention compute and quality."""
    task, rows, old = LMTask(blocks), [], em.elastic_config.attn_tokens_variant
    try:
        for layers in kept:
            for variant in variants:
                em.set_attn_tokens_variant(variant)
                with _kept_dense(em, ["attn_tokens"], layers):
                    df = frontier(em, task, components=["attn_tokens"], capacities=capacities, scorers=scorers,
                                  progress=progress)
                df = df[df.capacity < 1]
                rows.append(pd.DataFrame({"kept_dense": _label(layers), "variant": variant, "scorer": df.scorer,
                                          "capacity": df.capacity, "attn_compute": df.sublayer_compute,
                                          **{k: df[k] for k in ("ppl_ratio", "agreement", "kl")}}))
    finally:
        em.set_attn_tokens_variant(old)
    return pd.concat(rows, ignore_index=True).round(4)


class _WholeSet(LMTask):
    """Compute measured on every block: what calibrated thresholds keep varies from block to block."""

    def measure_input(self, em):
        return (self.blocks,), {}


def threshold_modes(em, blocks: torch.Tensor, capacities=(0.9, 0.75, 0.5), components=TOKEN_COMPONENTS,
                    modes=("threshold", "running"), progress: bool = False) -> pd.DataFrame:
    """Requested capacity vs measured compute (routed sub-layer plus routers, over the dense sub-layer,
    on all of ``blocks``) and quality of token routing in the causal modes. "threshold" needs
    calibrated routers (``em.calibrate``)."""
    task, runs, old = _WholeSet(blocks), {}, em.elastic_config.mode
    try:
        for mode in modes:
            runs[mode] = _learned(em.set_mode(mode), task, components, capacities, progress=progress)
    finally:
        em.set_mode(old)
    return pd.DataFrame([{"component": comp, "mode": mode, "requested": float(cap),
                          "measured_compute": round(runs[mode].loc[(comp, float(cap)), "compute"], 4),
                          "ppl_ratio": round(runs[mode].loc[(comp, float(cap)), "ppl_ratio"], 4)}
                         for comp in components for cap in capacities for mode in modes])
