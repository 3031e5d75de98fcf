"""``elastilab figures``: every committed figure drawn again by ``analysis.figures`` from the committed CSVs, into
--out, or --check that the committed images (benchmarks/results/*.png, the notebooks' figures) are current."""
from __future__ import annotations

import sys
from pathlib import Path

from elastilab.analysis import figures
from elastilab.cli.args import HelpFormatter
from elastilab.data import ROOT


def cmd_figures(args) -> int:

    import matplotlib
    matplotlib.use("Agg")
    if args.check:
        bad = figures.stale(args.results, args.results)
        for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
            bad += figures.stale_in_notebook(nb, args.results)
        print("\n".join(bad) or "every committed figure is current", file=sys.stderr if bad else sys.stdout)
        return 1 if bad else 0
    for path in figures.write(args.out, args.results, args.only):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    """``elastilab figures``."""
    p = sub.add_parser("figures", formatter_class=HelpFormatter,
                       help="draw the committed figures from the committed results, or check that they are current",
                       description="Every figure the repository commits, drawn by the library from the CSVs in "
                                   "--results: benchmarks/results/NAME.png and the notebooks' figures.show(NAME).")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="write NAME.png of every figure into this folder "
                      "(`--out benchmarks/results` refreshes the committed ones)")
    mode.add_argument("--check", action="store_true", help="exit 1, naming them, when committed images in "
                      "--results or in notebooks/*.ipynb differ from what the current code draws")
    p.add_argument("--results", type=Path, default=figures.RESULTS, help="the folder of committed result CSVs")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these figures only (with --out)")
    p.set_defaults(func=cmd_figures)
