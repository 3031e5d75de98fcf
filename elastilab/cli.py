"""``elastilab``: the one command line. Each group of subcommands is defined next to the code it runs
and registered in SUBCOMMANDS; this module assembles them and holds ``train`` and ``eval``, the router
training and evaluation of causal language models.

    elastilab train --model smollm2-135m --domain pydocs --mlp-tokens 0.75 --steps 200 --out runs/r1
    elastilab eval  --model smollm2-135m --routers runs/r1 --domain licenses --mlp-tokens 0.5 --json
    elastilab --help                     # every subcommand: bench, frontier, report, generation, vit, vlm, zoo, lm
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .cli_args import HelpFormatter, capacity, default_of, int_at_least, load_lm, positive_int, recommended_capacities
from .config import GATED_COMPONENTS, LAYER_COMPONENTS, TOKEN_COMPONENTS

#: (module, function adding its subcommands to the subparsers), in the order --help lists them
SUBCOMMANDS = (
    ("elastilab.bench_cli", "add_parsers"),               # bench speed | mlp | profile
    ("elastilab.commands", "add_parsers"),                # frontier | report
    ("elastilab.generation", "add_generation_parser"),    # generation
    ("elastilab.vision", "add_parsers"),                  # vit train | bench | crossdomain
    ("elastilab.vlm", "add_parsers"),                     # vlm train | bench
    ("elastilab.zoo.commands", "add_parsers"),            # zoo dinov2-build | dinov2-probe | tiny-llava-train
    ("elastilab.lm_experiments", "add_parsers"),          # lm quality | keep-dense | attn-variants | threshold-modes
    ("elastilab.figures", "add_parsers"),                 # figures
)

# cmd_train / cmd_eval load through this name, so tests can replace cli._load_lm
_load_lm = load_lm

_CAPACITY_HELP = {
    "attn_tokens": "fraction of each block's tokens that enter attention, in (0, 1]; rounded up to whole tokens",
    "mlp_tokens": "fraction of each block's tokens that enter the MLP, in (0, 1]; rounded up to whole tokens",
    "attn_heads": "fraction of the query heads each token uses, in (0, 1]; rounded up to whole heads "
                  "(0.9 of 9 heads computes all 9)",
    "mlp_experts": "fraction of the MLP expert slices each token uses, in (0, 1]; rounded up to whole "
                   "experts (0.9 of 8 experts computes all 8)",
    "mlp_units": "fraction of the MLP hidden units each token computes, in (0, 1], chosen by the size of the "
                 "MLP's own gate activations (CATS: no router of its own, so train needs a routed component "
                 "beside it); rounded up to whole units",
}
#: the capacity flags of train and eval: the routed components, then mlp_units (the MLP's gate chooses)
CAPACITY_COMPONENTS = LAYER_COMPONENTS + GATED_COMPONENTS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="a causal language model: offline default name, Hugging Face id or folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--domain", help="a text domain shipped in data/text (licenses, pydocs; default pydocs)")
    src.add_argument("--text", type=Path, help="any UTF-8 text file")
    p.add_argument("--seq-len", type=int_at_least(2), default=128,
                   help="tokens per block (at least 2: each block predicts its tokens 2..n)")
    for comp in CAPACITY_COMPONENTS:
        p.add_argument("--" + comp.replace("_", "-"), type=capacity, metavar="C",
                       help=_CAPACITY_HELP[comp])


def _text(args) -> str:
    from . import data
    if args.text is not None:
        return data.text_file(args.text)
    return data.text(args.domain or "pydocs")


def _capacities(args) -> dict:
    return {c: getattr(args, c) for c in CAPACITY_COMPONENTS if getattr(args, c) is not None}


def cmd_train(args) -> int:
    from .files import folder_lock
    caps = _capacities(args)
    if not caps:
        raise SystemExit("elastilab train: give at least one capacity, e.g. --mlp-tokens 0.75 "
                         f"(components: {', '.join(CAPACITY_COMPONENTS)})")
    _check_trainable(caps, args.capacity_range)
    if args.steps == 0 and not args.warm_start:
        raise ValueError("--steps 0 trains nothing; add --warm-start BLOCKS to only fit the routers to the oracle")
    cfg = _train_config(args)
    # a second run on the same --out is refused, not silently mixed in; under torchrun, rank 0 holds it for the job
    with folder_lock(args.out, "--out") if os.environ.get("RANK", "0") == "0" else nullcontext():
        return _train(args, caps, cfg)


def _train(args, caps: dict, cfg) -> int:
    import elastilab as el
    from .distill import TrainingInterrupted
    from .trainer_state import check_checkpoint_dir
    check_checkpoint_dir(cfg)  # --out is usable: checked before minutes go into loading and training
    model, tok = _load_lm(args.model)
    if args.init_from:  # start from saved routers (the optimizer state starts afresh)
        em = el.load_routers(model, args.init_from)
        em.set_capacity(**caps)
        _init_lora(em, args)
    else:  # fresh routers; distill draws them from --seed (init_routers), so runs repeat exactly
        em = el.elastify(model, el.ElasticConfig(**caps, n_experts=args.n_experts, expert_partition=args.partition,
                                                 lora_rank=args.lora_rank or 0))
    print(em, file=sys.stderr)
    blocks = el.data.token_blocks(tok, _text(args), args.seq_len, split="train")
    warm = {}
    if args.warm_start and not args.resume:  # (a resumed run restores its routers from --out)
        from .warm_start import warm_start
        t0 = time.perf_counter()
        fit = warm_start(em, blocks[: args.warm_start])
        warm = {"warm_start_blocks": args.warm_start, "warm_start_seconds": round(time.perf_counter() - t0, 1),
                "warm_start_r2": {c: round(v, 3) for c, v in fit.items()}}
        print(f"warm start: {warm}", file=sys.stderr)
    trained = {}
    if args.steps:  # (--steps 0 --warm-start N: the fit alone)
        try:
            log = el.distill(em, blocks, cfg)
        except TrainingInterrupted as exc:
            raise KeyboardInterrupt(f"{exc}; {_continue(args, exc.saved)}") from None
        seconds = float(log.seconds.iloc[-1])  # training time, summed over a --resume
        trained = {"seconds": round(seconds, 1), "seconds_per_step": round(seconds / args.steps, 2),
                   "final_kl": float(log.kl.tail(10).mean())}
        log.to_csv(Path(args.out) / "train_log.csv", index=False)
    if any(c in TOKEN_COMPONENTS for c in caps):  # threshold modes need token routers' score tables
        em.calibrate(blocks[: args.calibration_blocks])
    em.save_routers(args.out, command="elastilab " + " ".join(args.argv), steps=args.steps, **trained, **warm)
    print(json.dumps({"out": str(args.out), **trained, **warm, **em.parameter_summary()}, indent=2))
    return 0


def _continue(args, saved: int | None) -> str:
    """How an interrupted run goes on: the same command with --resume, once it wrote a checkpoint."""
    import shlex
    command = lambda argv: "elastilab " + shlex.join(argv)  # noqa: E731
    if saved is None:
        return f"start again with: {command(args.argv)}"
    if args.init_from:  # --resume takes the routers from --out, --init-from from elsewhere: they exclude each other
        again = args.argv if args.overwrite else [*args.argv, "--overwrite"]
        return f"a run started with --init-from cannot be resumed; start again with: {command(again)}"
    again = [a for a in args.argv if a != "--overwrite"] + ([] if args.resume else ["--resume"])
    return f"resume with: {command(again)}"


def _init_lora(em, args) -> None:
    """--init-from keeps the checkpoint's LoRA; --lora-rank adds one to a checkpoint without."""
    had = em.elastic_config.lora_rank
    if args.lora_rank is None or args.lora_rank == had:
        return
    if had:
        raise ValueError(f"--init-from {args.init_from} holds a rank-{had} LoRA, which --lora-rank {args.lora_rank} "
                         "cannot change; omit --lora-rank to continue it, or start a new run without --init-from")
    em.add_lora(args.lora_rank, seed=args.seed)


def _train_config(args):
    """The DistillConfig of ``elastilab train``; it refuses bad numbers (NaN/inf lr, temperature...)."""
    from .distill import DistillConfig
    if args.resume and args.init_from:
        raise ValueError("--resume continues the run in --out, --init-from starts a new one: give only one")
    # (--steps 0, the warm start alone, never calls distill; its config still checks --out)
    return DistillConfig(steps=max(1, args.steps), batch_size=args.batch_size, lr=args.lr, lora_lr=args.lora_lr,
                         temperature=args.temperature,
                         seed=args.seed, capacity_range=tuple(args.capacity_range) if args.capacity_range else None,
                         components_per_step=args.components_per_step, checkpoint_dir=str(args.out),
                         checkpoint_every=args.checkpoint_every,
                         init_routers=args.init_from is None and not args.warm_start,
                         resume=args.resume, overwrite=args.overwrite)


def _check_trainable(caps: dict, capacity_range) -> None:
    """Routers learn from what they skip: at least one routed component's capacity (or the range's low end)
    must be below 1.0."""
    routed = {c: v for c, v in caps.items() if c in LAYER_COMPONENTS}
    if not routed:  # as el.distill would say, but before the model is loaded
        raise ValueError("nothing to train: mlp_units has no router (the MLP's gate chooses its units); evaluate "
                         "it with `elastilab eval --mlp-units C`, or add a routed component, e.g. --mlp-tokens 0.75")
    low = capacity_range[0] if capacity_range else min(routed.values())
    if low >= 1.0:
        given = " ".join(f"--{c.replace('_', '-')} {v:g}" for c, v in routed.items())
        raise ValueError(f"every capacity is 1.0 ({given}{' with --capacity-range 1 1' if capacity_range else ''}), "
                         "so nothing is skipped and the routers get no training signal; give at least one "
                         "component a capacity below 1.0, e.g. --mlp-tokens 0.75, or --capacity-range 0.5 1.0")


def _selection(em, seq_len: int) -> tuple[list[str], list[str]]:
    """What the capacities select, in whole tokens / heads / experts: (lines, warnings)."""
    from .routing import n_kept
    lines, warnings = [], []
    threshold = em.elastic_config.mode != "topk"
    for comp, cap in em.capacities.items():
        block = next((b for b in em.blocks if comp in b.capacity), None)
        if block is None:
            continue
        if cap >= 1.0:
            lines.append(f"{comp} 1 -> dense")
            continue
        if comp in TOKEN_COMPONENTS:
            if threshold:
                lines.append(f"{comp} {cap:g} -> tokens whose score passes the threshold calibrated for "
                             f"{cap:.0%} (the fraction computed is in measured_capacities)")
                continue
            always = min(seq_len, block.adapter.block_spec(block.base_layer, block.layer_idx).n_protected)
            k, n, unit = always + n_kept(cap, seq_len - always), seq_len, f"tokens per {seq_len}-token block"
            if always:
                unit += f" (the first {always} always computed)"
        else:
            n, name = _slots(block, comp)
            k, unit = n_kept(cap, n), name + " per token"
        line = f"{comp} {cap:g} -> {k}/{n} {unit}"
        lines.append(line)
        if k == n:
            below = math.floor((n - 1) / n * 1000) / 1000
            warnings.append(f"{line}: nothing skipped (capacities round up to whole {unit.split()[0]}; "
                            f"{below:g} or less skips one)")
    return lines, warnings


def _slots(block, comp: str) -> tuple[int, str]:
    """What ``comp`` chooses among in each token of ``block``: (how many, their name)."""
    if comp == "mlp_units":
        return block.adapter.block_spec(block.base_layer, block.layer_idx).mlp.width, "units"
    return block.routers[comp].proj.out_features, "heads" if comp == "attn_heads" else "experts"


@contextmanager
def _measured_capacities(em):
    """Yields a dict filled, once the block exits, with the fraction of tokens / heads / experts the
    routed forwards run inside really computed, per component (mean over elastic layers and batches)."""
    from .routing import n_kept
    sums: dict[str, list[float]] = {}

    def record(block, args, output):
        if not block.enabled:  # the teacher pass
            return
        c = block.counts
        for comp in block.capacity:
            if comp in ("attn_tokens", "mlp_tokens"):
                frac = c["attn_rows" if comp == "attn_tokens" else "mlp_rows"] / (c["B"] * c["T"])
            else:
                n = _slots(block, comp)[0]
                frac = n_kept(block.capacity[comp], n) / n
            total = sums.setdefault(comp, [0.0, 0])
            total[0] += frac
            total[1] += 1

    measured: dict[str, float] = {}
    handles = [b.register_forward_hook(record) for b in em.blocks]
    try:
        yield measured
    finally:
        for h in handles:
            h.remove()
        measured.update({comp: round(s / n, 4) for comp, (s, n) in sums.items()})


def _json_safe(obj):
    """NaN and inf become null: the printed JSON stays valid."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def cmd_eval(args) -> int:
    import elastilab as el
    model, tok = _load_lm(args.model)
    caps, where = _capacities(args), "the command line"
    if args.routers:
        em = el.load_routers(model, args.routers)
        if caps:
            source = "from the command line; the other components run dense"
        elif rec := recommended_capacities(args.routers):
            caps, where = rec, f"{args.routers}: recommended_capacities"
            source = f"the recommended operating point stored in {args.routers}"
        else:
            source = (f"the capacities {args.routers} was trained at (it stores no recommended_capacities); "
                      "give capacities to choose others")
    else:
        if not caps:
            raise SystemExit("elastilab eval: give --routers DIR or at least one capacity")
        em = el.elastify(model, el.ElasticConfig(**caps))
        source = "from the command line; fresh, untrained routers"
    if caps:  # the chosen capacities; the other components run dense
        try:
            em.set_capacity(**{**{c: 1.0 for c in em.capacities}, **caps})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    if args.mode:
        em.set_mode(args.mode)
    if em.elastic_config.mode != "topk":
        missing = sorted({c for b in em.blocks for c, r in b.routers.items()
                          if c in TOKEN_COMPONENTS and b.capacity[c] < 1.0 and not r.calibrated})
        if missing:
            why = "this checkpoint was saved uncalibrated" if args.routers else "fresh routers: no --routers given"
            raise ValueError(f"--mode {em.elastic_config.mode} needs token routers calibrated on sample text, and the "
                             f"{', '.join(missing)} routers are not ({why}); use --mode topk, or --routers DIR "
                             "written by `elastilab train` (which calibrates them)")
    print(f"elastilab eval: capacities {', '.join(f'{c}={v:g}' for c, v in em.capacities.items())}, "
          f"mode {em.elastic_config.mode} ({source})", file=sys.stderr)
    lines, warnings = _selection(em, args.seq_len)
    for line in lines:
        print(f"elastilab eval:   {line}", file=sys.stderr)
    for line in warnings:
        print(f"elastilab eval: warning: {line}", file=sys.stderr)
    blocks = el.data.token_blocks(tok, _text(args), args.seq_len, split=args.split)
    if args.blocks > len(blocks):
        print(f"elastilab eval: note: --blocks {args.blocks}, but the {args.split} split has only {len(blocks)} "
              f"blocks of {args.seq_len} tokens; evaluating {len(blocks)}", file=sys.stderr)
    blocks = blocks[: args.blocks]
    with _measured_capacities(em) as measured:
        result = el.evaluate(em, blocks)
    report = em.compute_report(blocks[:1])
    result["compute_fraction"] = {row.part: round(float(row.fraction), 4) for row in report.itertuples()}
    result["requested_capacities"] = em.capacities
    result["measured_capacities"] = measured
    result["mode"] = em.elastic_config.mode
    result = _json_safe(result)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0


def add_parsers(sub) -> None:
    """``elastilab train | eval``."""
    from .config import ElasticConfig
    from .distill import DistillConfig
    d = lambda name: default_of(DistillConfig, name)  # noqa: E731  (the trainer's defaults)
    t = sub.add_parser("train", help="train routers by self-distillation", formatter_class=HelpFormatter)
    _common(t)
    t.add_argument("--out", type=Path, required=True,
                   help="folder for routers.safetensors/json, the trainer state and the log; one that already "
                        "holds routers takes --resume or --overwrite")
    t.add_argument("--steps", type=int_at_least(0), default=d("steps"),
                   help="optimizer steps (0: only the --warm-start fit)")
    t.add_argument("--batch-size", type=int, default=d("batch_size"), help="blocks per step")
    t.add_argument("--lr", type=float, default=d("lr"), help="AdamW learning rate of the routers")
    t.add_argument("--temperature", type=float, default=d("temperature"), help="of the distillation KL")
    t.add_argument("--seed", type=int, default=d("seed"),
                   help="seeds the initial routers, the data order and the capacity draws: same seed, same routers")
    t.add_argument("--n-experts", type=int, default=default_of(ElasticConfig, "n_experts"), help="MLP slices")
    t.add_argument("--partition", choices=("contiguous", "clustered"),
                   default=default_of(ElasticConfig, "expert_partition"), help="how the MLP's hidden units form slices")
    t.add_argument("--capacity-range", type=capacity, nargs=2, metavar=("LOW", "HIGH"),
                   help="sample capacities from [LOW, HIGH] each step (one router set for the whole slider)")
    t.add_argument("--components-per-step", type=int, default=d("components_per_step"),
                   help="route only this many (random) components per step, the others dense")
    t.add_argument("--checkpoint-every", type=int_at_least(0), default=25,  # the library's 50 is for longer runs
                   help="save routers and trainer state every N steps and after the last (0: only after the last)")
    t.add_argument("--warm-start", type=int_at_least(0), default=0, metavar="BLOCKS",
                   help="first fit the routers to the oracle's ranking on this many training blocks (dense "
                        "forward passes only: seconds; elastilab.warm_start), then distill from there")
    t.add_argument("--lora-rank", type=int_at_least(0), metavar="R",
                   help="also train a rank-R LoRA (peft) on every projection of the routed blocks, with the same "
                        "objective (0: none, the default; with --init-from: the checkpoint's). Saved with the routers; "
                        "merged at inference, so it costs no FLOPs per token")
    t.add_argument("--lora-lr", type=float, default=d("lora_lr"), help="AdamW learning rate of the LoRA factors")
    t.add_argument("--init-from", type=Path, help="start from the routers in this folder (same model and components)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --out from its last checkpoint, to the routers an "
                            "uninterrupted run reaches: give the same options (a larger --steps extends it)")
    again.add_argument("--overwrite", action="store_true", help="replace the router checkpoint already in --out")
    t.add_argument("--calibration-blocks", type=positive_int, default=16,
                   help="blocks used to calibrate threshold mode")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="perplexity, KL, agreement and compute vs the teacher",
                       formatter_class=HelpFormatter)
    _common(e)
    e.add_argument("--routers", type=Path, help="a folder written by `elastilab train`; without capacities, "
                   "its recommended_capacities (else the capacities it was trained at) are used")
    e.add_argument("--split", choices=("train", "eval", "all"), default="eval",
                   help="part of the text: eval = the last 10%% (cut at a line start), train = the rest, all")
    e.add_argument("--blocks", type=positive_int, default=8,
                   help="number of blocks to evaluate (fewer if the split is shorter)")
    e.add_argument("--mode", choices=("topk", "threshold", "running"),
                   help="token selection: top-k per block, calibrated per-layer thresholds (causal), or each "
                        "sequence's running quantile of its own scores (causal, follows the capacity); "
                        "default: the routers' own mode (topk for fresh routers)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_eval)


def parser() -> argparse.ArgumentParser:
    """The whole command line: train and eval, then every group in SUBCOMMANDS."""
    p = argparse.ArgumentParser(prog="elastilab", description="Elastic pretrained Transformers (ElastiFormer)")
    sub = p.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    for module, fn in SUBCOMMANDS:
        getattr(importlib.import_module(module), fn)(sub)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser().parse_args(argv)
    args.argv = argv  # what the commands record as their own command line ("elastilab " + argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, ModuleNotFoundError, RuntimeError) as exc:
        print(f"elastilab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, not a traceback; 130 = 128 + SIGINT, as shells report it
        print(f"elastilab {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # also `python -m elastilab.cli` (torchrun)
    sys.exit(main())
