"""``elastilab generation``: per operating point (dense, each component alone at each capacity, the
routers' recommended point, ``--point`` ones), how many tokens of the teacher's greedy continuation
the elastic model reproduces (``analysis.generation.generation_agreement``) and at what measured compute; writes
generation.csv and generation.png.

    elastilab generation --routers data/routers/smollm2-135m --domain licenses --out runs/gen
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from elastilab import data
from elastilab.analysis.generation import generation_agreement, greedy_continuations, plot_generation
from elastilab.analysis.generation_points import (  # POINT_KEYS: re-exported
    EXAMPLE_POINT,
    apply_point,
    generation_points,
    point_spec,
)
from elastilab.cli.args import (
    HelpFormatter,
    capacities,
    command_line,
    default_of,
    load_lm,
    names,
    positive_int,
    recommended_capacities,
)
from elastilab.core.compute import measure_flops
from elastilab.core.config import GATED_COMPONENTS, MODES, TOKEN_COMPONENTS, ElasticConfig
from elastilab.core.loading import load_routers
from elastilab.core.model import elastify
from elastilab.files import atomic_write


def _token_routers(em) -> dict:
    return {(b.layer_idx, c): r for b in em.blocks for c, r in b.routers.items() if c in TOKEN_COMPONENTS}


def _generation_prompts(tok, args):
    """--prompts blocks of --prompt-len tokens, evenly spaced over the text's --split (deterministic)."""
    text = data.text_file(args.text) if args.text else data.text(args.domain or "licenses")
    blocks = data.token_blocks(tok, text, args.prompt_len, split=args.split)
    if args.prompts > len(blocks):
        raise ValueError(f"--prompts {args.prompts}, but the {args.split} split holds only {len(blocks)} blocks of "
                         f"{args.prompt_len} tokens; ask for fewer prompts, shorter ones or another --split")
    return blocks[torch.as_tensor(np.linspace(0, len(blocks) - 1, args.prompts).round().astype(int))]


def cmd_generation(args) -> int:
    import transformers  # only for its version in the table; slow to import
    torch.manual_seed(0)
    model, tok = load_lm(args.model)
    em = _elastic(model, args).set_mode(args.mode)
    points = generation_points(em, args, recommended_capacities(args.routers) if args.routers else None)
    prompts = _generation_prompts(tok, args)
    calibration = _calibration_blocks(tok, args) if args.recalibrate else None
    routers = _token_routers(em)
    shipped = {k: r.quantiles.clone() for k, r in routers.items()}
    base = {c: 1.0 for c in em.capacities}
    default_variant = em.elastic_config.attn_tokens_variant
    runs = _runs(em, points, routers, calibration, args)
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
    meta = {"command": command_line(args), "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "transformers": transformers.__version__}
    rows = []
    row = lambda p, cal, r, f=None: _row(p, cal, r, f, dense, args, default_variant, meta)  # noqa: E731

    try:
        for p, cal in runs:
            apply_point(em, base, p, default_variant)
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
        apply_point(em, base, points[0], default_variant)
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
    _write(pd.DataFrame(rows), args.out, meta["command"])
    return 0


def _calibration_blocks(tok, args) -> torch.Tensor:
    """--recalibrate's text (a file, or a shipped domain's training split) in 128-token blocks: token routers
    also run each point with thresholds measured on it."""
    src = Path(args.recalibrate)
    text = data.text_file(src) if src.is_file() else data.text(args.recalibrate)
    return data.token_blocks(tok, text, 128, split="all" if src.is_file() else "train")[: args.calibration_blocks]


def _write(df: pd.DataFrame, out: Path, command: str) -> None:
    """generation.csv and its plot into --out; the headline columns to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "generation.csv", lambda f: df.to_csv(f, index=False))
    fig = plot_generation(df, title=command[:100])
    atomic_write(out / "generation.png", lambda f: fig.savefig(f, dpi=100, format="png"))
    print(f"wrote {out}/generation.csv, generation.png", file=sys.stderr)
    cols = ["point", "calibration", "median_matched", "mean_matched", "teacher_forced_agreement", "model_compute"]
    print(df[cols].to_string(index=False))


def _elastic(model, args):
    """The shipped (or --routers) routers on the model, or, without routers, the gated components alone."""
    if args.routers is not None:
        return load_routers(model, args.routers)
    gated = list(args.components or ())  # components chosen without a router (the gated ones: the MLP's own gate)
    if not gated or any(c not in GATED_COMPONENTS for c in gated):
        raise ValueError("without --routers, give --components from those that need none: "
                         f"{', '.join(GATED_COMPONENTS)}")
    return elastify(model, ElasticConfig(**dict.fromkeys(gated, 1.0)))


def _runs(em, points, routers, calibration, args) -> list[tuple[dict, str]]:
    """(point, calibration name) to run: a point without token routing once ("-"); one with token routing
    with the shipped thresholds if they are calibrated, and with --recalibrate's if given."""
    base, default_variant, runs = {c: 1.0 for c in em.capacities}, em.elastic_config.attn_tokens_variant, []
    for p in points:
        apply_point(em, base, p, default_variant)
        active = [(b.layer_idx, c) for b in em.blocks for c in b.routers
                  if (b.layer_idx, c) in routers and b._active(c)]
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
    apply_point(em, base, points[0], default_variant)
    return runs


def _row(p, cal, r, f, dense, args, default_variant, meta) -> dict:
    """One table row: the point, its agreement with the teacher's greedy text, its measured compute (f)."""
    return {"point": p["name"], "source": p["source"], "components": "+".join(p["capacities"]) or "-",
            "capacities": " ".join(f"{c}={v:g}" for c, v in p["capacities"].items()) or "-",
            "keep_dense": "; ".join(f"{c}: {' '.join(map(str, v))}" for c, v in p["keep_dense"].items()) or "-",
            "attn_tokens_variant": p["variant"] or default_variant, "mode": args.mode, "calibration": cal,
            "prompts": r["prompts"], "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "median_matched": r["median_matched"], "mean_matched": round(r["mean_matched"], 4),
            "min_matched": r["min_matched"], "all_matched": r["all_matched"],
            "teacher_forced_agreement": round(r["teacher_forced_agreement"], 4),
            "attention_compute": None if f is None else round(f["attention"] / dense["attention"], 5),
            "mlp_compute": None if f is None else round(f["mlp"] / dense["mlp"], 5),
            "routers_cost": None if f is None else round(f["routers"] / dense["total"], 6),
            "model_compute": None if f is None else round(f["total"] / dense["total"], 5),
            "matched": " ".join(map(str, r["matched"])), **meta}


def add_generation_parser(sub) -> None:
    """``elastilab generation``."""
    g = sub.add_parser("generation", formatter_class=HelpFormatter,
                       help="how many greedy tokens the elastic model generates before leaving the teacher's path",
                       description="Greedy generation (KV cache) of the teacher and of the elastic model from "
                                   "held-out prompts; per operating point, the leading new tokens that match.")
    g.add_argument("--routers", type=Path, help="a folder written by `elastilab train` (not needed for "
                   f"components without routers: --components {','.join(GATED_COMPONENTS)})")
    g.add_argument("--model", default="smollm2-135m",
                   help="the causal language model the routers belong to: offline default name, "
                        "Hugging Face id or folder")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--domain", help="a shipped text domain (licenses, pydocs); default licenses")
    src.add_argument("--text", type=Path, help="any UTF-8 text file")
    g.add_argument("--split", choices=("train", "eval", "all"), default="eval",
                   help="part of the text the prompts come from: eval = the last 10%%, train = the first 90%%")
    g.add_argument("--prompts", type=positive_int, default=16, help="prompts, evenly spaced over the split")
    g.add_argument("--prompt-len", type=positive_int, default=32, help="tokens per prompt")
    g.add_argument("--new-tokens", type=positive_int, default=default_of(greedy_continuations, "max_new_tokens"),
                   help="greedy tokens generated per prompt")
    g.add_argument("--components", type=names, help="swept one at a time; default: every component of the routers")
    g.add_argument("--capacities", type=capacities, default=(0.875, 0.75, 0.5),
                   help="capacities of the one-at-a-time sweep (comma-separated)")
    g.add_argument("--point", type=point_spec, action="append", metavar="SPEC",
                   help=f"an extra operating point (repeatable): {EXAMPLE_POINT}, or a JSON object "
                        "that may add keep_dense {component: [layers]}, attn_tokens_variant, prefill and label; or "
                        "compute=x1.05 (the whole model at a recommended point of the routers)")
    g.add_argument("--mode", choices=MODES, default="threshold",
                   help="token selection; token routing generates only in a causal mode (not topk)")
    g.add_argument("--recalibrate", metavar="DOMAIN_OR_PATH",
                   help="also run each point with token routing after calibrating its thresholds at that point's "
                        "capacities on this text (a shipped domain's train split, or a text file)")
    g.add_argument("--calibration-blocks", type=positive_int, default=16, help="128-token blocks for --recalibrate")
    g.add_argument("--bf16-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="add a reference row: the dense model in bfloat16 against the fp32 teacher")
    g.add_argument("--batch-size", type=positive_int, default=default_of(greedy_continuations, "batch_size"),
                   help="prompts generated together")
    g.add_argument("--out", type=Path, required=True, help="folder for generation.csv and generation.png")
    g.set_defaults(func=cmd_generation)  # cli.main sets args.argv, recorded in the table
