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


def add_options(f) -> None:
    f.add_argument("--recommend", action="store_true",
                   help="--allocate-model: choose, per --targets quality factor, the least measured whole-model "
                        "compute meeting it on the calibration data, report it on the held-out data and save it "
                        "with the routers into --out (em.set_compute('x1.05') uses it)")
    f.add_argument("--targets", type=lambda s: tuple(float(x) for x in s.split(",")), default=(1.01, 1.05),
                   help="--recommend: quality factors on the dense model's quality (comma-separated, >= 1)")
    f.add_argument("--recommend-step", type=float, default=0.01,
                   help="--recommend: the compute levels tried, 1 - k * step down to the schedule's least")
