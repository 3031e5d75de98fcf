"""``elastilab train | eval`` — router training and evaluation from the shell.

    elastilab train --model smollm2-135m --domain pydocs --mlp-tokens 0.75 --steps 200 --out runs/r1
    elastilab eval  --model smollm2-135m --routers runs/r1 --domain licenses --mlp-tokens 0.5 --json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import LAYER_COMPONENTS

def _capacity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"capacity must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"capacity must be in (0, 1], got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="offline default name, Hugging Face id or folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--domain", help="a text domain shipped in data/text (licenses, pydocs)")
    src.add_argument("--text", type=Path, help="any UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=128)
    for comp in LAYER_COMPONENTS:
        p.add_argument("--" + comp.replace("_", "-"), type=_capacity, metavar="C",
                       help=f"capacity of {comp} in (0, 1]")


def _text(args) -> str:
    from . import data
    if args.text is not None:
        return data.text_file(args.text)
    return data.text(args.domain or "pydocs")


def _capacities(args) -> dict:
    return {c: getattr(args, c) for c in LAYER_COMPONENTS if getattr(args, c) is not None}


def cmd_train(args) -> int:
    import elastilab as el
    caps = _capacities(args)
    if not caps:
        raise SystemExit("elastilab train: give at least one capacity, e.g. --mlp-tokens 0.75 "
                         f"(components: {', '.join(LAYER_COMPONENTS)})")
    model, tok = el.zoo.load(args.model)
    if args.init_from:  # continue from saved routers (the optimizer state starts afresh)
        em = el.load_routers(model, args.init_from)
        em.set_capacity(**caps)
    else:
        em = el.elastify(model, el.ElasticConfig(**caps, n_experts=args.n_experts, expert_partition=args.partition))
    print(em, file=sys.stderr)
    blocks = el.data.token_blocks(tok, _text(args), args.seq_len, split="train")
    t0 = time.perf_counter()
    log = el.distill(em, blocks, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     capacity_range=tuple(args.capacity_range) if args.capacity_range else None,
                     components_per_step=args.components_per_step, checkpoint_dir=str(args.out),
                     checkpoint_every=args.checkpoint_every, temperature=args.temperature)
    seconds = time.perf_counter() - t0
    em.calibrate(blocks[: args.calibration_blocks])
    command = "elastilab " + " ".join(sys.argv[1:])
    em.save_routers(args.out, command=command, steps=args.steps, seconds=round(seconds, 1),
                    seconds_per_step=round(seconds / args.steps, 2), final_kl=float(log.kl.tail(10).mean()))
    log.to_csv(Path(args.out) / "train_log.csv", index=False)
    print(json.dumps({"out": str(args.out), "seconds_per_step": seconds / args.steps,
                      **em.parameter_summary()}, indent=2))
    return 0


def cmd_eval(args) -> int:
    import elastilab as el
    model, tok = el.zoo.load(args.model)
    if args.routers:
        em = el.load_routers(model, args.routers)
    else:
        caps = _capacities(args)
        if not caps:
            raise SystemExit("elastilab eval: give --routers DIR or at least one capacity")
        em = el.elastify(model, el.ElasticConfig(**caps))
    overrides = _capacities(args)
    if overrides:  # the capacities given on the command line; the other components run dense
        em.set_capacity(**{**{c: 1.0 for c in em.capacities}, **overrides})
    if args.mode:
        em.set_mode(args.mode)
    blocks = el.data.token_blocks(tok, _text(args), args.seq_len, split=args.split)[: args.blocks]
    result = el.evaluate(em, blocks)
    report = em.compute_report(blocks[:1])
    result["compute_fraction"] = {row.part: round(float(row.fraction), 4) for row in report.itertuples()}
    result["capacities"] = em.capacities
    result["mode"] = em.elastic_config.mode
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>18}: {v}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="elastilab", description="Elastic pretrained Transformers (ElastiFormer)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train routers by self-distillation")
    _common(t)
    t.add_argument("--out", type=Path, required=True, help="folder for routers.safetensors/json and the log")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--n-experts", type=int, default=8)
    t.add_argument("--partition", choices=("contiguous", "clustered"), default="contiguous")
    t.add_argument("--capacity-range", type=_capacity, nargs=2, metavar=("LOW", "HIGH"),
                   help="sample capacities from [LOW, HIGH] each step (one router set for the whole slider)")
    t.add_argument("--components-per-step", type=int, default=None,
                   help="route only this many (random) components per step, the others dense")
    t.add_argument("--checkpoint-every", type=int, default=25)
    t.add_argument("--init-from", type=Path, help="start from the routers in this folder (same model and components)")
    t.add_argument("--calibration-blocks", type=int, default=16, help="blocks used to calibrate threshold mode")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="perplexity, KL, agreement and compute vs the teacher")
    _common(e)
    e.add_argument("--routers", type=Path, help="a folder written by `elastilab train`")
    e.add_argument("--split", choices=("train", "eval", "all"), default="eval")
    e.add_argument("--blocks", type=int, default=8)
    e.add_argument("--mode", choices=("topk", "threshold"))
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_eval)
    from .bench import add_bench_parser
    add_bench_parser(sub)  # elastilab bench speed | mlp | profile, defined in bench.py
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as exc:
        print(f"elastilab {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
