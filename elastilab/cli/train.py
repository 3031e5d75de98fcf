"""``elastilab train`` and ``elastilab eval``: router training (self-distillation, resumable) and evaluation of
causal language models.

    elastilab train --model smollm2-135m --domain pydocs --mlp-tokens 0.75 --steps 200 --out runs/r1
    elastilab eval  --model smollm2-135m --routers runs/r1 --domain licenses --mlp-tokens 0.5 --json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from elastilab.cli.args import HelpFormatter, capacity, command_line, default_of, int_at_least, load_lm, positive_int
from elastilab.core.components import COMPONENTS
from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS, TOKEN_COMPONENTS

# cmd_train / cmd_eval load through this name, so tests can replace train._load_lm
_load_lm = load_lm




#: the capacity flags of train and eval: the routed components, then the gated ones (the MLP's gate chooses)
CAPACITY_COMPONENTS = LAYER_COMPONENTS + GATED_COMPONENTS


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="a causal language model: offline default name, Hugging Face id or folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--domain", help="a text domain shipped in data/text (licenses, pydocs; default pydocs)")
    src.add_argument("--text", type=Path, help="any UTF-8 text file")
    p.add_argument("--seq-len", type=int_at_least(2), default=128,
                   help="tokens per block (at least 2: each block predicts its tokens 2..n)")
    for comp in CAPACITY_COMPONENTS:
        p.add_argument("--" + comp.replace("_", "-"), type=capacity, metavar="C",
                       help=COMPONENTS[comp].help)


def text_of(args) -> str:
    from elastilab import data
    if args.text is not None:
        return data.text_file(args.text)
    return data.text(args.domain or "pydocs")


def capacities_of(args) -> dict:
    return {c: getattr(args, c) for c in CAPACITY_COMPONENTS if getattr(args, c) is not None}


def cmd_train(args) -> int:
    from elastilab.files import folder_lock
    caps = capacities_of(args)
    if not caps:
        raise SystemExit("elastilab train: give at least one capacity, e.g. --mlp-tokens 0.75 "
                         f"(components: {', '.join(CAPACITY_COMPONENTS)})")
    _check_trainable(caps, args.capacity_range)
    if args.steps == 0 and not args.warm_start:
        raise ValueError("--steps 0 trains nothing; add --warm-start BLOCKS to only fit the routers to the oracle")
    _check_resumable(args)
    cfg = _train_config(args)
    # a second run on the same --out is refused, not silently mixed in; under torchrun, rank 0 holds it for the job
    with folder_lock(args.out, "--out") if os.environ.get("RANK", "0") == "0" else nullcontext():
        return _train(args, caps, cfg)


def _train(args, caps: dict, cfg) -> int:
    import elastilab as el
    from elastilab.training.distill import TrainingInterrupted
    from elastilab.training.trainer_state import check_checkpoint_dir
    check_checkpoint_dir(cfg)  # --out is usable: checked before minutes go into loading and training
    model, tok = _load_lm(args.model)
    if args.init_from:  # start from saved routers (the optimizer state starts afresh); a resumed run from the
        # checkpoint in --out, whose layout (and LoRA) they share: distill then restores its routers and optimizer
        em = el.load_routers(model, args.out if args.resume else args.init_from)
        em.set_capacity(**caps)
        _init_lora(em, args)
    else:  # fresh routers; distill draws them from --seed (init_routers), so runs repeat exactly
        em = el.elastify(model, el.ElasticConfig(**caps, n_experts=args.n_experts, expert_partition=args.partition,
                                                 lora_rank=args.lora_rank or 0))
    print(em, file=sys.stderr)
    blocks = el.data.token_blocks(tok, text_of(args), args.seq_len, split="train")
    warm = {}
    if args.warm_start and not args.resume:  # (a resumed run restores its routers from --out)
        from elastilab.training.warm_start import warm_start
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
    em.save_routers(args.out, command=command_line(args), steps=args.steps, **trained, **warm)
    print(json.dumps({"out": str(args.out), **trained, **warm, **em.parameter_summary()}, indent=2))
    return 0


def _continue(args, saved: int | None) -> str:
    """How an interrupted run goes on: the same command with --resume, once it wrote a checkpoint."""
    command = command_line
    if saved is None:
        return f"start again with: {command(args.argv)}"
    again = [a for a in args.argv if a != "--overwrite"] + ([] if args.resume else ["--resume"])
    return f"resume with: {command(again)}"


def _check_resumable(args) -> None:
    """--resume of a run begun with --init-from: its --init-from is read from the trainer state when not given,
    and a run stopped before its first checkpoint is told so, with the command that starts it again."""
    from elastilab.training.trainer_state import TRAINER_STATE_FILE, read_trainer_state
    if not args.resume:
        return
    if not (Path(args.out) / TRAINER_STATE_FILE).is_file():
        again = [a for a in args.argv if a != "--resume"]
        if Path(args.out, "routers.json").exists():
            again.append("--overwrite")
        raise FileNotFoundError(f"nothing to resume in {args.out}: it holds no {TRAINER_STATE_FILE} (written at "
                                f"every checkpoint), so the run stopped before its first checkpoint; start it "
                                f"again with: {command_line(again)}")
    began = read_trainer_state(args.out)[1]["run"]["distill"].get("extra", {}).get("init_from")
    if began and args.init_from is None:  # the same run, as the command that started it said
        args.init_from = Path(began)
        print(f"resuming a run begun with --init-from {began}", file=sys.stderr)


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
    from elastilab.training.distill import DistillConfig
    # (--steps 0, the warm start alone, never calls distill; its config still checks --out)
    return DistillConfig(steps=max(1, args.steps), batch_size=args.batch_size, lr=args.lr, lora_lr=args.lora_lr,
                         temperature=args.temperature,
                         seed=args.seed, capacity_range=tuple(args.capacity_range) if args.capacity_range else None,
                         components_per_step=args.components_per_step, checkpoint_dir=str(args.out),
                         checkpoint_every=args.checkpoint_every,
                         init_routers=args.init_from is None and not args.warm_start,
                         resume=args.resume, overwrite=args.overwrite,
                         # recorded in the trainer state (and checked by --resume): where the routers began
                         extra={"init_from": str(args.init_from)} if args.init_from else {})


def _check_trainable(caps: dict, capacity_range) -> None:
    """Routers learn from what they skip: at least one routed component's capacity (or the range's low end)
    must be below 1.0."""
    routed = {c: v for c, v in caps.items() if c in LAYER_COMPONENTS}
    if not routed:  # as el.distill would say, but before the model is loaded
        gated = ", ".join(GATED_COMPONENTS)
        flags = " ".join(COMPONENTS[c].flag + " C" for c in GATED_COMPONENTS)
        raise ValueError(f"nothing to train: {gated} has no router (the MLP's gate chooses its units); evaluate "
                         f"it with `elastilab eval {flags}`, or add a routed component, e.g. --mlp-tokens 0.75")
    low = capacity_range[0] if capacity_range else min(routed.values())
    if low >= 1.0:
        given = " ".join(f"--{c.replace('_', '-')} {v:g}" for c, v in routed.items())
        raise ValueError(f"every capacity is 1.0 ({given}{' with --capacity-range 1 1' if capacity_range else ''}), "
                         "so nothing is skipped and the routers get no training signal; give at least one "
                         "component a capacity below 1.0, e.g. --mlp-tokens 0.75, or --capacity-range 0.5 1.0")


def add_parsers(sub) -> None:
    """``elastilab train``."""
    from elastilab.core.config import ElasticConfig
    from elastilab.training.distill import DistillConfig
    d = lambda name: default_of(DistillConfig, name)  # noqa: E731  (the trainer's defaults)
    t = sub.add_parser("train", help="train routers by self-distillation", formatter_class=HelpFormatter)
    add_common_options(t)
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
                   default=default_of(ElasticConfig, "expert_partition"),
                   help="how the MLP's hidden units form slices")
    t.add_argument("--capacity-range", type=capacity, nargs=2, metavar=("LOW", "HIGH"),
                   help="sample capacities from [LOW, HIGH] each step (one router set for the whole slider)")
    t.add_argument("--components-per-step", type=int, default=d("components_per_step"),
                   help="route only this many (random) components per step, the others dense")
    t.add_argument("--checkpoint-every", type=int_at_least(0), default=25,  # the library's 50 is for longer runs
                   help="save routers and trainer state every N steps and after the last (0: only after the last)")
    t.add_argument("--warm-start", type=int_at_least(0), default=0, metavar="BLOCKS",
                   help="first fit the routers to the oracle's ranking on this many training blocks (dense "
                        "forward passes only: seconds; elastilab.training.warm_start), then distill from there")
    t.add_argument("--lora-rank", type=int_at_least(0), metavar="R",
                   help="also train a rank-R LoRA (peft) on every projection of the routed blocks, with the same "
                        "objective (0: none, the default; with --init-from: the checkpoint's). "
                        "Saved with the routers; "
                        "merged at inference, so it costs no FLOPs per token")
    t.add_argument("--lora-lr", type=float, default=d("lora_lr"), help="AdamW learning rate of the LoRA factors")
    t.add_argument("--init-from", type=Path, help="start from the routers in this folder (same model and components); "
                   "recorded in the trainer state, so --resume continues such a run like any other")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --out from its last checkpoint, to the routers an "
                            "uninterrupted run reaches: give the same options (a larger --steps extends it)")
    again.add_argument("--overwrite", action="store_true", help="replace the router checkpoint already in --out")
    t.add_argument("--calibration-blocks", type=positive_int, default=16,
                   help="blocks used to calibrate threshold mode")
    t.set_defaults(func=cmd_train)
