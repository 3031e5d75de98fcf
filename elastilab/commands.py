"""``elastilab frontier`` and ``elastilab report``: the quality frontier of any model on any data, and
the README's result tables, generated from the committed frontier CSVs.

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

from .cli_args import HelpFormatter, capacities, default_of, int_at_least, names, positive_int
from .config import GATED_COMPONENTS, LAYER_COMPONENTS


VISION_MODELS, VLM_MODELS = ("dinov2-small",), ("tiny-llava",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: (modality, file) of each README frontier table; a "-budget" run holds uniform and budget rows
REPORT_FILES = {"language": "frontier-smollm2-135m.csv", "language, budget across layers": "frontier-smollm2-135m-budget.csv",
                "language, 64 MLP slices": "frontier-smollm2-135m-mlp64.csv",
                "language, single MLP units (CATS)": "frontier-smollm2-135m-units.csv",
                "language, attention heads: oracle warm start, budget, 40 distillation steps (smollm2-135m-heads)": "frontier-smollm2-135m-heads.csv",
                "language, Gemma 3 270M, single MLP units (CATS)": "frontier-gemma3-270m-units.csv",
                "language, Gemma 3 270M, attention heads": "frontier-gemma3-270m-heads.csv",
                "language, Gemma 3 270M, MLP tokens": "frontier-gemma3-270m-mlp-tokens.csv",
                "language, Gemma 3 270M, attention tokens": "frontier-gemma3-270m-attn-tokens.csv",
                "vision": "frontier-dinov2-small.csv", "vision, budget across layers": "frontier-dinov2-small-budget.csv",
                "vision, single MLP units (CATS)": "frontier-dinov2-small-units.csv",
                "vision, token routers trained to merge": "frontier-dinov2-small-merge-trained.csv",
                "vision-language": "frontier-tiny-llava.csv",
                "vision-language, synthetic scenes": "frontier-tiny-llava-scenes.csv"}


def modality(args) -> str:
    if args.model in VLM_MODELS:
        return "vision-language"
    if args.model in VISION_MODELS or args.images is not None:
        return "vision"
    return "language"


def read_images(folder: Path, limit: int) -> list:
    """uint8 arrays of the images in a folder (sorted by name, at most ``limit``)."""
    import numpy as np
    from PIL import Image
    if not folder.is_dir():
        raise ValueError(f"--images must be a folder of images, got {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [np.asarray(Image.open(p).convert("RGB")) for p in files]


def _elastic(model, args, components, extra=None):
    from .config import ElasticConfig
    from .elastic import elastify
    from .loading import load_routers
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
    from . import quality as fr
    kind = modality(args)
    comps = args.components or LAYER_COMPONENTS
    if kind == "language":
        from . import data, zoo
        if args.images is not None:
            raise ValueError("--images needs a vision model (--model dinov2-small or a ViT folder)")
        model, tok = zoo.load(args.model)
        if not args.components:  # every component the family supports (OLMo 2 has no attn_heads)
            from .adapters import find_adapter
            comps = [c for c in comps if c in find_adapter(model).components]
        text = data.text_file(args.text) if args.text else data.text(args.domain or "licenses")
        blocks = data.token_blocks(tok, text, args.seq_len, split=args.split)[: args.blocks]
        calibration = None
        if cal := args.allocate or args.allocate_model:
            src = Path(cal)
            text, split = (data.text_file(src), "all") if src.is_file() else (data.text(cal), "train")
            calibration = fr.LMTask(data.token_blocks(tok, text, args.seq_len, split=split)[:args.calibration_blocks])
        return _elastic(model, args, comps), fr.LMTask(blocks), comps, calibration
    if kind == "vision":
        from .tasks import vit as vision
        from .zoo import dinov2, pretrained
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
            cal = read_images(src, 32) if src.is_dir() else vision.domain(src_name, "train", 32)[0]
            calibration = fr.ViTTask(vision.pixels(cal, args.size), probe=probe)
        return em, fr.ViTTask(vision.pixels(images, args.size), labels, probe), comps, calibration
    if args.allocate or args.allocate_model:
        raise ValueError("--allocate and --allocate-model spread a layer component's budget across layers; "
                         "tiny-llava's visual_tokens are chosen once, before the language model")
    from .tasks import vlm
    from .zoo import tiny_llava
    if args.images is not None or args.text is not None or args.domain not in (None, "digits", "scenes"):
        raise ValueError("tiny-llava takes --domain digits (held-out digit and face questions, the default) or "
                         "--domain scenes (held-out synthetic scenes, --n-images of them)")
    model, tok = tiny_llava.load()
    if args.domain == "scenes":
        items, feats = vlm.tiny_llava_data(model, tok, "test", tasks="scenes", scenes=args.n_images)
    else:
        items, feats = vlm.tiny_llava_data(model, tok, "test", args.per_class, args.faces)
    comps = args.components or ("visual_tokens",)
    return _elastic(model, args, comps), fr.VLMTask(tok, items, feats), comps, None


def cmd_frontier(args) -> int:
    import torch

    from . import quality as fr
    torch.manual_seed(0)
    if args.allocate and args.allocate_model:
        raise ValueError("give --allocate (a budget per component) or --allocate-model (one for the whole model), "
                         "not both")
    em, task, comps, calibration = build(args)
    run = lambda: fr.frontier(em, task, components=comps, capacities=args.capacities, scorers=args.scorers,
                              progress=not args.json)
    if args.allocate:
        import pandas as pd

        from .budget import allocate
        em.set_allocation(**{c: () for c in em.elastic_config.allocation})  # first: one capacity per layer
        uniform = run()
        for comp in comps:
            if comp in LAYER_COMPONENTS + GATED_COMPONENTS:
                # the layers' costs as the routers (or mlp_units' gate) choose, else as the oracle does
                allocate(em, comp, calibration, scorer="learned" if args.routers or comp in GATED_COMPONENTS
                         else "oracle", progress=not args.json)
        df = pd.concat([uniform, run()], ignore_index=True)
        df.attrs.update(uniform.attrs)
        if args.out is not None and args.routers:  # the allocation travels with the routers it was measured for
            em.save_routers(args.out / "routers", command="elastilab " + " ".join(args.argv),
                            allocated_on=args.allocate, source=str(args.routers))
            print(f"wrote {args.out}/routers (the routers with their allocation across layers)", file=sys.stderr)
    elif args.allocate_model:
        df = _model_frontier(args, em, task, calibration, run)
    else:
        df = run()
    meta = {"command": "elastilab " + " ".join(args.argv), "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "metric": df.attrs["metric"], "skipped": [f"{s} x {c}" for s, c in df.attrs["skipped"]]}
    for k in ("command", "date", "machine", "torch"):
        df[k] = meta[k]
    summary = fr.frontier_summary(df)
    if args.allocate_model:  # whole-model savings within x1.01 and x1.05 of each line
        from .model_frontier import model_savings
        summary = model_savings(df)
    if args.out is not None:
        from .files import atomic_write
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "frontier.csv", lambda f: df.to_csv(f, index=False))
        atomic_write(args.out / "summary.csv", lambda f: summary.to_csv(f, index=False))
        if getattr(task, "records", None):  # VLMs: per-question hits, for paired comparisons between scorers
            atomic_write(args.out / "per_item.csv", lambda f: task.per_item_table().to_csv(f, index=False))
        if args.allocate_model:
            from .model_frontier import plot_model_frontier
            fig = plot_model_frontier(df, title=meta["command"][:110])
        else:
            fig = fr.plot_frontier(df, title=meta["command"][:90])
        atomic_write(args.out / "frontier.png", lambda f: fig.savefig(f, dpi=110, format="png"))
        print(f"wrote {args.out}/frontier.csv, summary.csv, frontier.png"
              + (", per_item.csv" if getattr(task, "records", None) else ""), file=sys.stderr)
    if args.json:
        print(json.dumps({**meta, "rows": df.drop(columns=["command", "date", "machine", "torch"]).to_dict("records")},
                         indent=1, default=float))
    else:
        print(summary.round(4).to_string(index=False))
    return 0


def _model_frontier(args, em, task, calibration, run):
    """--allocate-model: the single-component frontier, then the global budget's lines (model_frontier)."""
    import pandas as pd

    from .model_frontier import model_frontier
    single = run()
    chooser = "learned" if args.routers else "magnitude"  # without routers: the training-free scorer
    rows = model_frontier(em, task, calibration, chooser=chooser, oracle="oracle", computes=args.computes,
                          levels=args.levels, cache=args.out, progress=not args.json,
                          oracle_schedule=args.oracle_schedule)
    df = pd.concat([single, rows], ignore_index=True)
    df.attrs.update(single.attrs)
    if args.out is not None and args.routers:  # the schedule travels with the routers it was measured for
        em.save_routers(args.out / "routers", command="elastilab " + " ".join(args.argv),
                        allocated_on=args.allocate_model, source=str(args.routers))
        print(f"wrote {args.out}/routers (the routers with their whole-model schedule)", file=sys.stderr)
    return df


def report(results: Path) -> str:
    """The README's result tables (markdown), from the committed results in ``results``."""
    parts = [frontier_tables(results), keep_dense_table(results), speed_table(results), decode_table(results)]
    if not parts[0]:
        raise FileNotFoundError(f"no frontier results ({', '.join(REPORT_FILES.values())}) in {results}")
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _cell(value, name=None) -> str:
    import pandas as pd
    if value is None or pd.isna(value):
        return "–"
    return f"{value:.3f}" + (f" ({name})" if name else "")


def frontier_tables(results: Path) -> str:
    import pandas as pd

    from . import quality as fr
    out = []
    for name, file in REPORT_FILES.items():
        path = results / file
        if not path.exists():
            continue
        df = pd.read_csv(path)
        metric = {"language": "ppl_ratio", "vision": "agreement", "vision-language": "acc"}[name.split(",")[0]]
        summary = fr.frontier_summary(df, metric, higher_is_better=metric != "ppl_ratio")
        out += [f"**{name}: {metric.replace('_', ' ')}** (`{df.command.iloc[0]}`, {df.date.iloc[0]})", "",
                "| component | capacity | measured compute | random | learned | best training-free | "
                "best oracle | router efficiency |", "|---|---|---|---|---|---|---|---|"]
        for r in summary.itertuples():
            free = _cell(r.training_free, None if pd.isna(r.training_free) else
                         f"{r.best_training_free}, compute {r.training_free_compute:.2f}")
            orc = _cell(r.oracle, None if pd.isna(r.oracle) else r.best_oracle)
            eff = r.router_efficiency
            # outside [0, 1] the oracle is no ceiling there (a proxy that the learned router beats)
            eff = "–" if pd.isna(eff) else "> 1" if eff > 1 else "< 0" if eff < 0 else f"{eff:.2f}"
            budget = getattr(r, "allocation", "uniform") == "budget"
            label = f"{r.component}, budget across layers" if budget else r.component
            out.append(f"| {label} | {r.capacity:g} | {r.compute:.3f} | {_cell(r.random)} | "
                       f"{_cell(r.learned)} | {free} | {orc} | {eff} |")
        out.append("")
    return "\n".join(out)


def keep_dense_table(results: Path) -> str:
    import pandas as pd
    path = results / "lm_keep_dense.csv"
    if not path.exists():
        return ""
    df = pd.read_csv(path)
    out = ["**language: token routing in every layer vs layers 0, 1, 28, 29 kept dense** "
           "(`elastilab lm keep-dense --out DIR`, perplexity ratio at matched sub-layer compute)", "",
           "| eval domain | component | every layer: compute → ppl ratio | four layers dense: compute → ppl ratio |",
           "|---|---|---|---|"]
    for (domain, comp), g in df.groupby(["domain", "component"]):
        cells = []
        for kept in ("none", "0 1 -2 -1"):
            h = g[g.kept_dense == kept].sort_values("capacity", ascending=False)
            cells.append(" / ".join(f"{r.compute_fraction:.2f} → {r.ppl_ratio:.2f}" for r in h.itertuples()))
        out.append(f"| {domain} | {comp} | {cells[0]} | {cells[1]} |")
    return "\n".join(out) + "\n"


def speed_table(results: Path) -> str:
    import pandas as pd
    path = results / "speed_cpu.csv"
    if not path.exists():
        return ""
    df = pd.read_csv(path, comment="#")
    sel = df[(df.batch == df.batch.max()) & (df.seq == df.seq.max()) & (df.capacity == 0.5)
             & (df.backend == "auto") & (df.heads == "grouped")]
    if sel.empty:
        return ""
    r0 = sel.iloc[0]
    out = [f"**speed on this CPU** (`elastilab bench speed`, {r0['model']}, {r0['dtype']}, batch {r0.batch} × "
           f"{r0.seq} tokens, capacity 0.5, {r0.threads} threads)", "",
           "| routed | speedup | ideal (FLOPs) | realised |", "|---|---|---|---|"]
    for r in sel.itertuples():
        out.append(f"| {r.component} | {r.speedup:.2f}× | {r.ideal_speedup:.2f}× | {100 * r.realised:.0f}% |")
    return "\n".join(out) + "\n"


def decode_table(results: Path) -> str:
    """Decode and prefill speed of each operating point next to its held-out quality (``bench decode``)."""
    from .bench import read, read_info
    path = results / "decode_cpu.csv"
    if not path.exists():
        return ""
    df, info = read(path), read_info(path)
    phases = list(df[["phase", "batch", "tokens"]].drop_duplicates().itertuples(index=False, name=None))
    head = [f"decode batch {b}" if ph == "decode" else f"prefill {b}×{n // b}" for ph, b, n in phases]
    out = [f"**time where users feel it** (`{info['command']}`, {info['cpu']}, {info['threads']} thread(s), "
           f"{info['date'][:10]}): tokens/s and speedup over dense (ideal from measured FLOPs)", "",
           "| point | held-out ppl ratio | model compute | " + " | ".join(head) + " | teacher tokens kept (of "
           f"{int(df[df.phase == 'decode'].tokens.iloc[0] / df.batch.iloc[0]) + 1}) |",
           "|---|---|---|" + "---|" * len(head) + "---|"]
    for name, g in df.groupby("point", sort=False):
        cells = []
        for ph, b, _ in phases:
            r = g[(g.phase == ph) & (g.batch == b)].iloc[0]
            cells.append(f"{r.routed_tok_s:.1f}" if name == "dense" else
                         f"{r.routed_tok_s:.1f} ({r.speedup:.2f}×, ideal {r.ideal_speedup:.2f}×)")
        kept = g[(g.phase == "decode") & (g.batch == 1)].teacher_tokens_matched.iloc[0]
        out.append(f"| {name} | {g.ppl_ratio.iloc[0]:.3f} | {g.model_compute.iloc[0]:.3f} | " + " | ".join(cells)
                   + f" | {kept:g} |")
    return "\n".join(out) + "\n"


def cmd_report(args) -> int:
    print(report(args.results), end="")
    return 0


def add_parsers(sub) -> None:
    """``elastilab frontier | report``."""
    from .config import ElasticConfig
    from .model_frontier import COMPUTES
    from .quality import frontier
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
                        "cls_attention, fastv); default: all, 'learned' only with --routers")
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
    f.add_argument("--out", type=Path, help="folder for frontier.csv, summary.csv and frontier.png (else nothing is written)")
    f.add_argument("--json", action="store_true", help="print the rows as JSON")
    f.set_defaults(func=_run_frontier)
    r = sub.add_parser("report", help="the README's result tables from the frontier CSVs", formatter_class=HelpFormatter)
    r.add_argument("--results", type=Path, default=Path("benchmarks/results"), help="folder of frontier CSVs")
    r.set_defaults(func=cmd_report)


def _run_frontier(args) -> int:
    from .scorers import SCORERS
    if args.scorers is None:
        args.scorers = (("learned",) if args.routers else ()) + tuple(SCORERS)
    return cmd_frontier(args)
