"""The result tables of docs/RESULTS.md (markdown), generated from the committed results by ``elastilab report``:
the frontiers (``REPORT_FILES``), the keep-dense comparison, the speed and decode benchmarks."""
from __future__ import annotations

from pathlib import Path

REPORT_FILES = {"language": "frontier-smollm2-135m.csv",
                "language, budget across layers": "frontier-smollm2-135m-budget.csv",
                "language, 64 MLP slices": "frontier-smollm2-135m-mlp64.csv",
                "language, single MLP units (CATS)": "frontier-smollm2-135m-units.csv",
                "language, attention heads: oracle warm start, budget, 40 distillation steps (smollm2-135m-heads)":
                    "frontier-smollm2-135m-heads.csv",
                "language, Gemma 3 270M, single MLP units (CATS)": "frontier-gemma3-270m-units.csv",
                "language, Gemma 3 270M, attention heads": "frontier-gemma3-270m-heads.csv",
                "language, Gemma 3 270M, MLP tokens": "frontier-gemma3-270m-mlp-tokens.csv",
                "language, Gemma 3 270M, attention tokens": "frontier-gemma3-270m-attn-tokens.csv",
                "vision": "frontier-dinov2-small.csv",
                "vision, budget across layers": "frontier-dinov2-small-budget.csv",
                "vision, single MLP units (CATS)": "frontier-dinov2-small-units.csv",
                "vision, token routers trained to merge": "frontier-dinov2-small-merge-trained.csv",
                "vision-language": "frontier-tiny-llava.csv",
                "vision-language, synthetic scenes": "frontier-tiny-llava-scenes.csv"}


def report(results: Path) -> str:
    """The result tables of docs/RESULTS.md (markdown), from the committed results in ``results``."""
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

    from elastilab.analysis import frontier as fr
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
    from elastilab.analysis.bench import read, read_info
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


MARKS = ("<!-- report:start -->\n", "<!-- report:end -->")


def update_block(path: Path, text: str) -> None:
    """Replace what lies between the report marks of a markdown file (docs/RESULTS.md) with ``text``, leaving
    the prose around it as it is; written atomically. A file without both marks is refused, untouched."""
    from elastilab.files import atomic_write
    doc = Path(path).read_text()
    start, end = doc.find(MARKS[0]), doc.find(MARKS[1])
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {MARKS[0].strip()} ... {MARKS[1]} block to update; add the two marks "
                         "where the tables belong")
    new = doc[: start + len(MARKS[0])] + text + doc[end:]
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(new))
