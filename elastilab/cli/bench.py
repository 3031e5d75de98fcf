"""``elastilab bench speed | mlp | profile``: the command line of the speed benchmarks (``bench``), and
``profile``, the operator self-times behind ``bench profile``. Results go where ``--out`` says.

    elastilab bench speed --out runs/speed       # SmolLM2 on this machine -> runs/speed/speed_cpu.{csv,png}
    elastilab bench mlp --backends torch triton --out runs/mlp
    elastilab bench profile --component attn_heads --shape 2x256
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from elastilab.analysis import bench, timing
from elastilab.cli.args import HelpFormatter, capacities, capacity, command_line, default_of, positive_int
from elastilab.core.config import LAYER_COMPONENTS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the commands' default (the functions' is cpu)


def profile(model: str = "smollm2-135m", component: str = "attn_heads", capacity: float = 0.5, shape: str = "2x256",
            device: str = "cpu", top: int = 15, n_experts: int = 8, heads: str = "grouped") -> pd.DataFrame:
    """Self time per operator of one routed forward (torch.profiler), largest first, with the
    dense forward's times alongside for comparison."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import elastilab as el
    from elastilab.core.routing import RoutedAttention
    B, T, _ = bench.parse_shape(shape)
    net, vocab = bench.load_model(model, device)
    em = el.elastify(net, el.ElasticConfig(**{c: 1.0 for c in LAYER_COMPONENTS}, n_experts=n_experts))
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    em.set_capacity(**bench._capacities(component, capacity))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])

    def self_times(fn) -> pd.Series:
        with torch.no_grad():
            fn()  # warm-up
            with torch_profile(activities=acts) as prof:
                fn()
        ev = prof.key_averages()
        return pd.DataFrame([{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                             for e in ev]).set_index("op")

    try:
        RoutedAttention.head_attention = staticmethod(bench.HEAD_IMPLS[heads])
        routed = self_times(lambda: net(ids))
        dense = self_times(lambda: bench._dense_once(em, net, ids))
    finally:
        RoutedAttention.head_attention = staticmethod(bench.HEAD_IMPLS["grouped"])
        em.unelastify()
    table = routed.join(dense, rsuffix="_dense", how="outer").fillna(0).sort_values("ms", ascending=False)
    total = table.sum().to_frame("TOTAL").T
    return pd.concat([table.head(top), total])


def _threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_speed(args) -> int:
    _threads(args)
    info = {**bench.machine(), "model": args.model, "command": command_line(args)}
    df = bench.speed(args.model, args.shape, args.capacities, args.components, args.backends, args.reps, args.warmup,
                     args.device, args.dtype, args.n_experts, heads=args.heads)
    info["load_end"] = timing.load_average()
    name = args.name or f"speed_{timing.device_kind(args.device)}" + ("" if args.model == "smollm2-135m"
                                                                       else f"_{args.model}")
    path = bench.write(df, args.out, name, info)
    bench.plot_speed(df, f"{args.model} {args.dtype} on {info['cpu'] if info['gpu'] == 'none' else info['gpu']}, "
                         f"{info['threads']} threads, {info['date'][:10]}", args.out / f"{name}.png")
    print(bench._summary(df))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def cmd_mlp(args) -> int:
    _threads(args)
    info = {**bench.machine(), "command": command_line(args)}
    df = bench.mlp_speed(args.dims, args.rows, args.capacities, args.backends, args.n_experts, args.reps, args.warmup,
                         args.device, args.dtype)
    name = args.name or (f"mlp_{timing.device_kind(args.device)}"
                         + ("" if args.dims == "smollm2-135m" else f"_{args.dims}"))
    path = bench.write(df, args.out, name, info)
    print(df[["component", "capacity", "backend", "rows", "dense_s", "routed_s", "speedup", "ideal_speedup",
              "realised"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {path}")
    return 0


def cmd_decode(args) -> int:
    from elastilab.analysis import bench_decode
    from elastilab.cli.args import load_lm
    torch.set_num_threads(args.threads)  # pinned: one setting for every configuration of the run
    model, tok = load_lm(args.model)
    em = bench_decode.elastic_model(model, args.point or [], args.routers)
    info = {**bench.machine(), "model": args.model, "routers": args.routers, "command": command_line(args),
            "load_start": timing.load_average()}
    df = bench_decode.decode_speed(em, tok, args.point or [], args.batches, args.prompt_len, args.new_tokens,
                                   args.prefill, args.reps, args.warmup, args.domain, args.quality_blocks,
                                   args.seq_len)
    info["load_end"] = timing.load_average()
    path = bench.write(df, args.out, args.name, info)
    bench_decode.plot_decode(df, f"{args.model} on {info['cpu']}, {info['threads']} thread(s), {info['date'][:10]}",
                             args.out / f"{args.name}.png")
    print(df[["point", "phase", "batch", "dense_tok_s", "routed_tok_s", "speedup", "ideal_speedup", "ppl_ratio",
              "model_compute", "teacher_tokens_matched"]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def _prefill_shape(text: str):
    if text == "none":
        return None
    return bench.parse_shape(text)[:2]


def cmd_profile(args) -> int:
    _threads(args)
    table = profile(args.model, args.component, args.capacity, args.shape, args.device, args.top, args.n_experts,
                    args.heads)
    print(table.to_string(float_format=lambda v: f"{v:.1f}"))
    return 0


def add_parsers(sub) -> None:
    """``elastilab bench speed | mlp | decode | profile``; defaults are those of the functions they run."""
    p = sub.add_parser("bench", help="speed benchmarks: dense vs routed time next to the ideal (FLOPs) speedup")
    bsub = p.add_subparsers(dest="bench", required=True)
    for add in (_add_speed, _add_mlp, _add_decode, _add_profile):
        add(bsub)


def _common(q, fn):
    """The options speed and mlp share (their defaults: fn's)."""
    q.add_argument("--device", default=DEVICE, help="where to run (cuda if available)")
    q.add_argument("--dtype", default=default_of(fn, "dtype"), choices=("float32", "bfloat16", "float16"),
                   help="weights and activations")
    q.add_argument("--n-experts", type=positive_int, default=default_of(fn, "n_experts"), help="MLP slices")
    q.add_argument("--reps", type=positive_int, default=default_of(fn, "reps"),
                   help="timed rounds (medians are reported)")
    q.add_argument("--warmup", type=int, default=default_of(fn, "warmup"), help="untimed rounds first")
    q.add_argument("--backends", nargs="+", default=["auto"], choices=("auto", "torch", "triton"),
                   help="MLP kernels to compare (auto: Triton on CUDA, else torch; triton needs CUDA)")
    q.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    q.add_argument("--out", type=Path, required=True,
                   help=f"folder for the CSV (and plot); the committed results are in {bench.RESULTS}/")
    q.add_argument("--name", help="file name stem (default: speed_ or mlp_, the device kind, and _MODEL "
                                  "unless smollm2-135m)")
    return q


def _add_speed(bsub) -> None:
    s = _common(bsub.add_parser("speed", help="whole-model forward time per component and capacity",
                                formatter_class=HelpFormatter), bench.speed)
    s.add_argument("--model", default=default_of(bench.speed, "model"), choices=bench.MODELS,
                   help="the offline SmolLM2, or a random-init Llama of these dims")
    s.add_argument("--shape", nargs="+", default=list(default_of(bench.speed, "shapes")),
                   help="BATCHxSEQ[:c1,c2] each; capacities after ':' override --capacities for that shape")
    s.add_argument("--capacities", type=capacities, default=default_of(bench.speed, "capacities"),
                   help="comma-separated")
    s.add_argument("--components", nargs="+", default=list(default_of(bench.speed, "components")),
                   choices=bench.COMPONENTS, help="routed one at a time (all: every one together)")
    s.add_argument("--heads", nargs="+", default=["grouped", "loop"], choices=("grouped", "loop"),
                   help="head-routing implementations: the library's, grouped by head "
                        "(elastilab_kernels.head_attention), and/or the plain loop over rows x heads")
    s.set_defaults(func=cmd_speed)


def _add_mlp(bsub) -> None:
    m = _common(bsub.add_parser("mlp", help="the MLP alone: dense vs token-routed vs expert-sliced",
                                formatter_class=HelpFormatter), bench.mlp_speed)
    m.add_argument("--dims", default=default_of(bench.mlp_speed, "dims"), choices=tuple(bench.MLP_DIMS),
                   help="(d, hidden) of this model's MLP")
    m.add_argument("--rows", type=positive_int, default=default_of(bench.mlp_speed, "rows"),
                   help="tokens through the MLP")
    m.add_argument("--capacities", type=capacities, default=default_of(bench.mlp_speed, "capacities"),
                   help="comma-separated")
    m.set_defaults(func=cmd_mlp)


def _add_decode(bsub) -> None:
    from elastilab.analysis.bench_decode import decode_speed
    from elastilab.analysis.generation_points import point_spec
    c = bsub.add_parser("decode", help="greedy decoding with the KV cache and a long prefill: dense vs operating "
                                       "points, with their held-out quality", formatter_class=HelpFormatter)
    c.add_argument("--model", default="smollm2-135m", help="a causal LM: an offline zoo name or a local folder")
    c.add_argument("--routers", type=Path, help="router checkpoint for points that name routed components")
    c.add_argument("--point", type=point_spec, action="append",
                   help="an operating point, e.g. mlp_units=0.75 or attn_heads=0.9,mlp_units=0.875, or compute=x1.05 "
                        "(the whole model at a recommended point of the routers; repeatable)")
    c.add_argument("--batches", type=positive_int, nargs="+", default=list(default_of(decode_speed, "batches")),
                   help="decode batch sizes")
    c.add_argument("--prompt-len", type=positive_int, default=default_of(decode_speed, "prompt_len"),
                   help="tokens of held-out text in each prompt")
    c.add_argument("--new-tokens", type=positive_int, default=default_of(decode_speed, "new_tokens"),
                   help="greedy tokens generated per prompt")
    c.add_argument("--prefill", type=_prefill_shape, default=default_of(decode_speed, "prefill"),
                   help="BATCHxSEQ of the prefill timed next to decoding, or none")
    c.add_argument("--reps", type=positive_int, default=default_of(decode_speed, "reps"),
                   help="timed rounds (medians)")
    c.add_argument("--warmup", type=int, default=default_of(decode_speed, "warmup"), help="untimed rounds first")
    c.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads, pinned for the whole run")
    c.add_argument("--domain", default=default_of(decode_speed, "domain"),
                   help="text whose held-out (eval) split gives the prompts and the quality blocks")
    c.add_argument("--quality-blocks", type=positive_int, default=default_of(decode_speed, "quality_blocks"),
                   help="held-out blocks for the perplexity ratio and measured compute")
    c.add_argument("--seq-len", type=positive_int, default=default_of(decode_speed, "seq_len"),
                   help="tokens per quality block")
    c.add_argument("--out", type=Path, required=True,
                   help=f"folder for the CSV and plot (committed: {bench.RESULTS}/)")
    c.add_argument("--name", default=f"decode_{timing.device_kind(DEVICE)}", help="file name stem")
    c.set_defaults(func=cmd_decode)


def _add_profile(bsub) -> None:
    f = bsub.add_parser("profile", help="operator self-times of one routed forward vs the dense one",
                        formatter_class=HelpFormatter)
    f.add_argument("--model", default=default_of(profile, "model"), choices=bench.MODELS, help="as for speed")
    f.add_argument("--component", default=default_of(profile, "component"), choices=bench.COMPONENTS,
                   help="the routed one")
    f.add_argument("--capacity", type=capacity, default=default_of(profile, "capacity"), help="its capacity")
    f.add_argument("--shape", default=default_of(profile, "shape"), help="BATCHxSEQ")
    f.add_argument("--device", default=DEVICE, help="where to run (cuda if available)")
    f.add_argument("--n-experts", type=positive_int, default=default_of(profile, "n_experts"), help="MLP slices")
    f.add_argument("--top", type=positive_int, default=default_of(profile, "top"), help="operators listed")
    f.add_argument("--heads", default=default_of(profile, "heads"), choices=("grouped", "loop"),
                   help="head-routing implementation")
    f.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    f.set_defaults(func=cmd_profile)
