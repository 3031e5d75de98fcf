"""``elastilab frontier --allocate-model DATA --recommend``: the recommended point per target quality of the
whole-model knob, chosen on the calibration data (``core.recommend``) and then measured on the held-out data
the frontier reports, both printed and written to ``--out``/recommended.csv; the routers saved into ``--out``
carry the recommendation (routers.json "recommended")."""
from __future__ import annotations

import sys


def recommend_points(args, em, task, calibration, scorer: str):
    """Choose on ``calibration``, measure the chosen points on ``task`` (held out); returns the table."""
    import pandas as pd

    from elastilab.core.recommend import evaluate_levels, recommend
    chosen_on = f"{args.allocate_model} ({'train split' if calibration_is_domain(args) else 'all'})"
    rec, rows = recommend(em, calibration, targets=args.targets, scorer=scorer, data=chosen_on,
                          step=args.recommend_step)
    held = {r["compute"]: r for r in evaluate_levels(em, task, sorted({1.0, *(p["compute"] for p in rec.values())},
                                                                      reverse=True), scorer)}
    out = []
    for key, p in rec.items():
        h = held[p["compute"]]
        p["held_out_quality"], p["held_out_model_compute"] = h["quality"], h["model_compute"]
        out.append({"target": key, "compute": p["compute"], "metric": p["metric"],
                    "calibration_quality": p["quality"], "calibration_dense_quality": p["dense_quality"],
                    "held_out_quality": h["quality"], "held_out_dense_quality": held[1.0]["quality"],
                    "model_compute": h["model_compute"], "levels": p["levels"], "chosen_on": chosen_on})
    table = pd.DataFrame(out)
    table.insert(0, "model", str(args.model))
    for k, v in provenance(args).items():
        table[k] = v
    print(f"recommended points (chosen among {len(rows)} compute levels on {chosen_on}, measured compute):",
          file=sys.stderr)
    print(table.drop(columns=["model", "chosen_on", "reported_on", "command", "date", "machine", "torch"]).round(4)
          .to_string(index=False), file=sys.stderr)
    if args.out is not None:
        from elastilab.files import atomic_write
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "recommended.csv", lambda f: table.to_csv(f, index=False))
    return table


def provenance(args) -> dict:
    """What the committed result tables record with each row: the command, date, machine and torch."""
    import datetime
    import platform

    import torch

    from elastilab.cli.args import command_line
    return {"reported_on": f"{args.domain or args.text or args.images} (held out)", "command": command_line(args),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}


def calibration_is_domain(args) -> bool:
    from pathlib import Path
    return not Path(args.allocate_model).exists()


def add_options(f, standalone: bool = False) -> None:
    """--recommend (frontier only), --targets and --recommend-step."""
    if not standalone:
        f.add_argument("--recommend", action="store_true",
                       help="--allocate-model: choose, per --targets quality factor, the least measured whole-model "
                            "compute meeting it on the calibration data, report it on the held-out data and save it "
                            "with the routers into --out (em.set_compute('x1.05') uses it)")
    f.add_argument("--targets", type=lambda s: tuple(float(x) for x in s.split(",")), default=(1.01, 1.05),
                   help="--recommend: quality factors on the dense model's quality (comma-separated, >= 1)")
    f.add_argument("--recommend-step", type=float, default=0.01,
                   help="--recommend: the compute levels tried, 1 - k * step down to the schedule's least")


def cmd_recommend(args) -> int:
    """``elastilab recommend``: the recommended points of routers that hold a whole-model schedule, chosen again
    on other calibration data (the schedule stays), measured on held-out data, saved with the routers in --out."""
    from elastilab.cli.frontier import build
    from elastilab.cli.main import parser
    opts = parser().parse_args(["frontier"])  # what build() reads beyond this command's options: the defaults
    vars(opts).update(vars(args))
    opts.allocate, opts.allocate_model, opts.scorers = None, args.calibration, ("learned",)
    em, task, _, calibration = build(opts)
    if not em.elastic_config.model_allocation:
        raise ValueError(f"{args.routers} holds no whole-model schedule: make one with elastilab frontier "
                         "--allocate-model DATA (--recommend) first")
    recommend_points(opts, em, task, calibration, "learned")
    if args.out is not None:
        from elastilab.cli.args import command_line
        em.save_routers(args.out / "routers", command=command_line(args), recommended_on=args.calibration,
                        source=str(args.routers))
        print(f"wrote {args.out}/routers (the routers, their schedule and the new recommended points)",
              file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    """``elastilab recommend``."""
    from pathlib import Path

    from elastilab.cli.args import HelpFormatter, positive_int
    r = sub.add_parser("recommend", formatter_class=HelpFormatter,
                       help="choose the recommended points of routers with a whole-model schedule on other "
                            "calibration data, and measure them on held-out data")
    r.add_argument("--model", default="smollm2-135m", help="as for frontier (a language or vision model)")
    r.add_argument("--routers", type=Path, required=True, help="routers holding a whole-model schedule")
    r.add_argument("--calibration", required=True, metavar="DOMAIN_OR_PATH",
                   help="where the points are chosen: a shipped domain's train split, a text file or an image folder "
                        "(never the data reported)")
    r.add_argument("--calibration-blocks", type=positive_int, default=8, help="text blocks of the calibration data")
    r.add_argument("--calibration-images", type=positive_int, default=128, help="images of the calibration data")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, help="held-out text file (language models)")
    src.add_argument("--images", type=Path, help="held-out image folder (vision models)")
    src.add_argument("--domain", help="a shipped domain's held-out part: licenses, pydocs; digits, photos, ...")
    r.add_argument("--blocks", type=positive_int, default=8, help="held-out blocks of text")
    r.add_argument("--seq-len", type=positive_int, default=128, help="tokens per block (text)")
    r.add_argument("--split", choices=("train", "eval", "all"), default="eval", help="part of the held-out text")
    r.add_argument("--n-images", type=positive_int, default=64, help="held-out images (vision)")
    r.add_argument("--size", type=positive_int, default=112, help="image side in pixels (a multiple of 14)")
    add_options(r, standalone=True)
    r.add_argument("--out", type=Path, help="folder for recommended.csv and the routers with the points")
    r.set_defaults(func=cmd_recommend)
