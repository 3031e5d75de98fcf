"""``elastilab``: the one command line. Each group of subcommands lives in its own module of this package
and is registered in SUBCOMMANDS; this module assembles them.

    elastilab train --model smollm2-135m --domain pydocs --mlp-tokens 0.75 --steps 200 --out runs/r1
    elastilab eval  --model smollm2-135m --routers runs/r1 --domain licenses --mlp-tokens 0.5 --json
    elastilab --help   # every subcommand: bench, frontier, report, recommend, generation, vit, vlm, zoo, lm
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: (module, function adding its subcommands to the subparsers), in the order --help lists them
SUBCOMMANDS = (
    ("elastilab.cli.train", "add_parsers"),               # train
    ("elastilab.cli.evaluate", "add_parsers"),            # eval
    ("elastilab.cli.bench", "add_parsers"),               # bench speed | mlp | profile
    ("elastilab.cli.frontier", "add_parsers"),                # frontier | report
    ("elastilab.cli.recommend", "add_parsers"),               # recommend
    ("elastilab.cli.generation", "add_generation_parser"),    # generation
    ("elastilab.cli.vision", "add_parsers"),                  # vit train | bench | crossdomain
    ("elastilab.cli.vlm", "add_parsers"),                     # vlm train | bench
    ("elastilab.cli.zoo", "add_parsers"),            # zoo dinov2-build | dinov2-probe | tiny-llava-train
    ("elastilab.cli.lm", "add_parsers"),          # lm quality | keep-dense | attn-variants | threshold-modes
    ("elastilab.cli.figures", "add_parsers"),     # figures
)


def parser() -> argparse.ArgumentParser:
    """The whole command line: every group in SUBCOMMANDS."""
    p = argparse.ArgumentParser(prog="elastilab", description="Elastic pretrained Transformers (ElastiFormer)")
    sub = p.add_subparsers(dest="command", required=True)
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


if __name__ == "__main__":
    sys.exit(main())
