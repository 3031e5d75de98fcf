"""``elastilab vlm train | bench``: tiny-llava's visual-token router, trained and benchmarked by ``analysis.vlm``."""
from __future__ import annotations

from elastilab.analysis import vlm
from elastilab.cli.args import HelpFormatter, capacity, default_of, names, positive_int


def add_parsers(sub) -> None:
    """``elastilab vlm train | bench``; defaults are those of vlm.train_visual_router / vlm.bench."""
    tdef, bdef = (lambda name: default_of(vlm.train_visual_router, name)), (lambda name: default_of(vlm.bench, name))
    v = sub.add_parser("vlm", help="tiny-llava's visual-token router: train, benchmark",
                       description="tiny-llava's visual-token router")
    vsub = v.add_subparsers(dest="vlm", required=True)
    t = vsub.add_parser("train", help="self-distil the visual router (into --out)", formatter_class=HelpFormatter)
    t.add_argument("--steps", type=positive_int, default=tdef("steps"), help="optimizer steps")
    t.add_argument("--batch-size", type=positive_int, default=tdef("batch_size"), help="examples per step")
    t.add_argument("--lr", type=float, default=tdef("lr"), help="AdamW learning rate")
    t.add_argument("--capacity-range", type=capacity, nargs=2, default=tdef("capacity_range"), metavar=("LOW", "HIGH"),
                   help="each step keeps a fraction of image tokens drawn from this range")
    t.add_argument("--seed", type=int, default=tdef("seed"), help="data order and capacity draws")
    t.add_argument("--tasks", type=names, default=tdef("tasks"),
                   help="comma-separated training questions: digit, face, scenes (all four scene question types) "
                        "or scene_colour, scene_count, scene_exists, scene_position")
    t.add_argument("--out", required=True,
                   help="checkpoint folder (the shipped one is data/routers/tiny-llava-visual)")
    t.set_defaults(func=_cmd_train)
    b = vsub.add_parser("bench", help="learned vs FastV vs random at 75/50/25%% image tokens (into --out)",
                        formatter_class=HelpFormatter)
    b.add_argument("--routers", default=bdef("routers"), help="visual router checkpoint")
    b.add_argument("--per-class", type=positive_int, default=bdef("per_class"), help="held-out digits per class")
    b.add_argument("--faces", type=positive_int, default=bdef("faces"), help="held-out faces and non-faces each")
    b.add_argument("--out", required=True,
                   help="results JSON (the shipped one is benchmarks/results/tiny-llava-visual-tokens.json)")
    b.set_defaults(func=_cmd_bench)


def _cmd_train(args) -> int:
    from elastilab.files import folder_lock
    with folder_lock(args.out, "--out"):  # a second run on the same --out is refused, as by `elastilab train`
        vlm.train_visual_router(args.steps, args.batch_size, args.lr, tuple(args.capacity_range), args.out,
                                args.seed, tasks=tuple(args.tasks))
    return 0


def _cmd_bench(args) -> int:
    vlm.bench(args.routers, args.out, args.per_class, args.faces)  # prints each row
    return 0
