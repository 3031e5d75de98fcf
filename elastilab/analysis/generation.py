"""Does generation survive? How many tokens of the teacher's greedy continuation the elastic model
reproduces (KV cache, one token per step): ``generation_agreement`` and the ``greedy_continuations``
it compares, and ``plot_generation`` of the table the ``elastilab generation`` command
(``cli/generation.py``) sweeps over operating points.
"""
from __future__ import annotations

import numpy as np
import torch

from elastilab.core.config import TOKEN_COMPONENTS


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
        if t.dim() != 1 or t.numel() == 0 or t.dtype not in (torch.long, torch.int, torch.int16, torch.int8,
                                                             torch.uint8):
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
def _check_decodable(em) -> None:
    """Token routing decodes in a causal mode with calibrated routers only (see generation_agreement)."""
    blocks = em.blocks
    active = sorted({c for b in blocks for c, r in b.routers.items() if b.capacity[c] < 1.0})
    tokens = [c for c in active if c in TOKEN_COMPONENTS]
    mode = em.elastic_config.mode
    if tokens and mode == "topk":
        raise ValueError(f"{', '.join(tokens)} below capacity 1.0 in mode 'topk': generation decodes one token per "
                         "step, and top-k over one token always keeps it (every step would run dense); use "
                         "em.set_mode('threshold') with calibrated routers (em.calibrate)")
    if tokens:
        missing = sorted({c for b in blocks for c, r in b.routers.items()
                          if c in TOKEN_COMPONENTS and b.capacity[c] < 1.0 and not r.calibrated})
        if missing:
            raise ValueError(f"{mode} mode needs calibrated token routers, and the {', '.join(missing)} routers "
                             "are not; call em.calibrate(token_blocks) first")


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

    Decoding runs one token per step, so the token components (attention's and the MLP's) need a causal
    mode (``"threshold"``, or any mode but ``"topk"``) with calibrated routers: top-k of a single token
    keeps it, so ``topk`` mode would run every decoding step dense (and choose the prompt's tokens by
    looking at its future); it is refused.
    The head and expert components choose per token: either mode.
    """
    prompts = _prompt_list(prompts)
    _check_decodable(em)
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


def plot_generation(df, title: str = ""):
    """Median and mean leading tokens matching the teacher against the measured saving of model compute
    (log scale: the points that survive save little), one marker per kind of token thresholds."""
    import matplotlib.pyplot as plt  # slow to import: only when a plot is drawn
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained", sharey=True)
    n = int(df.new_tokens.iloc[0])
    routed = df[df.model_compute.notna() & (df.model_compute < 1)]
    saving = (1 - routed.model_compute).clip(lower=1e-5)
    for ax, stat in zip(axes, ("median_matched", "mean_matched")):
        for (cal, g), marker in zip(routed.groupby("calibration", sort=False), "os^vD"):
            label = "no token routing" if cal == "-" else f"token thresholds: {cal}"
            ax.scatter(saving[g.index], g[stat], marker=marker, s=24, label=label)
        for i, r in routed[routed[stat] >= n / 4].iterrows():  # name the points that stay near the teacher
            ax.annotate(r.point, (saving[i], r[stat]), fontsize=5, xytext=(3, -6), textcoords="offset points")
        for r in df[df.model_compute.isna()].itertuples():  # references without a compute figure
            ax.axhline(getattr(r, stat), color="0.5", ls=":", lw=1, label=f"{r.point}")
        ax.axhline(n / 2, color="C3", ls="--", lw=0.8, label=f"half of the {n} new tokens")
        ax.set_xscale("log")
        ax.set_xlabel("measured saving of model compute (1 - fraction of dense)", fontsize=8)
        ax.set_title(stat.replace("_", " "), fontsize=8)
        ax.set_ylim(-1, n + 1)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"leading new tokens matching the teacher (of {n})", fontsize=8)
    axes[1].legend(fontsize=6, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=7)
    return fig
