"""``elastilab lm quality | keep-dense | attn-variants | threshold-modes``: the language-model experiments of
``analysis.lm_experiments`` on SmolLM2 and its shipped routers (or --model / --routers), printed, and written as
CSV only into --out:

    elastilab lm quality          [--out DIR]   -> lm_quality.csv
    elastilab lm keep-dense       [--out DIR]   -> lm_layer_damage.csv, lm_keep_dense.csv
    elastilab lm attn-variants    [--out DIR]   -> lm_attn_variants.csv
    elastilab lm threshold-modes  [--out DIR]   -> lm_threshold_modes.csv
    elastilab lm routing-map      [--out DIR]   -> lm_routing_map.csv (the README's picture)
"""
from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import pandas as pd
import torch

from elastilab.analysis import lm_experiments as lx
from elastilab.cli import args as ca


def _load(args):
    """(elastic model with routers, tokenizer): --model with --routers (default: the shipped ones)."""
    from elastilab import data
    from elastilab.core.loading import load_routers
    torch.manual_seed(0)
    model, tok = ca.load_lm(args.model)
    return load_routers(model, args.routers or data.data_dir() / "routers" / "smollm2-135m"), tok


def _blocks(tok, domain: str, args) -> torch.Tensor:
    from elastilab import data
    return data.token_blocks(tok, data.text(domain), args.seq_len, split="eval")[: args.blocks]


def _stamp(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(date=datetime.date.today().isoformat(), torch=torch.__version__,
                     machine=f"{platform.machine()}, {torch.get_num_threads()} threads")[
        [*df.columns, "date", "machine", "torch"]]


def _command(args) -> str:
    """The command line that reproduces this run (every option spelled out)."""
    opts = {k: v for k, v in vars(args).items()
            if k not in ("func", "command", "lm_command", "argv") and v is not None}
    text = lambda v: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
    return " ".join(["elastilab lm", args.lm_command,
                     *(f"--{k.replace('_', '-')} {text(v)}" for k, v in opts.items())])


def _emit(args, tables: dict[str, pd.DataFrame], show: pd.DataFrame) -> int:
    """Print ``show``; write each {file name: table} into --out only if given."""
    print(show.to_string())
    if args.out is not None:
        from elastilab.files import atomic_write
        for name, df in tables.items():
            atomic_write(args.out / name, lambda f, df=df: df.to_csv(f, index=False))
        print(f"wrote {', '.join(str(args.out / n) for n in tables)}", file=sys.stderr)
    return 0


def cmd_quality(args) -> int:
    from elastilab.data import text_domains
    em, tok = _load(args)
    domains = {d: _blocks(tok, d, args) for d in args.domains or text_domains()}
    learned = lx.quality_table(em, domains, args.capacities, "learned", progress=True)
    df = _stamp(pd.concat([learned, lx.quality_table(lx.untrained_like(em, args.seed), domains, args.capacities,
                                                     "random", progress=True)], ignore_index=True))
    return _emit(args, {"lm_quality.csv": df}, df.pivot_table(index=["domain", "component", "capacity"],
                 columns="routers", values=["ppl_ratio", "agreement"]).round(3))


def cmd_keep_dense(args) -> int:
    em, tok = _load(args)
    damage = lx.layer_damage(em, _blocks(tok, args.damage_domain, args)[:1], args.components, args.capacity)
    df = _stamp(lx.keep_dense_table(em, {d: _blocks(tok, d, args) for d in args.domains}, args.components,
                                    progress=True))
    print(damage.pivot(index="layer", columns="component", values="ppl_ratio").round(3).T.to_string())
    return _emit(args, {"lm_layer_damage.csv": damage, "lm_keep_dense.csv": df}, df.iloc[:, :7])


def cmd_attn_variants(args) -> int:
    em, tok = _load(args)
    df = _stamp(lx.attn_variants(em, _blocks(tok, args.domain, args), args.capacities, args.scorers, progress=True))
    return _emit(args, {"lm_attn_variants.csv": df}, df.iloc[:, :8])


def cmd_threshold_modes(args) -> int:
    em, tok = _load(args)
    df = lx.threshold_modes(em, _blocks(tok, args.domain, args), args.capacities, args.components, progress=True)
    df = _stamp(df.assign(command=_command(args)))
    return _emit(args, {"lm_threshold_modes.csv": df}, df.iloc[:, :5])


def cmd_routing_map(args) -> int:
    from elastilab.analysis import text_map
    em, tok = _load(args)
    ids = text_map.passage_ids(tok, args.domain, args.tokens)
    keep = lx.routing_map(em, ids, args.component, args.capacity)
    df = _stamp(text_map.routing_map_table(keep, text_map.pieces(tok, ids), component=args.component,
                                           capacity=args.capacity, command=_command(args)))
    return _emit(args, {"lm_routing_map.csv": df}, df.groupby("layer").kept.mean().round(3).to_frame().T)


def add_parsers(sub) -> None:
    """``elastilab lm quality | keep-dense | attn-variants | threshold-modes | routing-map``."""
    lm = sub.add_parser("lm", help="language-model experiments (SmolLM2 and its shipped routers by default)")
    cmds = lm.add_subparsers(dest="lm_command", required=True)

    def command(name, fn, help, blocks=8):
        p = cmds.add_parser(name, help=help, description=help, formatter_class=ca.HelpFormatter)
        p.add_argument("--model", default="smollm2-135m", help="a causal LM: offline name, Hugging Face id or folder")
        p.add_argument("--routers", type=Path,
                       help="routers for --model (default: the shipped data/routers/smollm2-135m)")
        if blocks:  # (routing-map reads one passage, not blocks)
            p.add_argument("--blocks", type=ca.int_at_least(1), default=blocks, help="held-out blocks per domain")
            p.add_argument("--seq-len", type=ca.int_at_least(2), default=128, help="tokens per block")
        p.add_argument("--out", type=Path, help="folder to write the CSV into (else it is only printed)")
        p.set_defaults(func=fn)
        return p

    q = command("quality", cmd_quality, "learned vs untrained routers, one component at a time, per domain")
    q.add_argument("--domains", type=ca.names, help="text domains (default: every shipped one)")
    q.add_argument("--capacities", type=ca.capacities, default=ca.default_of(lx.quality_table, "capacities"),
                   help="besides 1.0")
    q.add_argument("--seed", type=int, default=ca.default_of(lx.untrained_like, "seed"),
                   help="seeds the untrained routers")
    k = command("keep-dense", cmd_keep_dense, "token routing one layer at a time; then every layer routed (capacity "
                "0.75, 0.5) vs layers 0, 1, -2, -1 kept dense (0.72, 0.43: the same measured compute)", blocks=4)
    k.add_argument("--domains", type=ca.names, default=("licenses", "pydocs"), help="domains of the comparison")
    k.add_argument("--damage-domain", default="licenses", help="domain of the one-layer sweep (its first block)")
    k.add_argument("--components", type=ca.names, default=ca.default_of(lx.layer_damage, "components"),
                   help="token components")
    k.add_argument("--capacity", type=ca.capacity, default=ca.default_of(lx.layer_damage, "capacity"),
                   help="of the one routed layer in the sweep")
    a = command("attn-variants", cmd_attn_variants, "attn_tokens dropping skipped tokens vs keeping their keys "
                "and values, every layer routed and edges dense")
    a.add_argument("--domain", default="licenses", help="held-out text")
    a.add_argument("--capacities", type=ca.capacities, default=ca.default_of(lx.attn_variants, "capacities"),
                   help="of attn_tokens")
    a.add_argument("--scorers", type=ca.names, default=ca.default_of(lx.attn_variants, "scorers"), help="who chooses")
    t = command("threshold-modes", cmd_threshold_modes, "requested vs measured compute of token routing in the "
                "causal modes (threshold, running) on text the thresholds were not calibrated on")
    t.add_argument("--domain", default="licenses",
                   help="held-out text (the shipped routers were calibrated on pydocs)")
    t.add_argument("--capacities", type=ca.capacities, default=ca.default_of(lx.threshold_modes, "capacities"),
                   help="requested")
    t.add_argument("--components", type=ca.names, default=ca.default_of(lx.threshold_modes, "components"),
                   help="token components")
    r = command("routing-map", cmd_routing_map, "which tokens each layer keeps, one token component on one "
                "held-out passage (notebook 01's map; the README's picture)", blocks=None)
    r.add_argument("--domain", default="licenses", help="text domain of the passage (its held-out part)")
    r.add_argument("--tokens", type=ca.int_at_least(2), default=48, help="tokens of the passage")
    r.add_argument("--component", choices=("mlp_tokens", "attn_tokens"), default="mlp_tokens", help="routed alone")
    r.add_argument("--capacity", type=ca.capacity, default=0.5, help="of that component, the others dense")
