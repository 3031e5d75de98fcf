"""The committed figures, each drawn by the library from committed result files, in one place.

Every figure has a name: ``frontier-*`` / ``generation-*`` / ``speed_cpu`` / ``decode_cpu`` are drawn from
the CSV of that name in ``benchmarks/results`` (and committed next to it as NAME.png), ``hero`` (the README's
picture) from the two files of ``HERO``; ``two-models-*`` are notebook 06's. Notebooks show them with
``figures.show(NAME)``, ``elastilab figures --out DIR`` writes them all, and ``figures.stale`` /
``stale_in_notebook`` say which committed images no longer match what the current code draws (a test runs
both), so a stale picture fails CI instead of misleading a reader.
Figures are drawn under matplotlib's default style: a notebook's theme cannot change them.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from elastilab.data import ROOT

RESULTS = ROOT / "benchmarks" / "results"
METRIC_LABEL = {"ppl_ratio": "perplexity / teacher's (held-out text, lower is better)",
                "agreement": "probe agreement with the teacher (held-out images)",
                "acc": "answer accuracy and agreement with the teacher (held-out questions)"}
#: notebook 06: the frontiers of two language models, the same components and scorers
TWO_MODELS = {"smollm2-135m": ("SmolLM2-135M", ["frontier-smollm2-135m-units.csv", "frontier-smollm2-135m.csv"]),
              "gemma3-270m": ("Gemma 3 270M", ["frontier-gemma3-270m-units.csv", "frontier-gemma3-270m-heads.csv"])}

#: the README's picture (hero.png): notebook 01's routing map next to the whole-model frontier
HERO = ("lm_routing_map.csv", "frontier-smollm2-135m-model.csv")


def frontier_table(name: str, results: Path = RESULTS) -> pd.DataFrame:
    """A committed frontier CSV (``frontier-smollm2-135m`` or its file name), with its metric in ``attrs``:
    perplexity ratio (lower is better) for a language model, answer accuracy for a VLM, probe agreement
    for a ViT."""
    path = Path(results) / (name if name.endswith(".csv") else f"{name}.csv")
    if not path.is_file():
        raise FileNotFoundError(f"no committed frontier {path.name} in {results}")
    df = pd.read_csv(path)
    metric = "ppl_ratio" if "ppl_ratio" in df else "acc" if "acc" in df else "agreement"
    df.attrs.update(metric=metric, higher_is_better=metric != "ppl_ratio")
    return df


def two_models_table(model: str, results: Path = RESULTS) -> pd.DataFrame:
    """Notebook 06's frontier of one model: single MLP units and attention heads, uniform capacity, chosen
    at random, by the training-free rule (magnitude) and by the oracle."""
    if model not in TWO_MODELS:
        raise ValueError(f"two_models_table: unknown model {model!r}; known: {', '.join(TWO_MODELS)}")
    df = pd.concat([pd.read_csv(Path(results) / f) for f in TWO_MODELS[model][1]])
    df["allocation"] = df.get("allocation", pd.Series("uniform", index=df.index)).fillna("uniform")
    keep = (df.allocation == "uniform") & df.scorer.isin(["random", "magnitude", "oracle"])
    df = df[keep & df.component.isin(["mlp_units", "attn_heads"])].reset_index(drop=True)
    df.attrs.update(metric="ppl_ratio", higher_is_better=False)
    return df


def names(results: Path = RESULTS) -> list[str]:
    """The figures drawn from the CSVs in ``results`` and committed next to them (notebook 06's
    ``two-models-*`` are drawn too, but live in the notebook only)."""
    out = []
    for p in sorted(Path(results).glob("*.csv")):
        s = p.stem
        if (s.startswith("frontier-") and not s.endswith("-per-item")) or s.startswith("generation-") \
                or s in ("speed_cpu", "decode_cpu"):
            out.append(s)
    if all((Path(results) / f).is_file() for f in HERO):
        out.append("hero")
    return out


def _frontier_figure(df: pd.DataFrame, title: str):
    import matplotlib.pyplot as plt

    from elastilab.analysis.frontier import plot_frontier
    if df.attrs["metric"] != "acc":
        return plot_frontier(df, title=title)
    # a VLM: answer accuracy and agreement with the teacher side by side, one legend
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    plot_frontier(df, axes=[axes[0]])
    plot_frontier(df, metric="agreement", axes=[axes[1]])
    del fig.legends[1:]
    axes[0].set_ylabel("answer accuracy"), axes[1].set_ylabel("agreement with the teacher")
    fig.suptitle(title, fontsize=10)
    return fig


def _draw(name: str, results: Path):
    from elastilab.analysis import bench
    results = Path(results)
    known = names(results) + [f"two-models-{m}" for m in TWO_MODELS]
    if name not in known:
        raise ValueError(f"figures.draw: unknown figure {name!r}; known: {', '.join(known)}")
    if name.startswith("frontier-"):
        df = frontier_table(name, results)
        if (df.component == "model").any():  # --allocate-model: whole-model compute, the global budget's lines
            from elastilab.analysis.model_frontier import plot_model_frontier
            return plot_model_frontier(df, title=f"{name}: one compute knob for the whole model (held-out text)")
        return _frontier_figure(df, f"{name}: {METRIC_LABEL[df.attrs['metric']]}")
    if name.startswith("two-models-"):
        model = name.removeprefix("two-models-")
        df = two_models_table(model, results)
        fig = _frontier_figure(df, TWO_MODELS[model][0])
        for ax in fig.axes:
            ax.axhline(1.05, color="grey", lw=0.8, ls=":")  # the x1.05 tolerance
        return fig
    if name.startswith("generation-"):
        from elastilab.analysis.generation import plot_generation
        df = pd.read_csv(results / f"{name}.csv")
        return plot_generation(df, title=f"{name}: greedy tokens matching the teacher (held-out prompts)")
    if name == "hero":
        from elastilab.analysis.text_map import plot_hero
        return plot_hero(pd.read_csv(results / HERO[0]), frontier_table(HERO[1], results))
    if name == "speed_cpu":
        return bench.plot_speed(bench.read(results / "speed_cpu.csv"), "SmolLM2-135M on this CPU: measured (solid, "
                                "dotted = head-routing loop reference) vs ideal (dashed)")
    if name == "decode_cpu":
        from elastilab.analysis.bench_decode import plot_decode
        return plot_decode(bench.read(results / "decode_cpu.csv"),
                           "SmolLM2-135M on this CPU, 1 thread: speed-up over dense (black: ideal from FLOPs)")
    raise AssertionError(name)  # every known name is drawn above


def draw(name: str, results: Path = RESULTS):
    """Draw the named figure from the committed results (matplotlib's default style); returns the figure."""
    import matplotlib.pyplot as plt
    with plt.style.context("default"):
        return _draw(name, results)


def png(fig, notebook: bool = False) -> bytes:
    """The figure's PNG: as the notebook's inline backend shows it (``notebook=True``: tight bounding box at
    the figure's dpi), or as committed next to the CSVs (110 dpi)."""
    buf = io.BytesIO()
    if notebook:
        from IPython.core.pylabtools import print_figure
        return print_figure(fig, "png", bbox_inches="tight")
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def difference(a: bytes, b: bytes) -> float:
    """The share of pixels that differ visibly (by more than 48 of 255 in a channel) between two PNGs;
    1.0 when their sizes differ by more than two pixels (a smaller difference is cropped away)."""
    from PIL import Image
    x, y = (np.asarray(Image.open(io.BytesIO(p)).convert("RGB"), dtype=np.int16) for p in (a, b))
    if any(abs(i - j) > 2 for i, j in zip(x.shape, y.shape)):
        return 1.0
    h, w = min(x.shape[0], y.shape[0]), min(x.shape[1], y.shape[1])
    return float((np.abs(x[:h, :w] - y[:h, :w]).max(-1) > 48).mean())


# share of visibly different pixels allowed: the same code draws the same pixels (matplotlib bundles its
# font renderer), a single recoloured line changes ~0.03% of them
TOLERANCE = 1e-4


def write(out: Path, results: Path = RESULTS, only: list[str] | None = None) -> list[Path]:
    """Write NAME.png for every figure (or those in ``only``) into ``out``; returns the paths."""
    import matplotlib.pyplot as plt

    from elastilab.files import atomic_write
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in only or names(results):
        fig = draw(name, results)
        data = png(fig)
        plt.close(fig)
        atomic_write(out / f"{name}.png", lambda tmp, data=data: Path(tmp).write_bytes(data))
        paths.append(out / f"{name}.png")
    return paths


def stale(folder: Path = RESULTS, results: Path = RESULTS) -> list[str]:
    """Figures whose committed PNG in ``folder`` is missing or differs from what the library draws now."""
    import matplotlib.pyplot as plt
    bad = []
    for name in names(results):
        path = Path(folder) / f"{name}.png"
        if not path.is_file():
            bad.append(f"{name}: no {path}")
            continue
        fig = draw(name, results)
        d = difference(path.read_bytes(), png(fig))
        plt.close(fig)
        if d > TOLERANCE:
            bad.append(f"{name}: {d:.1%} of the pixels differ")
    return bad


def show(name: str, results: Path = RESULTS):
    """Display the named figure in a notebook, its output tagged with the name (``figures.stale_in_notebook``
    re-draws it from that tag), and close it so the inline backend does not show it twice."""
    import matplotlib.pyplot as plt
    from IPython.display import display
    fig = draw(name, results)
    display(fig, metadata={"elastilab_figure": name})
    plt.close(fig)


def notebook_images(notebook: Path) -> list[tuple[int, str, bytes]]:
    """(cell number, figure name, committed PNG) of every image output that ``figures.show`` tagged."""
    import base64
    nb = json.loads(Path(notebook).read_text())
    out = []
    for i, cell in enumerate(nb["cells"]):
        for o in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            name = o.get("metadata", {}).get("elastilab_figure")
            if name and "image/png" in o.get("data", {}):
                out.append((i, name, base64.b64decode(o["data"]["image/png"])))
    return out


def stale_in_notebook(notebook: Path, results: Path = RESULTS) -> list[str]:
    """The ``figures.show`` images of a notebook whose committed output differs from what the library draws."""
    import matplotlib.pyplot as plt
    bad = []
    for cell, name, committed in notebook_images(notebook):
        fig = draw(name, results)
        d = difference(committed, png(fig, notebook=True))
        plt.close(fig)
        if d > TOLERANCE:
            bad.append(f"{Path(notebook).name} cell {cell}: {name}, {d:.1%} of the pixels differ")
    return bad
