"""What the whole-model budget (``core.global_budget``) is built from: the levels a cut can take, each
(layer, component, level) cut's cost on calibration data (measured one cut at a time, cached per cut so an
interrupted run resumes), and the exact whole-model FLOPs of any combination of per-layer capacities
(``flop_table``: a block's count depends only on its own capacities, its attention and MLP sides add up)."""
from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import torch

from elastilab.core.budget import LOWEST, levels
from elastilab.core.components import COMPONENTS
from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS

#: the sub-layer of a block each component cuts in; the two sides' FLOPs add up
SIDE = {c: COMPONENTS[c].sublayer for c in LAYER_COMPONENTS + GATED_COMPONENTS}
#: one MLP granularity per layer: slices with a router, or single units by their gate
EXCLUSIVE = ("mlp_experts", "mlp_units")


# ----------------------------------------------------------------------------- levels and costs
def cut_levels(em, component: str, step: float = 0.125, wanted=None) -> list[float]:
    """The capacities a layer's ``component`` can be cut to, 1.0 first: ``budget.levels`` (multiples of
    ``step`` down to LOWEST; heads: the k/H nearest to them), or the realisable values nearest to the
    ``wanted`` capacities (k/H heads, k/E slices; tokens and units as given)."""
    if wanted is None:
        # multiples of step down to LOWEST, never below it (a step of 0.5 stops at 0.5, not 0.0)
        wanted = [1.0 - k * step for k in range(int((1.0 - LOWEST) / step + 1e-9) + 1)]
        if component != "attn_heads":
            return levels(em, component, step)
    levels(em, component, step)  # (raises if the component is routed nowhere)
    grid = None
    if COMPONENTS[component].kind == "params":  # heads or slices: every k/H heads, every k/E slices
        n = next(b for b in em.blocks if component in b.capacity).routers[component].proj.out_features
        grid = [k / n for k in range(n, 0, -1)]
    out = {1.0}
    for w in wanted:
        if not 0 < w <= 1:
            raise ValueError(f"cut levels must be capacities in (0, 1], got {w}")
        out.add(w if grid is None else min(grid, key=lambda c: (abs(c - w), -c)))
    return sorted(out, reverse=True)


def _routable(em, components) -> list[tuple[int, str]]:
    """(layer, component) pairs a schedule may cut: routed there and not kept dense."""
    pinned = {c: em._kept_dense(c) for c in components}
    return [(b.layer_idx, c) for b in em.blocks for c in components
            if c in b.capacity and b.layer_idx not in pinned[c]]


#: a claim on a cut older than this (seconds) is taken to belong to a run that died
STALE_CLAIM = 1800


def _claim(path: Path) -> bool:
    """Take the cut whose costs ``path`` will hold, unless another run has (an exclusive create)."""
    import os
    import time
    claim = path.with_suffix(".claim")
    if claim.exists() and time.time() - claim.stat().st_mtime > STALE_CLAIM:
        claim.unlink(missing_ok=True)
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _stored(path: Path, levels: list[float]) -> list[float] | None:
    try:
        hit = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a cache is only a shortcut: measure again
    return hit["costs"] if isinstance(hit, dict) and hit.get("levels") == levels else None


@torch.no_grad()
def cut_costs(em, task, caps: dict[str, list[float]], progress: bool = True,
              cache: str | Path | None = None) -> dict[tuple[int, str], list[float]]:
    """{(layer, component): [cost at each level of caps[component]]}: ``task.distance`` with only
    that layer's component routed (everything else dense). ``cache``: a folder holding one JSON file
    per (layer, component), written as each is measured, so an interrupted run resumes and two runs
    on the same folder (and the same model, task and scorer) share the work (each claims a cut first)."""
    import time

    from tqdm.auto import tqdm

    from elastilab.files import atomic_write
    cache = None if cache is None else Path(cache)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    todo = _routable(em, caps)
    saved = [dict(b.capacity) for b in em.blocks]
    by_layer = {b.layer_idx: b for b in em.blocks}
    out = {}
    bar = tqdm(total=len(todo), desc="cuts per layer", disable=not progress)
    try:
        for b in em.blocks:
            b.capacity = {c: 1.0 for c in b.capacity}
        while todo:
            waiting = []
            for layer, comp in todo:
                path = None if cache is None else cache / f"{comp}-{layer}.json"
                if path is not None and (hit := _stored(path, caps[comp])) is not None:
                    out[(layer, comp)] = hit
                    bar.update(1)
                    continue
                if path is not None and not _claim(path):
                    waiting.append((layer, comp))  # another run measures it: come back to it
                    continue
                b = by_layer[layer]
                costs = []
                for cap in caps[comp]:
                    b.capacity[comp] = cap
                    costs.append(0.0 if cap >= 1.0 else float(task.distance(em)))
                b.capacity[comp] = 1.0
                out[(layer, comp)] = costs
                if path is not None:
                    entry = json.dumps({"levels": caps[comp], "costs": costs})
                    atomic_write(path, lambda f: Path(f).write_text(entry))
                    path.with_suffix(".claim").unlink(missing_ok=True)
                bar.update(1)
            if waiting and len(waiting) == len(todo):
                time.sleep(5)
            todo = waiting
    finally:
        bar.close()
        for b, s in zip(em.blocks, saved):
            b.capacity = s
    return out


# ----------------------------------------------------------------------------- measured FLOPs
def _signature(b) -> tuple:
    """What a block's FLOPs depend on besides its capacities: its shapes and what it routes."""
    spec = b.adapter.block_spec(b.base_layer, b.layer_idx)
    a, m = spec.attn, spec.mlp
    return (tuple(sorted(b.capacity)), tuple(a.w_q.shape), a.n_heads, a.n_kv_heads, a.head_dim, a.window,
            m.kind, m.width, b.n_experts, spec.n_protected)


def _combos(comps: list[str], caps: dict[str, list[float]]) -> list[tuple[float, ...]]:
    grid = product(*(caps[c] for c in comps))
    both = [i for i, c in enumerate(comps) if c in EXCLUSIVE]
    return [g for g in grid if sum(g[i] < 1.0 for i in both) <= 1]


@torch.no_grad()
def _block_counts(em, per_layer: dict[int, dict[str, float]], args, kwargs) -> tuple[dict[int, int], int]:
    """One forward under the FLOP counter with each listed layer at its capacities (the others
    dense): ({layer: FLOPs its block counted, an oracle's work left out}, whole-model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    names = {id(m): n for n, m in em.model.named_modules()}
    prefix = type(em).__name__ + ".model."
    saved = [dict(b.capacity) for b in em.blocks]
    try:
        for b in em.blocks:
            b.capacity = {c: per_layer.get(b.layer_idx, {}).get(c, 1.0) for c in b.capacity}
            b._spec()  # weights built once (a merged LoRA, clustered experts): not per forward
        scorer = em.scorer
        if scorer is not None:  # an oracle's preparation is not counted
            scorer.before_forward(em, args, kwargs)
        with FlopCounterMode(display=False) as counter:
            em(*args, **kwargs)
    finally:
        for b, s in zip(em.blocks, saved):
            b.capacity = s
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    out, total = {}, counts.get("Global", 0)
    for b in em.blocks:
        name = prefix + names[id(b)]
        oracle = 0 if b.scoring.scorer is None or b.scoring.scorer.counted else counts.get(name + ".scoring", 0)
        out[b.layer_idx] = counts.get(name, 0) - oracle
        total -= oracle
    return out, total


class FlopTable:
    """Measured FLOPs of any per-layer capacities: the dense model's, plus for each layer the change
    its attention side and its MLP side make, looked up by (layer shape, side, capacities)."""

    def __init__(self, dense_total: int, dense_block: dict[int, int], sig: dict[int, tuple], delta: dict):
        self.dense_total, self.dense_block, self.sig, self.delta = dense_total, dense_block, sig, delta

    def block(self, layer: int, caps: dict[str, float]) -> int:
        """FLOPs of this layer's block at capacities ``caps`` ({component: capacity})."""
        f = self.dense_block[layer]
        for side in ("attention", "mlp"):
            comps = tuple(sorted(c for c in caps if SIDE.get(c) == side))
            key = tuple(caps[c] for c in comps)
            if comps and any(v < 1.0 for v in key):
                f += self.delta[(self.sig[layer], side, comps, key)]
        return f

    def compute(self, per_layer: dict[int, dict[str, float]]) -> float:
        """Whole-model compute (fraction of dense) at these per-layer capacities."""
        change = sum(self.block(i, caps) - self.dense_block[i] for i, caps in per_layer.items())
        return (self.dense_total + change) / self.dense_total


@torch.no_grad()
def flop_table(em, caps: dict[str, list[float]], args, kwargs) -> FlopTable:
    """Measure every combination of the levels in ``caps`` on each side of each layer shape, one
    combination per layer of that shape per forward (``_block_counts``) on the input ``args, kwargs``."""
    blocks = em.blocks
    dense_block, dense_total = _block_counts(em, {}, args, kwargs)
    sig = {b.layer_idx: _signature(b) for b in blocks}
    hosts: dict[tuple, list[int]] = {}
    for b in blocks:
        hosts.setdefault(sig[b.layer_idx], []).append(b.layer_idx)
    jobs = []  # (signature, side, components, capacities)
    for s, layers in hosts.items():
        routed = [c for c in caps if c in s[0]]
        for side in ("attention", "mlp"):
            comps = tuple(sorted(c for c in routed if SIDE[c] == side))
            if comps:
                jobs += [(s, side, comps, k) for k in _combos(list(comps), caps) if any(v < 1.0 for v in k)]
    delta = {}
    while jobs:
        batch, used, rest = {}, set(), []
        for job in jobs:  # one job per layer per forward
            free = [i for i in hosts[job[0]] if i not in used]
            if not free:
                rest.append(job)
                continue
            used.add(free[0])
            batch[free[0]] = job
        counts, _ = _block_counts(em, {i: dict(zip(j[2], j[3])) for i, j in batch.items()}, args, kwargs)
        for i, job in batch.items():
            delta[job] = counts[i] - dense_block[i]
        jobs = rest
    return FlopTable(dense_total, dense_block, sig, delta)
