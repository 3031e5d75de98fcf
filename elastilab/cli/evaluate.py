"""``elastilab eval``: perplexity, KL, agreement and measured compute of routers against the teacher, on a text
split; with the capacities given, the routers' recommended ones, or those they were trained at.

    elastilab eval --model smollm2-135m --routers runs/r1 --domain licenses --mlp-tokens 0.5 --json
"""
from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

from elastilab.cli import train
from elastilab.cli.args import HelpFormatter, positive_int, recommended_capacities
from elastilab.core.components import COMPONENTS
from elastilab.core.config import TOKEN_COMPONENTS


def _selection(em, seq_len: int) -> tuple[list[str], list[str]]:
    """What the capacities select, in whole tokens / heads / experts: (lines, warnings)."""
    from elastilab.core.routing import n_kept
    lines, warnings = [], []
    threshold = em.elastic_config.mode != "topk"
    for comp, cap in em.capacities.items():
        block = next((b for b in em.blocks if comp in b.capacity), None)
        if block is None:
            continue
        if cap >= 1.0:
            lines.append(f"{comp} 1 -> dense")
            continue
        if comp in TOKEN_COMPONENTS:
            if threshold:
                lines.append(f"{comp} {cap:g} -> tokens whose score passes the threshold calibrated for "
                             f"{cap:.0%} (the fraction computed is in measured_capacities)")
                continue
            always = min(seq_len, block.adapter.block_spec(block.base_layer, block.layer_idx).n_protected)
            k, n, unit = always + n_kept(cap, seq_len - always), seq_len, f"tokens per {seq_len}-token block"
            if always:
                unit += f" (the first {always} always computed)"
        else:
            n, name = _slots(block, comp)
            k, unit = n_kept(cap, n), name + " per token"
        line = f"{comp} {cap:g} -> {k}/{n} {unit}"
        lines.append(line)
        if k == n:
            below = math.floor((n - 1) / n * 1000) / 1000
            warnings.append(f"{line}: nothing skipped (capacities round up to whole {unit.split()[0]}; "
                            f"{below:g} or less skips one)")
    return lines, warnings


def _slots(block, comp: str) -> tuple[int, str]:
    """What ``comp`` chooses among in each token of ``block``: (how many, their name)."""
    if COMPONENTS[comp].kind == "gated":  # units of the MLP's width, chosen by its gate
        return block.adapter.block_spec(block.base_layer, block.layer_idx).mlp.width, COMPONENTS[comp].unit
    return block.routers[comp].proj.out_features, COMPONENTS[comp].unit


@contextmanager
def _measured_capacities(em):
    """Yields a dict filled, once the block exits, with the fraction of tokens / heads / experts the
    routed forwards run inside really computed, per component (mean over elastic layers and batches)."""
    from elastilab.core.routing import n_kept
    sums: dict[str, list[float]] = {}

    def record(block, args, output):
        if not block.enabled:  # the teacher pass
            return
        c = block.counts
        for comp in block.capacity:
            if comp in TOKEN_COMPONENTS:  # the rows its sub-layer computed
                frac = c["attn_rows" if COMPONENTS[comp].sublayer == "attention" else "mlp_rows"] / (c["B"] * c["T"])
            else:
                n = _slots(block, comp)[0]
                frac = n_kept(block.capacity[comp], n) / n
            total = sums.setdefault(comp, [0.0, 0])
            total[0] += frac
            total[1] += 1

    measured: dict[str, float] = {}
    handles = [b.register_forward_hook(record) for b in em.blocks]
    try:
        yield measured
    finally:
        for h in handles:
            h.remove()
        measured.update({comp: round(s / n, 4) for comp, (s, n) in sums.items()})


def _json_safe(obj):
    """NaN and inf become null: the printed JSON stays valid."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def cmd_eval(args) -> int:
    import elastilab as el
    model, tok = train._load_lm(args.model)
    caps, where = train.capacities_of(args), "the command line"
    if args.routers:
        em = el.load_routers(model, args.routers)
        if caps:
            source = "from the command line; the other components run dense"
        elif rec := recommended_capacities(args.routers):
            caps, where = rec, f"{args.routers}: recommended_capacities"
            source = f"the recommended operating point stored in {args.routers}"
        else:
            source = (f"the capacities {args.routers} was trained at (it stores no recommended_capacities); "
                      "give capacities to choose others")
    else:
        if not caps:
            raise SystemExit("elastilab eval: give --routers DIR or at least one capacity")
        em = el.elastify(model, el.ElasticConfig(**caps))
        source = "from the command line; fresh, untrained routers"
    if caps:  # the chosen capacities; the other components run dense
        try:
            em.set_capacity(**{**{c: 1.0 for c in em.capacities}, **caps})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    if args.mode:
        em.set_mode(args.mode)
    if em.elastic_config.mode != "topk":
        missing = sorted({c for b in em.blocks for c, r in b.routers.items()
                          if c in TOKEN_COMPONENTS and b.capacity[c] < 1.0 and not r.calibrated})
        if missing:
            why = "this checkpoint was saved uncalibrated" if args.routers else "fresh routers: no --routers given"
            raise ValueError(f"--mode {em.elastic_config.mode} needs token routers calibrated on sample text, and the "
                             f"{', '.join(missing)} routers are not ({why}); use --mode topk, or --routers DIR "
                             "written by `elastilab train` (which calibrates them)")
    print(f"elastilab eval: capacities {', '.join(f'{c}={v:g}' for c, v in em.capacities.items())}, "
          f"mode {em.elastic_config.mode} ({source})", file=sys.stderr)
    lines, warnings = _selection(em, args.seq_len)
    for line in lines:
        print(f"elastilab eval:   {line}", file=sys.stderr)
    for line in warnings:
        print(f"elastilab eval: warning: {line}", file=sys.stderr)
    blocks = el.data.token_blocks(tok, train.text_of(args), args.seq_len, split=args.split)
    if args.blocks > len(blocks):
        print(f"elastilab eval: note: --blocks {args.blocks}, but the {args.split} split has only {len(blocks)} "
              f"blocks of {args.seq_len} tokens; evaluating {len(blocks)}", file=sys.stderr)
    blocks = blocks[: args.blocks]
    with _measured_capacities(em) as measured:
        result = el.evaluate(em, blocks)
    report = em.compute_report(blocks[:1])
    result["compute_fraction"] = {row.part: round(float(row.fraction), 4) for row in report.itertuples()}
    result["requested_capacities"] = em.capacities
    result["measured_capacities"] = measured
    result["mode"] = em.elastic_config.mode
    result = _json_safe(result)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0


def add_parsers(sub) -> None:
    """``elastilab eval``."""
    e = sub.add_parser("eval", help="perplexity, KL, agreement and compute vs the teacher",
                       formatter_class=HelpFormatter)
    train.add_common_options(e)
    e.add_argument("--routers", type=Path, help="a folder written by `elastilab train`; without capacities, "
                   "its recommended_capacities (else the capacities it was trained at) are used")
    e.add_argument("--split", choices=("train", "eval", "all"), default="eval",
                   help="part of the text: eval = the last 10%% (cut at a line start), train = the rest, all")
    e.add_argument("--blocks", type=positive_int, default=8,
                   help="number of blocks to evaluate (fewer if the split is shorter)")
    e.add_argument("--mode", choices=("topk", "threshold", "running"),
                   help="token selection: top-k per block, calibrated per-layer thresholds (causal), or each "
                        "sequence's running quantile of its own scores (causal, follows the capacity); "
                        "default: the routers' own mode (topk for fresh routers)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_eval)
