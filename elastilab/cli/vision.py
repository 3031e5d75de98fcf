"""``elastilab vit train | bench | crossdomain``: DINOv2-S routers per image domain, trained, benchmarked and
evaluated across domains by ``analysis.vision``."""
from __future__ import annotations

import argparse
import json

from elastilab.analysis import vision
from elastilab.cli.args import HelpFormatter, command_line, default_of, positive_int
from elastilab.core.config import TOKEN_COMPONENTS
from elastilab.tasks.vit import DEFAULT_CAPS, DOMAINS


def _components_arg(text: str) -> tuple[str, ...]:
    """argparse type of --components: comma-separated names."""
    try:
        return vision.check_components(c.strip() for c in text.split(",") if c.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------- elastilab vit train | bench | crossdomain
def _cmd_train(args) -> int:
    from elastilab.files import folder_lock
    with folder_lock(args.out, "--out"):  # a second run on the same --out is refused, as by `elastilab train`
        info = vision.train(args.domain, args.out, args.images, args.steps, args.batch_size, args.lr,
                            components=args.components, skipped_tokens=args.skipped_tokens, command=command_line(args))
    print(json.dumps(info, indent=1))
    return 0


def _cmd_bench(args) -> int:
    vision.bench(args.routers, args.images, command=command_line(args), out=args.out)  # prints each row
    return 0


def _cmd_crossdomain(args) -> int:
    vision.crossdomain(args.images, command=command_line(args), out=args.out)  # prints each row
    return 0


def add_parsers(sub) -> None:
    """``elastilab vit train | bench | crossdomain``; defaults are those of train / bench / crossdomain."""
    v = sub.add_parser("vit", help="DINOv2-S routers per image domain: train, benchmark, evaluate across domains",
                       description=__doc__.split("\n")[0].split(": ", 1)[1])
    vsub = v.add_subparsers(dest="vit", required=True)
    p = vsub.add_parser("train", help="distill DINOv2-S routers on one image domain", formatter_class=HelpFormatter)
    p.add_argument("--domain", choices=DOMAINS, required=True, help="the training images")
    p.add_argument("--out", required=True, help="folder for the routers and log.csv")
    p.add_argument("--images", type=positive_int, default=default_of(vision.train, "n"), help="training images")
    p.add_argument("--steps", type=positive_int, default=default_of(vision.train, "steps"), help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=default_of(vision.train, "batch_size"),
                   help="images per step")
    p.add_argument("--lr", type=float, default=default_of(vision.train, "lr"), help="learning rate of the routers")
    p.add_argument("--components", type=_components_arg, default=default_of(vision.train, "components"),
                   help=f"comma-separated components to route, from {','.join(DEFAULT_CAPS)} (default: all)")
    p.add_argument("--skipped-tokens", choices=("drop", "merge"), default=default_of(vision.train, "skipped_tokens"),
                   help=f"what a token skipped by {'/'.join(TOKEN_COMPONENTS)} receives while the routers learn and "
                        "afterwards: nothing, or its nearest kept token's output")
    p.set_defaults(func=_cmd_train)
    p = vsub.add_parser("bench", help="learned vs random vs CLS-attention routing per component",
                        formatter_class=HelpFormatter)
    p.add_argument("--routers", default=default_of(vision.bench, "routers"), help="a router folder (read only)")
    p.add_argument("--images", type=positive_int, default=default_of(vision.bench, "n"), help="held-out digits")
    p.add_argument("--out", required=True, help="results JSON (its \"bench\" key is replaced, others kept)")
    p.set_defaults(func=_cmd_bench)
    p = vsub.add_parser("crossdomain", help="routers of each domain evaluated on every domain",
                        formatter_class=HelpFormatter)
    p.add_argument("--images", type=positive_int, default=default_of(vision.crossdomain, "n"),
                   help="test images per domain")
    p.add_argument("--out", required=True, help="results JSON (its \"crossdomain\" key is replaced, others kept)")
    p.set_defaults(func=_cmd_crossdomain)
