"""Does generation survive? How many tokens of the teacher's greedy continuation the elastic model
reproduces (KV cache, one token per step), per operating point: ``generation_agreement`` and the
``elastilab generation`` command that sweeps it and writes a CSV.

    elastilab generation --routers data/routers/smollm2-135m --domain licenses --out runs/gen
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from .commands import _floats, _names
from .config import LAYER_COMPONENTS, TOKEN_COMPONENTS

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

    Decoding runs one token per step, so token routing (``attn_tokens``, ``mlp_tokens``) needs a causal
    mode (``"threshold"``, or any mode but ``"topk"``) with calibrated routers: top-k of a single token
    keeps it, so ``topk`` mode would run every decoding step dense (and choose the prompt's tokens by
    looking at its future); it is refused.
    Head and expert routing (``attn_heads``, ``mlp_experts``) choose per token: either mode.
    """
    prompts = _prompt_list(prompts)
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


# ---------------------------------------------------------------- the command
#: what a --point JSON object may hold besides component capacities
POINT_KEYS = ("keep_dense", "attn_tokens_variant", "label")


def _point(text: str) -> dict:
    """An argparse type for ``--point``: ``attn_heads=0.875,mlp_experts=0.875``, or a JSON object that
    may also keep layers dense and pick the attn_tokens variant, e.g. ``{"attn_tokens": 0.95,
    "keep_dense": {"attn_tokens": [0, 1, -2, -1]}, "attn_tokens_variant": "keep_kv", "label": "edges"}``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
        if not isinstance(spec, dict):
            raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    else:
        spec = {}
        for item in (t.strip() for t in text.split(",")):
            name, eq, value = item.partition("=")
            if not eq:
                raise argparse.ArgumentTypeError(f"takes component=capacity pairs separated by commas "
                                                 f"(e.g. attn_heads=0.875,mlp_experts=0.875), got {text!r}")
            try:
                spec[name.strip()] = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"capacity of {name.strip()!r} must be a number, "
                                                 f"got {value!r}") from None
    unknown = [k for k in spec if k not in LAYER_COMPONENTS and k not in POINT_KEYS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown key(s) {', '.join(map(repr, unknown))}; components: "
                                         f"{', '.join(LAYER_COMPONENTS)}; other keys: {', '.join(POINT_KEYS)}")
    caps = {k: v for k, v in spec.items() if k in LAYER_COMPONENTS}
    if not caps:
        raise argparse.ArgumentTypeError(f"names no component capacity: {text!r}")
    for k, v in caps.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise argparse.ArgumentTypeError(f"capacity of {k} must be a number in (0, 1], got {v!r}")
    keep = spec.get("keep_dense", {})
    if not isinstance(keep, dict) or not all(
            k in LAYER_COMPONENTS and isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                 for i in v) for k, v in keep.items()):
        raise argparse.ArgumentTypeError("keep_dense must map components to lists of layer indices, "
                                         f"e.g. {{\"mlp_tokens\": [0, 1, -2, -1]}}, got {keep!r}")
    variant = spec.get("attn_tokens_variant")
    if variant not in (None, "drop", "keep_kv"):
        raise argparse.ArgumentTypeError(f"attn_tokens_variant must be 'drop' or 'keep_kv', got {variant!r}")
    label = spec.get("label")
    if label is not None and not isinstance(label, str):
        raise argparse.ArgumentTypeError(f"label must be a string, got {label!r}")
    return {"capacities": {k: float(v) for k, v in caps.items()}, "keep_dense": {k: tuple(v) for k, v in keep.items()},
            "variant": variant, "label": label, "source": "point"}


def _point_name(pt: dict) -> str:
    caps = " ".join(f"{c}={v:g}" for c, v in pt["capacities"].items()) or "dense"
    keep = "".join(f" ({c} dense in layers {','.join(map(str, v))})" for c, v in pt["keep_dense"].items() if v)
    return caps + keep + (f" [{pt['variant']}]" if pt["variant"] else "")


def generation_points(em, args, recommended: dict | None) -> list[dict]:
    """The sweep: dense, each component alone at each capacity, the routers' recommended point and
    the --point ones; a point met twice runs once (its sources joined)."""
    elastic = [c for c in em.capacities if c in LAYER_COMPONENTS]
    comps = list(args.components) if args.components else elastic
    pts = [{"capacities": {}, "keep_dense": {}, "variant": None, "label": "dense", "source": "dense"}]
    pts += [{"capacities": {c: cap}, "keep_dense": {}, "variant": None, "label": None, "source": "sweep"}
            for c in comps for cap in args.capacities if cap < 1.0]
    if recommended:
        pts.append({"capacities": {c: float(v) for c, v in recommended.items()}, "keep_dense": {}, "variant": None,
                    "label": None, "source": "recommended"})
    pts += [dict(p) for p in args.point or ()]
    out: dict[str, dict] = {}
    for p in pts:
        named = {**p["capacities"], **{c: None for c in p["keep_dense"]}}
        missing = [c for c in named if c not in elastic]
        if missing:
            where = f"{args.routers}: recommended_capacities" if p["source"] == "recommended" else "--components/--point"
            raise ValueError(f"{where}: {', '.join(missing)} not routed by {args.routers}; its components: "
                             f"{', '.join(elastic)}")
        tokens = [c for c, v in p["capacities"].items() if c in TOKEN_COMPONENTS and v < 1.0]
        if tokens and args.mode == "topk":
            raise ValueError(f"{_point_name(p)}: token routing ({', '.join(tokens)}) cannot generate in --mode topk "
                             "(decoding feeds one token per step, and top-k of one token always keeps it); use "
                             "--mode threshold (or another causal mode)")
        p["name"] = p["label"] or _point_name(p)
        key = _point_name(p)
        if key in out:
            out[key]["source"] += ", " + p["source"]
        else:
            out[key] = p
    return list(out.values())


def _apply_point(em, base: dict, pt: dict, default_variant: str) -> None:
    em.keep_dense(**{c: () for c in em.capacities if c in LAYER_COMPONENTS})
    em.set_capacity(**{**base, **pt["capacities"]})
    if pt["keep_dense"]:
        em.keep_dense(**pt["keep_dense"])
    if "attn_tokens" in em.capacities:
        em.set_attn_tokens_variant(pt["variant"] or default_variant)


def _token_routers(em) -> dict:
    return {(b.layer_idx, c): r for b in em.blocks for c, r in b.routers.items() if c in TOKEN_COMPONENTS}


def _generation_prompts(tok, args):
    """--prompts blocks of --prompt-len tokens, evenly spaced over the text's --split (deterministic)."""
    import numpy as np
    import torch

    from . import data
    text = data.text_file(args.text) if args.text else data.text(args.domain or "licenses")
    blocks = data.token_blocks(tok, text, args.prompt_len, split=args.split)
    if args.prompts > len(blocks):
        raise ValueError(f"--prompts {args.prompts}, but the {args.split} split holds only {len(blocks)} blocks of "
                         f"{args.prompt_len} tokens; ask for fewer prompts, shorter ones or another --split")
    return blocks[torch.as_tensor(np.linspace(0, len(blocks) - 1, args.prompts).round().astype(int))]


def cmd_generation(args) -> int:
    import copy
    import shlex

    import pandas as pd
    import torch
    import transformers

    from . import data
    from .cli import _load_lm, _recommended_capacities
    from .compute import measure_flops
    from .elastic import load_routers
    from .files import atomic_write
    torch.manual_seed(0)
    model, tok = _load_lm(args.model)
    em = load_routers(model, args.routers)
    em.set_mode(args.mode)
    points = generation_points(em, args, _recommended_capacities(args.routers))
    prompts = _generation_prompts(tok, args)
    calibration = None
    if args.recalibrate:  # token routers: also run each point with thresholds measured on this text
        src = Path(args.recalibrate)
        text = data.text_file(src) if src.is_file() else data.text(args.recalibrate)
        calibration = data.token_blocks(tok, text, 128, split="all" if src.is_file() else "train")
        calibration = calibration[: args.calibration_blocks]
    routers = _token_routers(em)
    shipped = {k: r.quantiles.clone() for k, r in routers.items()}
    base = {c: 1.0 for c in em.capacities}
    default_variant = em.elastic_config.attn_tokens_variant
    runs = []  # (point, calibration name)
    for p in points:
        _apply_point(em, base, p, default_variant)
        active = [(b.layer_idx, c) for b in em.blocks for c in b.routers if (b.layer_idx, c) in routers and b._active(c)]
        if not active:
            runs.append((p, "-"))
            continue
        uncalibrated = sorted({c for k in active if not routers[k].calibrated for c in [k[1]]})
        if uncalibrated and calibration is None:
            raise ValueError(f"{p['name']}: {args.mode} mode needs calibrated token routers, and the "
                             f"{', '.join(uncalibrated)} routers in {args.routers} are not; give --recalibrate DOMAIN "
                             "(e.g. pydocs) to calibrate them at each point")
        if not uncalibrated:
            runs.append((p, "shipped"))
        if calibration is not None:
            runs.append((p, f"{args.recalibrate} ({len(calibration)} x 128 tokens)"))
    _apply_point(em, base, points[0], default_variant)
    n_new = args.new_tokens
    print(f"elastilab generation: {len(prompts)} prompts of {args.prompt_len} tokens, {n_new} new tokens, "
          f"{len(runs)} points, mode {args.mode}", file=sys.stderr)
    with em.routers_disabled():
        teacher = greedy_continuations(em, prompts, n_new, args.batch_size)
    # compute: a forward over each prompt + its teacher continuation (threshold mode is causal: the choices
    # of cached decoding), one sequence at a time as frontier() measures (no padding of a batch counted)
    seqs = torch.cat([prompts, torch.stack(teacher)], 1)

    def flops() -> dict:
        per_seq = [measure_flops(em, s[None]) for s in seqs]
        return {k: sum(f[k] for f in per_seq) for k in per_seq[0]}

    dense = flops()
    meta = {"command": "elastilab " + shlex.join(args.argv), "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "transformers": transformers.__version__}
    rows = []

    def row(p, cal, r, f=None):
        return {"point": p["name"], "source": p["source"], "components": "+".join(p["capacities"]) or "-",
                "capacities": " ".join(f"{c}={v:g}" for c, v in p["capacities"].items()) or "-",
                "keep_dense": "; ".join(f"{c}: {' '.join(map(str, v))}" for c, v in p["keep_dense"].items()) or "-",
                "attn_tokens_variant": p["variant"] or default_variant, "mode": args.mode, "calibration": cal,
                "prompts": r["prompts"], "prompt_len": args.prompt_len, "new_tokens": n_new,
                "median_matched": r["median_matched"], "mean_matched": round(r["mean_matched"], 4),
                "min_matched": r["min_matched"], "all_matched": r["all_matched"],
                "teacher_forced_agreement": round(r["teacher_forced_agreement"], 4),
                "attention_compute": None if f is None else round(f["attention"] / dense["attention"], 5),
                "mlp_compute": None if f is None else round(f["mlp"] / dense["mlp"], 5),
                "routers_cost": None if f is None else round(f["routers"] / dense["total"], 6),
                "model_compute": None if f is None else round(f["total"] / dense["total"], 5),
                "matched": " ".join(map(str, r["matched"])), **meta}

    try:
        for p, cal in runs:
            _apply_point(em, base, p, default_variant)
            if cal not in ("-", "shipped"):
                em.calibrate(calibration)
            r = generation_agreement(em, prompts, n_new, args.batch_size, teacher=teacher)
            rows.append(row(p, cal, r, flops()))
            print(f"elastilab generation:   {p['name']} [{cal}]: median {r['median_matched']:g} / mean "
                  f"{r['mean_matched']:.2f} of {n_new} tokens, model compute {rows[-1]['model_compute']:.4f}",
                  file=sys.stderr)
            for k, q in shipped.items():
                routers[k].quantiles.copy_(q)
    finally:
        _apply_point(em, base, points[0], default_variant)
        for k, q in shipped.items():
            routers[k].quantiles.copy_(q)
    if args.bf16_reference:  # how far a harmless change alone moves greedy decoding: the dense model in bf16
        half = copy.deepcopy(em).to(torch.bfloat16)
        with half.routers_disabled():
            r = generation_agreement(half, prompts, n_new, args.batch_size, teacher=teacher)
        ref = {"capacities": {}, "keep_dense": {}, "variant": None, "name": "dense model in bfloat16",
               "source": "reference"}
        rows.append(row(ref, "-", r))
        del half
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "generation.csv", lambda f: df.to_csv(f, index=False))
    fig = plot_generation(df, title=meta["command"][:100])
    atomic_write(args.out / "generation.png", lambda f: fig.savefig(f, dpi=100, format="png"))
    print(f"wrote {args.out}/generation.csv, generation.png", file=sys.stderr)
    cols = ["point", "calibration", "median_matched", "mean_matched", "teacher_forced_agreement", "model_compute"]
    print(df[cols].to_string(index=False))
    return 0


def plot_generation(df, title: str = ""):
    """Median and mean leading tokens matching the teacher against the measured saving of model compute
    (log scale: the points that survive save little), one marker per kind of token thresholds."""
    import matplotlib.pyplot as plt
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


def add_generation_parser(sub) -> None:
    from .cli import _HelpFormatter, _positive_int as _positive
    g = sub.add_parser("generation", formatter_class=_HelpFormatter,
                       help="how many greedy tokens the elastic model generates before leaving the teacher's path",
                       description="Greedy generation (KV cache) of the teacher and of the elastic model from "
                                   "held-out prompts; per operating point, the leading new tokens that match.")
    g.add_argument("--routers", type=Path, required=True, help="a folder written by `elastilab train`")
    g.add_argument("--model", default="smollm2-135m",
                   help="the causal language model the routers belong to: offline default name, Hugging Face id or folder")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--domain", help="a shipped text domain (licenses, pydocs); default licenses")
    src.add_argument("--text", type=Path, help="any UTF-8 text file")
    g.add_argument("--split", choices=("train", "eval", "all"), default="eval",
                   help="part of the text the prompts come from: eval = the last 10%%, train = the first 90%%")
    g.add_argument("--prompts", type=_positive, default=16, help="prompts, evenly spaced over the split")
    g.add_argument("--prompt-len", type=_positive, default=32, help="tokens per prompt")
    g.add_argument("--new-tokens", type=_positive, default=32, help="greedy tokens generated per prompt")
    g.add_argument("--components", type=_names, help="swept one at a time; default: every component of the routers")
    g.add_argument("--capacities", type=_floats, default=(0.875, 0.75, 0.5),
                   help="capacities of the one-at-a-time sweep (comma-separated)")
    g.add_argument("--point", type=_point, action="append", metavar="SPEC",
                   help="an extra operating point (repeatable): attn_heads=0.875,mlp_experts=0.875, or a JSON object "
                        "that may add keep_dense {component: [layers]}, attn_tokens_variant and label")
    from . import config
    g.add_argument("--mode", choices=getattr(config, "MODES", ("topk", "threshold")), default="threshold",
                   help="token selection; token routing generates only in a causal mode (not topk)")
    g.add_argument("--recalibrate", metavar="DOMAIN_OR_PATH",
                   help="also run each point with token routing after calibrating its thresholds at that point's "
                        "capacities on this text (a shipped domain's train split, or a text file)")
    g.add_argument("--calibration-blocks", type=_positive, default=16, help="128-token blocks for --recalibrate")
    g.add_argument("--bf16-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="add a reference row: the dense model in bfloat16 against the fp32 teacher")
    g.add_argument("--batch-size", type=_positive, default=16, help="prompts generated together")
    g.add_argument("--out", type=Path, required=True, help="folder for generation.csv and generation.png")
    g.set_defaults(func=_run_generation)


def _run_generation(args) -> int:
    args.argv = sys.argv[1:]
    return cmd_generation(args)
