"""``elastilab bench decode``: is an operating point faster than the dense model where users feel it?

    elastilab bench decode --point mlp_units=0.75 --out runs/decode
    elastilab bench decode --routers data/routers/smollm2-135m-heads --point attn_heads=0.9,mlp_units=0.875 ...
    elastilab bench decode --routers data/routers/smollm2-135m-model --point compute=x1.05 ...  (whole model)

For the dense model and each ``--point``, in one run: greedy decoding with the KV cache (batch 1 and 4,
a prompt of held-out text, new tokens one step at a time: tokens/s of the decode steps, the prompt's
prefill timed apart), a long prompt into the KV cache (8 x 512 tokens by default; a point with
``"prefill": "dense"`` computes prompts at capacity 1.0 and routes only the decode steps, ElasticConfig.prefill),
and the point's quality on held-out text
(perplexity ratio to the teacher, measured compute of the whole model) and how many of the teacher's greedy
tokens it reproduces. Dense and routed runs take turns in every repetition and medians are reported, since
this kind of machine is shared. ``ideal_speedup`` is dense FLOPs / routed FLOPs measured on the same step
(``compute.measure_flops``), so ``realised = speedup / ideal`` says what the kernels turn into time.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import pandas as pd
import torch

from elastilab import data
from elastilab.analysis.bench import finish_plot
from elastilab.analysis.generation_points import apply_point, point_name
from elastilab.core.compute import measure_flops
from elastilab.core.config import GATED_COMPONENTS, ElasticConfig
from elastilab.tasks.lm import evaluate, teacher_logits

DENSE = {"capacities": {}, "keep_dense": {}, "variant": None, "label": "dense", "source": "dense", "name": "dense"}


def elastic_model(model, points: list[dict], routers=None):
    """The model elastified for every component the points name: with the routers in ``routers``
    (components without routers, mlp_units, added to theirs), or without routers (mlp_units only)."""
    from elastilab.core.loading import load_routers
    from elastilab.core.model import elastify
    needed = sorted({c for p in points for c in p["capacities"]})
    if routers is not None:
        return load_routers(model, routers, add_components=[c for c in needed if c in GATED_COMPONENTS])
    if routed := [c for c in needed if c not in GATED_COMPONENTS]:
        raise ValueError(f"{', '.join(routed)} need trained routers: give --routers (e.g. data/routers/"
                         "smollm2-135m-heads for attn_heads); without routers a point may name "
                         f"{', '.join(GATED_COMPONENTS)}")
    return elastify(model, ElasticConfig(**dict.fromkeys(needed or GATED_COMPONENTS, 1.0)))


def greedy(em, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, seconds of the new_tokens - 1 decode steps, the new tokens [B, new_tokens])."""
    t0 = time.perf_counter()
    out = em(input_ids=prompts, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    tokens, cache = [nxt], out.cache
    for _ in range(new_tokens - 1):
        out = em(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    return t1 - t0, time.perf_counter() - t1, torch.cat(tokens, 1)


def _step_flops(em, prompt: torch.Tensor) -> int:
    """Measured FLOPs of the decode step after ``prompt`` [1, T]."""
    with torch.no_grad():
        cache = em(input_ids=prompt[:, :-1], use_cache=True).cache
        return measure_flops(em, input_ids=prompt[:, -1:], cache=cache, use_cache=True)["total"]


def _matched(tokens: torch.Tensor, teacher: torch.Tensor) -> float:
    """Median over prompts of the teacher's greedy tokens reproduced before the first difference."""
    same = (tokens == teacher).int().cumprod(1).sum(1)
    return float(same.float().median())


def _quality(em, blocks: torch.Tensor, teacher, apply, base: dict) -> dict:
    """A point's held-out perplexity ratio and measured model compute (one block at a time, as frontier() counts)."""
    apply()
    q = evaluate(em, blocks, teacher=teacher)
    f = [measure_flops(em, b[None]) for b in blocks]
    with em.capacity(**base):
        d = [measure_flops(em, b[None]) for b in blocks]
    return {"ppl_ratio": q["ppl_ratio"], "model_compute": sum(x["total"] for x in f) / sum(x["total"] for x in d)}


def decode_speed(em, tok, points: list[dict], batches=(1, 4), prompt_len: int = 64, new_tokens: int = 64,
                 prefill: tuple[int, int] | None = (8, 512), reps: int = 5, warmup: int = 1,
                 domain: str = "licenses", quality_blocks: int = 8, seq_len: int = 128, log=print) -> pd.DataFrame:
    """One row per (point, phase): dense and routed seconds, tokens/s, speedups, ideal speedup (FLOPs),
    and the point's held-out quality. ``points``: dicts of ``generation_points.point_spec``."""
    text = data.text(domain)
    prompts = data.token_blocks(tok, text, prompt_len, split="eval")
    if len(prompts) < max(batches):
        raise ValueError(f"the eval split of {domain!r} holds {len(prompts)} prompts of {prompt_len} tokens; "
                         f"batch {max(batches)} needs more: use a shorter --prompt-len")
    prompts = prompts[torch.as_tensor(np.linspace(0, len(prompts) - 1, max(batches)).round().astype(int))]
    blocks = data.token_blocks(tok, text, seq_len, split="eval")[:quality_blocks]
    base = {c: 1.0 for c in em.capacities}
    variant = em.elastic_config.attn_tokens_variant
    pts = [DENSE] + [{**p, "name": p["label"] or point_name(p)} for p in points]

    def at(p, fn):
        def run():
            if p is DENSE:
                with em.routers_disabled():
                    return fn()
            apply_point(em, base, p, variant)
            return fn()
        return run

    rows = []
    with torch.no_grad():
        teacher = teacher_logits(em, blocks)
        quality = {p["name"]: _quality(em, blocks, teacher, at(p, lambda: None), base) for p in pts[1:]}
        for B in batches:
            ids = prompts[:B]
            times = {p["name"]: [] for p in pts}
            tokens = {}
            for r in range(warmup + reps):
                for p in pts:
                    pre, dec, tokens[p["name"]] = at(p, lambda: greedy(em, ids, new_tokens))()
                    if r >= warmup:
                        times[p["name"]].append(dec)
            flops = {p["name"]: at(p, lambda: _step_flops(em, ids[:1]))() for p in pts}
            rows += _rows(pts, times, flops, quality, "decode", B, B * (new_tokens - 1),
                          {p["name"]: _matched(tokens[p["name"]], tokens["dense"]) for p in pts})
            log(f"decode batch {B}: "
                + ", ".join(f"{r['point']} {r['routed_tok_s']:.1f} tok/s" for r in rows[-len(pts):]))
        if prefill is not None:
            B, T = prefill
            ids = torch.randint(0, em.model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
            times = {p["name"]: [] for p in pts}
            for r in range(warmup + reps):
                for p in pts:
                    t0 = time.perf_counter()
                    at(p, lambda: em(input_ids=ids, use_cache=True, logits_to_keep=1))()  # a prompt
                    if r >= warmup:
                        times[p["name"]].append(time.perf_counter() - t0)
            flops = {p["name"]: at(p, lambda: measure_flops(em, input_ids=ids[:1], use_cache=True))()["total"]
                     for p in pts}
            rows += _rows(pts, times, flops, quality, "prefill", B, B * T, {})
            log(f"prefill {B}x{T}: " + ", ".join(f"{r['point']} x{r['speedup']:.2f}" for r in rows[-len(pts):]))
    apply_point(em, base, DENSE, variant)
    return pd.DataFrame(rows)


def _rows(pts, times, flops, quality, phase, batch, n_tokens, matched) -> list[dict]:
    dense = times["dense"]
    d_med = statistics.median(dense)
    out = []
    for p in pts:
        name, t = p["name"], times[p["name"]]
        r_med = statistics.median(t)
        q = quality.get(name, {"ppl_ratio": 1.0, "model_compute": 1.0})
        caps = " ".join(f"{c}={v:g}" for c, v in p["capacities"].items())
        if p.get("compute") is not None:
            caps = point_name({**p, "prefill": "routed"})  # the whole-model knob: "compute x1.05"
        out.append({"point": name, "capacities": caps or "-",
                    "prefill": p.get("prefill", "routed"), "phase": phase, "batch": batch, "tokens": n_tokens,
                    "dense_s": d_med, "routed_s": r_med,
                    "dense_tok_s": n_tokens / d_med, "routed_tok_s": n_tokens / r_med, "speedup": d_med / r_med,
                    "speedup_paired": statistics.median(a / b for a, b in zip(dense, t)),
                    "ideal_speedup": flops["dense"] / flops[name],
                    "realised": d_med / r_med * flops[name] / flops["dense"],
                    "ppl_ratio": q["ppl_ratio"], "model_compute": q["model_compute"],
                    "teacher_tokens_matched": matched.get(name), "reps": len(t), "threads": torch.get_num_threads()})
    return out


def plot_decode(df: pd.DataFrame, title: str = "", path=None):
    """Speedup over dense per point, one group of bars per phase, the held-out perplexity ratio on each bar."""
    import matplotlib
    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    phases = list(df[["phase", "batch", "tokens"]].drop_duplicates().itertuples(index=False, name=None))
    names = [n for n in df.point.unique() if n != "dense"]
    fig, ax = plt.subplots(figsize=(5 + 0.45 * len(phases) * max(1, len(names)), 3.8))
    width = 0.8 / max(1, len(names))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        sub = [df[(df.point == name) & (df.phase == ph) & (df.batch == b)].iloc[0] for ph, b, _ in phases]
        xs = np.arange(len(phases)) + (i - (len(names) - 1) / 2) * width
        ax.bar(xs, [r.speedup for r in sub], width, color=colors[i % len(colors)],
               label=f"{name} (ppl x{sub[0].ppl_ratio:.3f}, {1 - sub[0].model_compute:.0%} of the model saved)")
        ax.scatter(xs, [r.ideal_speedup for r in sub], marker="_", s=200, color="black", zorder=3)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(phases)), [f"decode\nbatch {b}" if ph == "decode" else f"prefill\n{b} x {n // b}"
                                           for ph, b, n in phases])
    ax.set_ylabel("speedup over dense (black: ideal, FLOPs)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    ax.set_title(title, fontsize=9)
    return finish_plot(fig, path)
