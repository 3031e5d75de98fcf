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
from .config import LAYER_COMPONENTS
from .distill import evaluate, teacher_logits
from .scorers import SCORERS, supports

#: the sub-layer each component saves compute in (its FLOPs are the frontier's x axis)
PART = {"attn_tokens": "attention", "attn_heads": "attention", "mlp_tokens": "mlp", "mlp_experts": "mlp",
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

    def measure_input(self, em):
        from .zoo.tiny_llava import text_batch
        it = self.items[0]
        b = text_batch(self.tokenizer, [it["question"]], [it["answer"]])
        return (), dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], image_features=self.features[:1])

    def evaluate(self, em) -> dict:
        from .tasks.vlm import evaluate
        r = evaluate(em, self.tokenizer, self.items, self.features, self.batch_size, measure=False)
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
    elastic = [c for c in em.capacities if c in LAYER_COMPONENTS or c == "visual_tokens"]
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
        rows.append({"scorer": name, "component": comp, "capacity": 1.0, "compute": 1.0, "sublayer_compute": 1.0,
                     "model_compute": 1.0, "scoring_cost": 0.0, **dense_q})
        for cap in caps:
            with em.capacity(**{**base, comp: cap}), em.scoring(scorer):
                q = task.evaluate(em)
                f = measure_flops(em, *args, **kwargs)
            part = PART[comp]
            # the cost of choosing counts against the sub-layer it saves in (a router's Linear, or
            # e.g. the gate projection magnitude scores need first); an oracle's is not counted
            choosing = f["routers"] if part != "total" else 0
            rows.append({"scorer": name, "component": comp, "capacity": cap,
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
    for (comp, cap), g in df[df.capacity < 1].groupby(["component", "capacity"], sort=False):
        by = dict(zip(g.scorer, g[metric]))
        compute = dict(zip(g.scorer, g.compute))
        row = {"component": comp, "capacity": cap,  # compute: the learned router's (random's without one)
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
    return pd.DataFrame(out)


STYLE = {"learned": ("C0", "o", "-"), "random": ("0.5", "x", ":"), "oracle": ("C3", "^", "--"),
         "taylor": ("C1", "v", "--"), "magnitude": ("C2", "s", "-."), "attention_received": ("C4", "s", "-."),
         "cls_attention": ("C5", "s", "-."), "fastv": ("C4", "s", "-.")}


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
        for name, s in g.groupby("scorer", sort=False):
            s = s.sort_values("capacity")  # a frontier is traced by the capacity knob
            color, marker, ls = STYLE.get(name, ("k", ".", "-"))
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
    for (comp, name), g in df.groupby(["component", "scorer"], sort=False):
        ref = teacher if teacher is not None else float(g[g.capacity == 1.0][metric].iloc[0])
        ok = g[(g[metric] >= ref - tolerance) if hib else (g[metric] <= ref * (1 + tolerance))]
        best = ok.loc[ok[x].idxmin()] if len(ok) else None
        rows.append({"component": comp, "scorer": name, "saving": 0.0 if best is None else 1 - float(best[x]),
                     "at_capacity": None if best is None else float(best.capacity),
                     metric: None if best is None else float(best[metric])})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- generation
def _prompt_list(prompts) -> list[torch.Tensor]:
    """Prompts as 1-D LongTensors of token ids: from a LongTensor [N, L] or a sequence of id lists/tensors."""
    if torch.is_tensor(prompts):
        if prompts.dim() != 2 or prompts.dtype != torch.long:
            raise ValueError(f"prompts must be token ids: a LongTensor [n_prompts, prompt_len] or a list of id "
                             f"sequences, got a {prompts.dtype} tensor of shape {tuple(prompts.shape)}")
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise TypeError("prompts must be token ids (a LongTensor [n_prompts, prompt_len] or a list of id "
                        f"sequences), not {type(prompts).__name__}; tokenize text first")
    out = []
    for i, p in enumerate(prompts):
        t = p if torch.is_tensor(p) else torch.as_tensor(p)
        if t.dim() != 1 or t.numel() == 0 or t.dtype not in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of token ids, got {p!r:.80}")
        out.append(t.long())
    if not out:
        raise ValueError("no prompts: give at least one prompt of token ids")
    return out


@torch.no_grad()
def greedy_continuations(em, prompts, max_new_tokens: int = 32, batch_size: int = 16) -> list[torch.Tensor]:
    """The greedy (``do_sample=False``) continuations ``em.generate`` produces with its KV cache, one
    LongTensor [max_new_tokens] per prompt. End-of-sequence does not stop generation (``eos_token_id=None``):
    every continuation has exactly ``max_new_tokens`` tokens, so teacher and elastic model compare one to
    one. Prompts of equal length are generated together, ``batch_size`` at a time (no padding). Call it
    inside ``em.routers_disabled()`` for the teacher's."""
    prompts = _prompt_list(prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    cfg = getattr(em.model, "config", None)
    vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    for i, p in enumerate(prompts):
        if int(p.min()) < 0 or (vocab is not None and int(p.max()) >= vocab):
            raise ValueError(f"prompt {i} has token ids outside the model's vocabulary [0, {vocab}): "
                             f"{int(p.min())}..{int(p.max())}")
    gen = getattr(em.model, "generation_config", None)
    pad = next((v for v in (getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None), 0)
                if isinstance(v, int)), 0)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for chunk in _equal_length_chunks(prompts, batch_size):
        ids = torch.stack([prompts[i] for i in chunk]).to(em.device)
        gen_ids = em.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=pad)
        new = gen_ids[:, ids.shape[1]:].cpu()
        if new.shape[1] != max_new_tokens:  # would make the counts meaningless: say so
            raise RuntimeError(f"generate returned {new.shape[1]} new tokens where {max_new_tokens} were asked")
        for i, row in zip(chunk, new):
            out[i] = row
    return out


def _equal_length_chunks(prompts: list, batch_size: int) -> list[list[int]]:
    """Indices of the prompts in batches of at most batch_size prompts of one length (no padding)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    return [idx[s:s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


@torch.no_grad()
def generation_agreement(em, prompts, max_new_tokens: int = 32, batch_size: int = 16, teacher=None,
                         teacher_forced: bool = True) -> dict:
    """How long greedy generation of the elastic model stays on the teacher's path.

    For each prompt (token ids): the teacher's greedy continuation (routers disabled), the elastic
    model's greedy continuation (both through ``em.generate`` with the KV cache, ``max_new_tokens``
    each, end-of-sequence does not stop them) and the number of leading new tokens that match,
    counting up to the first mismatch. Returns ``matched`` (per prompt), ``median_matched``,
    ``mean_matched``, ``all_matched`` (share of prompts whose whole continuation matches), and with
    ``teacher_forced`` the top-1 agreement of the elastic model along the teacher's continuation (one
    forward over prompt + continuation; each position predicts from the teacher's tokens, so it does
    not compound). ``teacher`` (the ``"teacher"`` entry of an earlier result for the same prompts)
    skips generating the teacher again.

    Decoding runs one token per step, so token routing (``attn_tokens``, ``mlp_tokens``) needs
    ``mode="threshold"`` with calibrated routers: top-k of a single token keeps it, so ``topk`` mode
    would run every decoding step dense (and choose the prompt's tokens by looking at its future).
    Head and expert routing (``attn_heads``, ``mlp_experts``) choose per token: either mode.
    """
    from .config import TOKEN_COMPONENTS
    prompts = _prompt_list(prompts)
    blocks = em.blocks
    active = sorted({c for b in blocks for c, r in b.routers.items() if b.capacity[c] < 1.0})
    tokens = [c for c in active if c in TOKEN_COMPONENTS]
    if tokens and em.elastic_config.mode != "threshold":
        raise ValueError(f"{', '.join(tokens)} below capacity 1.0 in mode {em.elastic_config.mode!r}: generation "
                         "decodes one token per step, and top-k over one token always keeps it (every step would "
                         "run dense); use em.set_mode('threshold') with calibrated routers (em.calibrate)")
    if tokens:
        missing = sorted({c for b in blocks for c, r in b.routers.items()
                          if c in TOKEN_COMPONENTS and b.capacity[c] < 1.0 and not r.calibrated})
        if missing:
            raise ValueError(f"threshold mode needs calibrated token routers, and the {', '.join(missing)} routers "
                             "are not; call em.calibrate(token_blocks) first")
    if teacher is None:
        with em.routers_disabled():
            teacher = greedy_continuations(em, prompts, max_new_tokens, batch_size)
    else:
        teacher = [t if torch.is_tensor(t) else torch.as_tensor(t) for t in teacher]
        if len(teacher) != len(prompts) or any(t.shape != (max_new_tokens,) for t in teacher):
            raise ValueError(f"teacher must hold {len(prompts)} continuations of {max_new_tokens} tokens (the "
                             "'teacher' entry of generation_agreement for the same prompts and max_new_tokens)")
    student = greedy_continuations(em, prompts, max_new_tokens, batch_size)
    matched = []
    for t, s in zip(teacher, student):
        differ = (t != s).nonzero()
        matched.append(int(differ[0, 0]) if len(differ) else max_new_tokens)
    m = np.asarray(matched, dtype=float)
    result = {"prompts": len(prompts), "new_tokens": max_new_tokens, "matched": matched,
              "median_matched": float(np.median(m)), "mean_matched": float(m.mean()),
              "min_matched": int(m.min()), "all_matched": float((m == max_new_tokens).mean())}
    if teacher_forced:
        hits = 0
        for chunk in _equal_length_chunks(prompts, batch_size):
            seq = torch.stack([torch.cat([prompts[i], teacher[i]]) for i in chunk])[:, :-1].to(em.device)
            logits = em(seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
            top1 = logits[:, len(prompts[chunk[0]]) - 1:].argmax(-1).cpu()
            hits += int((top1 == torch.stack([teacher[i] for i in chunk])).sum())
        result["teacher_forced_agreement"] = hits / (len(prompts) * max_new_tokens)
    result["teacher"], result["student"] = teacher, student
    return result


@torch.no_grad()
def calibrate_active(em, blocks: torch.Tensor, batch_size: int = 4) -> list[str]:
    """``ElasticModel.calibrate`` for the token routers in use only (capacity below 1.0 in some layer),
    at the current capacities: their threshold tables come from top-k routing on ``blocks``, the
    others keep theirs (``calibrate`` asks every token router to route). Returns the components calibrated."""
    from .config import TOKEN_COMPONENTS
    if not torch.is_tensor(blocks) or blocks.dim() != 2 or blocks.dtype != torch.long or not len(blocks):
        raise ValueError("calibrate_active takes token blocks: a non-empty LongTensor [n_blocks, seq_len]")
    active = {(b.layer_idx, c) for b in em.blocks for c in TOKEN_COMPONENTS if c in b.routers and b._active(c)}
    if not active:
        return []
    mode = em.elastic_config.mode
    em.set_mode("topk")
    scores: dict[tuple[int, str], list] = {}
    try:
        for chunk in blocks.split(batch_size):
            em.model(chunk.to(em.device))
            for b in em.blocks:
                for c in TOKEN_COMPONENTS:
                    if (b.layer_idx, c) in active:
                        scores.setdefault((b.layer_idx, c), []).append(b.aux[c][0].flatten())
    finally:
        em.set_mode(mode)
    for b in em.blocks:
        for c in TOKEN_COMPONENTS:
            if (b.layer_idx, c) in active:
                b.routers[c].set_quantiles(torch.cat(scores[(b.layer_idx, c)]))
    return sorted({c for _, c in active})
