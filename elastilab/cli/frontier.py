"""``elastilab frontier`` and ``elastilab report``: the quality frontier of any model on any data, and
the result tables of docs/RESULTS.md (``analysis.report``), generated from the committed frontier CSVs.

    elastilab frontier --routers data/routers/smollm2-135m --domain licenses --out runs/f1
    elastilab frontier --model HuggingFaceTB/SmolLM2-360M --text my.txt --scorers random,oracle,magnitude
    elastilab frontier --model dinov2-small --images my_photos/ --json
    elastilab frontier --model tiny-llava --routers data/routers/tiny-llava-visual --domain scenes --n-images 400
    elastilab report --results benchmarks/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

from elastilab.analysis.report import report, update_block
from elastilab.cli.args import HelpFormatter, capacities, command_line, default_of, int_at_least, names, positive_int
from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS, VISUAL_COMPONENTS
from elastilab.data import ROOT, read_images
from elastilab.zoo import VISION_MODELS, VLM_MODELS


def modality(args) -> str:
    if args.model in VLM_MODELS:
        return "vision-language"
    config = Path(str(args.model)) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") in ("llava", "smolvlm", "idefics3"):
        raise ValueError(f"{args.model} holds a visual-language model: the vision-language frontier runs on "
                         f"tiny-llava's own image questions only (--model {VLM_MODELS[0]}); elastify this one in "
                         "Python (el.elastify(model, visual_tokens=...)), or run the frontier on its tower or LM")
    if args.model in VISION_MODELS or args.images is not None:
        return "vision"
    return "language"


def _elastic(model, args, components, extra=None):
    from elastilab.core.config import ElasticConfig
    from elastilab.core.loading import load_routers
    from elastilab.core.model import elastify
    if args.routers:  # components without routers (mlp_units) join the checkpoint's at capacity 1.0
        return load_routers(model, args.routers, add_components=[c for c in components if c in GATED_COMPONENTS])
    if "learned" in args.scorers:
        raise ValueError("the 'learned' scorer needs --routers DIR; without routers use random, oracle and "
                         "the training-free scorers")
    return elastify(model, ElasticConfig(**{c: 1.0 for c in components}, n_experts=args.n_experts, **(extra or {})))


def build(args):
    """(elastic model, task, components, calibration task or None) for the command's model and data.
    The calibration task is what ``--allocate`` measures the layers' costs on: a domain's train split,
    a text file or an image folder (never the data the frontier reports)."""
    kind = modality(args)
    comps = args.components or LAYER_COMPONENTS
    if kind == "language":
        return _language(args, comps)
    if args.calibrate:
        raise ValueError("--calibrate fits the unit predictors of language models (--model smollm2-135m, ...)")
    if kind == "vision":
        return _vision(args, comps)
    if args.allocate or args.allocate_model:
        raise ValueError("--allocate and --allocate-model spread a layer component's budget across layers; "
                         "tiny-llava's visual_tokens are chosen once, before the language model")
    from elastilab.analysis import frontier as fr
    from elastilab.tasks import vlm
    from elastilab.zoo import tiny_llava
    if args.images is not None or args.text is not None or args.domain not in (None, "digits", "scenes"):
        raise ValueError("tiny-llava takes --domain digits (held-out digit and face questions, the default) or "
                         "--domain scenes (held-out synthetic scenes, --n-images of them)")
    model, tok = tiny_llava.load()
    if args.domain == "scenes":
        items, feats = vlm.tiny_llava_data(model, tok, "test", tasks="scenes", scenes=args.n_images)
    else:
        items, feats = vlm.tiny_llava_data(model, tok, "test", args.per_class, args.faces)
    comps = args.components or VISUAL_COMPONENTS
    return _elastic(model, args, comps), fr.VLMTask(tok, items, feats), comps, None


def _language(args, comps):
    """build() for a causal LM: held-out token blocks of --text / --domain, calibration blocks for --allocate."""
    from elastilab import data, zoo
    from elastilab.analysis import frontier as fr
    if args.images is not None:
        raise ValueError("--images needs a vision model (--model dinov2-small or a ViT folder)")
    model, tok = zoo.load(args.model)
    if not args.components:  # every component the family supports (OLMo 2 has no attn_heads)
        from elastilab.adapters import find_adapter
        comps = [c for c in comps if c in find_adapter(model).components]
    text = data.text_file(args.text) if args.text else data.text(args.domain or "licenses")
    blocks = data.token_blocks(tok, text, args.seq_len, split=args.split)[: args.blocks]
    calibration = None
    if cal := args.allocate or args.allocate_model:
        src = Path(cal)
        text, split = (data.text_file(src), "all") if src.is_file() else (data.text(cal), "train")
        calibration = fr.LMTask(data.token_blocks(tok, text, args.seq_len, split=split)[:args.calibration_blocks])
    em = _elastic(model, args, comps)
    if args.calibrate:
        _fit_unit_predictors(em, tok, args)
    return em, fr.LMTask(blocks), comps, calibration


def _vision(args, comps):
    """build() for a vision tower: --images or a domain's test images (with the shipped probe for DINOv2)."""
    from elastilab.analysis import frontier as fr
    from elastilab.tasks import vit as vision
    from elastilab.zoo import dinov2, pretrained
    if args.text is not None:
        raise ValueError("--text needs a language model; vision models take --images DIR or --domain")
    if args.model in VISION_MODELS:
        model, probe = dinov2.load_hf(), dinov2.load_probe()
    else:
        from transformers import AutoModel
        model, probe = pretrained(AutoModel, args.model), None
    if args.images is not None:
        images, labels = read_images(args.images, args.n_images), None
    else:
        images, labels = vision.domain(args.domain or "digits", "test", args.n_images)
    em = _elastic(model, args, comps)
    if args.skipped_tokens:  # else the routers' own setting (drop for fresh ones)
        em.set_skipped_tokens(args.skipped_tokens)
    calibration = None
    if src_name := args.allocate or args.allocate_model:
        src = Path(src_name)
        n = args.calibration_images
        cal = read_images(src, n) if src.is_dir() else vision.domain(src_name, "train", n)[0]
        calibration = fr.ViTTask(vision.pixels(cal, args.size), probe=probe)
    return em, fr.ViTTask(vision.pixels(images, args.size), labels, probe), comps, calibration


def _fit_unit_predictors(em, tok, args) -> None:
    """--calibrate: fit the gate predictors of the lowrank_gate and two_stage scorers on calibration text
    (a shipped domain's train split or a text file), never on the blocks the frontier reports."""
    from elastilab import data
    from elastilab.scorers.unit_choice import fit_unit_predictors
    src = Path(args.calibrate)
    text, split = (data.text_file(src), "all") if src.is_file() else (data.text(args.calibrate), "train")
    fit = fit_unit_predictors(em, data.token_blocks(tok, text, args.seq_len, split=split)[:16])
    print(f"unit predictors fitted on {args.calibrate} ({split}): rank {fit['rank']}, "
          f"R^2 of the gate {fit['r2']:.3f}", file=sys.stderr)


def cmd_frontier(args) -> int:
    import torch

    from elastilab.analysis import frontier as fr
    torch.manual_seed(0)
    if args.allocate and args.allocate_model:
        raise ValueError("give --allocate (a budget per component) or --allocate-model (one for the whole model), "
                         "not both")
    if args.recommend and not args.allocate_model:
        raise ValueError("--recommend chooses points of the whole-model knob: give --allocate-model DATA with it")
    em, task, comps, calibration = build(args)
    run = lambda: fr.frontier(em, task, components=comps, capacities=args.capacities, scorers=args.scorers,
                              progress=not args.json)
    if args.allocate:
        df = _allocated_frontier(args, em, comps, calibration, run)
    elif args.allocate_model:
        df = _model_frontier(args, em, task, calibration, run)
    else:
        df = run()
    meta = {"command": command_line(args), "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "metric": df.attrs["metric"], "skipped": [f"{s} x {c}" for s, c in df.attrs["skipped"]]}
    for k in ("command", "date", "machine", "torch"):
        df[k] = meta[k]
    summary = fr.frontier_summary(df)
    if args.allocate_model and "ppl_ratio" in df:  # whole-model savings within x1.01 and x1.05 of each line
        from elastilab.analysis.model_frontier import model_savings
        summary = model_savings(df)
    if args.out is not None:
        _write(args, df, summary, task, meta["command"])
    if args.json:
        print(json.dumps({**meta, "rows": df.drop(columns=["command", "date", "machine", "torch"]).to_dict("records")},
                         indent=1, default=float))
    else:
        print(summary.round(4).to_string(index=False))
    return 0


def _allocated_frontier(args, em, comps, calibration, run):
    """--allocate: the frontier with one capacity per layer, then with each component's budget allocated
    across layers on the calibration data; the routers are saved with their allocation into --out."""
    from elastilab.core.budget import allocate
    em.set_allocation(**{c: () for c in em.elastic_config.allocation})  # first: one capacity per layer
    uniform = run()
    for comp in comps:
        if comp in LAYER_COMPONENTS + GATED_COMPONENTS:
            # the layers' costs as the routers (or mlp_units' gate) choose, else as the oracle does
            allocate(em, comp, calibration, scorer="learned" if args.routers or comp in GATED_COMPONENTS
                     else "oracle", progress=not args.json)
    return _joined_and_saved(args, em, uniform, run(), args.allocate, "allocation across layers")


def _joined_and_saved(args, em, first, second, allocated_on, what: str):
    """The two frontiers in one table; with --out and --routers the allocation travels with the routers it
    was measured for."""
    import pandas as pd
    df = pd.concat([first, second], ignore_index=True)
    df.attrs.update(first.attrs)
    if args.out is not None and args.routers:
        em.save_routers(args.out / "routers", command=command_line(args), allocated_on=allocated_on,
                        source=str(args.routers))
        print(f"wrote {args.out}/routers (the routers with their {what})", file=sys.stderr)
    return df


def _write(args, df, summary, task, command: str) -> None:
    """frontier.csv, summary.csv, frontier.png (and per_item.csv for VLMs) into --out."""
    from elastilab.analysis import frontier as fr
    from elastilab.files import atomic_write
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "frontier.csv", lambda f: df.to_csv(f, index=False))
    atomic_write(args.out / "summary.csv", lambda f: summary.to_csv(f, index=False))
    if getattr(task, "records", None):  # VLMs: per-question hits, for paired comparisons between scorers
        atomic_write(args.out / "per_item.csv", lambda f: task.per_item_table().to_csv(f, index=False))
    if args.allocate_model and "ppl_ratio" in df:  # (perplexity ratios: language models)
        from elastilab.analysis.model_frontier import plot_model_frontier
        fig = plot_model_frontier(df, title=command[:110])
    else:
        fig = fr.plot_frontier(df, title=command[:90])
    atomic_write(args.out / "frontier.png", lambda f: fig.savefig(f, dpi=110, format="png"))
    print(f"wrote {args.out}/frontier.csv, summary.csv, frontier.png"
          + (", per_item.csv" if getattr(task, "records", None) else ""), file=sys.stderr)


def _model_frontier(args, em, task, calibration, run):
    """--allocate-model: the single-component frontier, then the global budget's lines (model_frontier)."""
    from elastilab.analysis.model_frontier import model_frontier
    single = run()
    chooser = "learned" if args.routers else "magnitude"  # without routers: the training-free scorer
    rows = model_frontier(em, task, calibration, chooser=chooser, oracle="oracle", computes=args.computes,
                          levels=args.levels, cache=args.out, progress=not args.json,
                          oracle_schedule=args.oracle_schedule)
    if args.recommend:  # chosen on the calibration data, measured on the held-out data, saved with the routers
        from elastilab.cli.recommend import recommend_points
        recommend_points(args, em, task, calibration, chooser)
    return _joined_and_saved(args, em, single, rows, args.allocate_model, "whole-model schedule")


def cmd_report(args) -> int:
    text = report(args.results)
    if args.update is None:
        print(text, end="")
        return 0
    update_block(args.update, text)
    print(f"updated the report block of {args.update}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    """``elastilab frontier | report``."""
    _add_frontier(sub)
    _add_report(sub)


def _add_frontier(sub) -> None:
    from elastilab.analysis.frontier import frontier
    from elastilab.core.config import ElasticConfig
    f = sub.add_parser("frontier", help="quality vs measured compute for every selection method",
                       formatter_class=HelpFormatter)
    f.add_argument("--model", default="smollm2-135m",
                   help="an offline zoo model (smollm2-135m, gemma3-270m, dinov2-small, tiny-llava), or a Hugging "
                        "Face id / folder (a causal LM or a vision tower of a supported family)")
    f.add_argument("--routers", type=Path, help="trained routers (needed for the 'learned' scorer)")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, help="any UTF-8 text file (language models)")
    src.add_argument("--images", type=Path, help="any folder of images (vision models)")
    src.add_argument("--domain", help="a shipped domain: licenses, pydocs (text); digits, digits04, digits59, photos "
                                      "(images); digits (digits and faces) or scenes (tiny-llava)")
    f.add_argument("--components", type=names, help="comma-separated; default: every elastic component")
    f.add_argument("--capacities", type=capacities, default=default_of(frontier, "capacities"), help="comma-separated")
    f.add_argument("--scorers", type=names, default=None,
                   help="comma-separated (learned, random, oracle, taylor, magnitude, attention_received, "
                        "cls_attention, fastv, tome, lowrank_gate, two_stage); default: all, 'learned' only "
                        "with --routers")
    f.add_argument("--seq-len", type=int_at_least(2), default=128, help="tokens per block (text)")
    f.add_argument("--blocks", type=positive_int, default=8, help="held-out blocks of text")
    f.add_argument("--split", choices=("train", "eval", "all"), default="eval",
                   help="part of the text: eval = the last 10%%, train = the first 90%%")
    f.add_argument("--n-images", type=positive_int, default=64,
                   help="images (vision; tiny-llava --domain scenes: held-out scenes, one question each)")
    f.add_argument("--size", type=positive_int, default=112, help="image side in pixels (a multiple of 14)")
    f.add_argument("--per-class", type=positive_int, default=6, help="tiny-llava: digit questions per class")
    f.add_argument("--faces", type=positive_int, default=20, help="tiny-llava: face questions per answer")
    f.add_argument("--n-experts", type=positive_int, default=default_of(ElasticConfig, "n_experts"),
                   help="MLP slices when no routers are given")
    f.add_argument("--skipped-tokens", choices=("drop", "merge"),
                   help="vision models: what a skipped token receives (nothing, or its nearest kept token's "
                        "output); default: what the --routers were trained with, else drop")
    _allocation_options(f)
    f.add_argument("--calibrate", metavar="DOMAIN_OR_PATH",
                   help="fit the gate predictors of the lowrank_gate and two_stage scorers (mlp_units) on this "
                        "calibration text (a shipped domain's train split or a text file; never the data "
                        "reported); without it they use the weights' SVD")
    f.add_argument("--out", type=Path,
                   help="folder for frontier.csv, summary.csv and frontier.png (else nothing is written)")
    f.add_argument("--json", action="store_true", help="print the rows as JSON")
    f.set_defaults(func=_run_frontier)


def _allocation_options(f) -> None:
    """--allocate and --allocate-model: budgets spread across layers (and components), measured on calibration data."""
    from elastilab.analysis.model_frontier import COMPUTES
    f.add_argument("--allocate", metavar="DOMAIN_OR_PATH",
                   help="also trace each component with its compute budget allocated across layers, measured on "
                        "this calibration data (a shipped domain's train split, a text file or an image folder; "
                        "never the data reported)")
    f.add_argument("--allocate-model", metavar="DOMAIN_OR_PATH",
                   help="trace one compute knob for the whole model: a budget over every component and layer "
                        "(el.allocate(em, task, budget='model')) measured on this calibration data, as the routers "
                        "(or, without --routers, the magnitude scorer) choose and as the oracle does, next to the "
                        "single-component points; x axis: whole-model measured compute")
    f.add_argument("--computes", type=capacities, default=COMPUTES,
                   help="--allocate-model: the whole-model compute targets (fractions of the dense FLOPs)")
    f.add_argument("--levels", type=capacities, default=None,
                   help="--allocate-model: the capacities each cut is measured at (nearest k/H for heads); "
                        "default: multiples of 0.125 down to 0.25")
    f.add_argument("--oracle-schedule", action=argparse.BooleanOptionalAction, default=True,
                   help="--allocate-model: also allocate with the oracle's own costs (a second calibration pass) "
                        "besides the oracle choosing under the routers' schedule")
    f.add_argument("--calibration-blocks", type=positive_int, default=4,
                   help="text blocks of the --allocate / --allocate-model calibration data")
    f.add_argument("--calibration-images", type=positive_int, default=32,
                   help="images of the --allocate / --allocate-model calibration data (vision models)")
    from elastilab.cli.recommend import add_options
    add_options(f)


def _add_report(sub) -> None:
    r = sub.add_parser("report", help="the result tables of docs/RESULTS.md from the committed CSVs",
                       formatter_class=HelpFormatter)
    r.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="folder of frontier CSVs")
    r.add_argument("--update", type=Path, metavar="MARKDOWN",
                   help="rewrite the <!-- report:start --> ... <!-- report:end --> block of this file (e.g. "
                        "docs/RESULTS.md) instead of printing")
    r.set_defaults(func=cmd_report)


def _run_frontier(args) -> int:
    from elastilab.scorers import SCORERS
    if args.scorers is None:
        args.scorers = (("learned",) if args.routers else ()) + tuple(SCORERS)
    return cmd_frontier(args)
