"""Bring your own model (notebook 07): a model and some data in; out, its frontier under the training-free rules
and the oracles, and its routing maps, with nothing trained.

    s = load("smollm2-135m")                          # or a Hub id / model folder; data: a .txt file
    s = load("dinov2-small", "my_photos/")            # a ViT and a folder of images
    df = frontier(s)                                  # a tqdm bar counts the points
    routing_figure(s, "mlp_tokens", 0.5)              # which tokens each layer keeps, per scorer
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import data as D
from .commands import VISION_MODELS, read_images

#: made elastic by default: single MLP units (chosen by the gate), query heads, tokens entering the MLP
COMPONENTS = ("mlp_units", "attn_heads", "mlp_tokens")
#: the frontier's default: the two parameter components, where the training-free rule (magnitude) applies;
#: random is the floor and the oracle a ceiling (its work not counted). A point costs a few CPU-seconds.
FRONTIER_COMPONENTS, FRONTIER_SCORERS = ("mlp_units", "attn_heads"), ("random", "magnitude", "oracle")
#: every scorer the panel offers, and the training-free token rule of the routing maps
SCORERS = {"language": ("oracle", "magnitude", "attention_received", "random"),
           "vision": ("oracle", "magnitude", "cls_attention", "random")}
TOKEN_SCORER = {"language": "attention_received", "vision": "cls_attention"}


@dataclass
class Subject:
    """An elastic model with fresh routers (never trained: the scorers choose) and its evaluation task."""
    name: str
    kind: str  # "language" or "vision"
    em: object
    task: object
    source: str
    tokenizer: object = None
    ids: torch.Tensor | None = None          # language: the first block, for routing maps
    images: list = field(default_factory=list)  # vision: the images, for routing maps
    frontier_table: pd.DataFrame | None = None   # the last ``frontier`` of this subject
    dense_flops: dict | None = None              # the dense model's, measured once for ``point``

    def __repr__(self) -> str:
        return f"{self.name} ({self.kind}) on {self.source}; elastic: {', '.join(self.em.capacities)}"


def _is_vision(model: str, data) -> bool:
    return model in VISION_MODELS or (data is not None and Path(data).is_dir())


def load(model: str = "smollm2-135m", data: str | Path | None = None, n: int = 2, seq_len: int = 64,
         components=COMPONENTS, size: int = 112) -> Subject:
    """The model (an offline default, a Hugging Face id or a local folder) made elastic in ``components``
    (those its family supports), and ``n`` inputs: token blocks of ``seq_len`` from a UTF-8 text file
    (default: the held-out part of the shipped licence text) or, for a ViT, images of a folder resized
    to ``size`` (default: the shipped photos)."""
    from .adapters import find_adapter
    from .config import ElasticConfig
    from .elastic import elastify
    from .quality import LMTask, ViTTask
    if n < 1 or seq_len < 2:
        raise ValueError(f"load needs n >= 1 inputs and seq_len >= 2, got n={n}, seq_len={seq_len}")
    if data is not None and not Path(data).exists():  # before the (slow) model load
        raise FileNotFoundError(f"no such text file or image folder: {data}")
    if _is_vision(model, data):
        from .tasks.vit import pixels
        from .zoo import dinov2, pretrained
        if data is not None and not Path(data).is_dir():
            raise ValueError(f"a vision model takes a folder of images, got {data}")
        if model in VISION_MODELS:
            net = dinov2.load_hf()
        else:
            from transformers import AutoModel
            net = pretrained(AutoModel, model).eval()
        images = read_images(Path(data), n) if data is not None else [p["image"] for p in D.photos()][:n]
        comps = [c for c in components if c in find_adapter(net).components]
        em = elastify(net, ElasticConfig(**{c: 1.0 for c in comps}))
        source = f"{len(images)} images of {data}" if data is not None else f"{len(images)} shipped photos"
        return Subject(model, "vision", em, ViTTask(pixels(images, size)), source, images=images)
    from .zoo import load as zoo_load
    text = D.text_file(data) if data is not None else D.text("licenses")
    net, tok = zoo_load(model)
    blocks = D.token_blocks(tok, text, seq_len, split="all" if data is not None else "eval")[:n]
    if len(blocks) == 0:
        raise ValueError(f"{data} is shorter than one block of {seq_len} tokens: give more text or a smaller seq_len")
    comps = [c for c in components if c in find_adapter(net).components]
    em = elastify(net, ElasticConfig(**{c: 1.0 for c in comps}))
    source = f"{len(blocks)} x {seq_len} tokens of " + (str(data) if data is not None else "held-out licence text")
    return Subject(model, "language", em, LMTask(blocks), source, tokenizer=tok, ids=blocks[:1])


def frontier(s: Subject, capacities=(0.75, 0.5), components=FRONTIER_COMPONENTS, scorers=FRONTIER_SCORERS,
             progress: bool = True) -> pd.DataFrame:
    """Quality against measured compute for each component (one at a time, the others dense) and scorer;
    what a scorer cannot choose is skipped. Token components take ``attention_received`` (``cls_attention``
    for a ViT) as their training-free rule."""
    from .quality import frontier as measure
    comps = [c for c in components if c in s.em.capacities]
    df = measure(s.em, s.task, components=comps, capacities=capacities, scorers=scorers, progress=progress)
    df.attrs.update(higher_is_better=s.task.higher_is_better, metric=s.task.metric,
                    title=f"{s.name} on {s.source}: {s.task.metric.replace('_', ' ')}, no training")
    s.frontier_table = df
    return df


def plot(df: pd.DataFrame):
    """The frontier ``frontier`` measured, one panel per component, in the shared scorer palette."""
    from .quality import plot_frontier
    return plot_frontier(df, title=df.attrs.get("title", ""))


def point(s: Subject, component: str, scorer: str, capacity: float) -> dict:
    """One operating point: quality and measured compute of ``component`` at ``capacity`` chosen by ``scorer``
    (compute as ``frontier`` counts it: the sub-layer's FLOPs and the scorer's, over the dense sub-layer's)."""
    from .compute import measure_flops
    from .quality import PART
    from .scorers import supports
    if capacity >= 1.0:  # the teacher itself: every quality measure is 1 (a ratio, an agreement, a cosine)
        return {"quality": 1.0, "compute": 1.0, "model_compute": 1.0}
    args, kwargs = s.task.measure_input(s.em)
    if s.dense_flops is None:
        with s.em.capacity(**{c: 1.0 for c in s.em.capacities}):
            s.dense_flops = measure_flops(s.em, *args, **kwargs)
    with s.em.capacity(**{**{c: 1.0 for c in s.em.capacities}, component: capacity}):
        if not supports(scorer, s.em, component):
            raise ValueError(f"the {scorer!r} scorer cannot choose {component}; try another scorer or component")
        with s.em.scoring(scorer):
            q, f = s.task.evaluate(s.em), measure_flops(s.em, *args, **kwargs)
    part, dense = PART[component], s.dense_flops
    return {**q, "compute": (f[part] + f["routers"]) / dense[part], "model_compute": f["total"] / dense["total"]}


def _word_ticks(tok, ids: torch.Tensor):
    """One tick per word, at its first token, labelled with the whole word."""
    at, words = [], []
    for i, t in enumerate(ids[0].tolist()):
        piece = tok.decode([t])
        if not words or piece[:1].isspace() or "\n" in piece:
            at.append(i), words.append(piece.strip() or "⏎")
        else:
            words[-1] += piece
    return at, words


@torch.no_grad()
def routing_figure(s: Subject, component: str = "mlp_tokens", capacity: float = 0.5, scorers=None):
    """Which tokens (patches) each layer keeps at ``capacity`` when each scorer chooses: for a language model
    a layer x token map per scorer, for a ViT the kept patches on the first two images."""
    import matplotlib.pyplot as plt

    from .lm_experiments import routing_map
    from .plots import routing_grid, routing_maps
    scorers = list(scorers or (TOKEN_SCORER[s.kind], "oracle"))
    if component not in s.em.capacities:
        raise ValueError(f"{component} is not elastic here; elastic: {', '.join(s.em.capacities)}")
    if s.kind == "vision":
        from .tasks.vit import pixels
        shown, maps = s.images[:2], {}
        for scorer in scorers:
            with s.em.capacity(**{component: capacity}), s.em.scoring(scorer):
                maps[scorer] = routing_maps(s.em, pixels(shown))[component]
        # one row per (image, scorer): routing_grid's rows are (image, component); give it scorers as components
        return routing_grid(shown, maps, components=scorers, labels=[f"image {i}" for i in range(len(shown))])
    fig, axes = plt.subplots(len(scorers), 1, figsize=(14, 2.6 * len(scorers)), squeeze=False, layout="constrained")
    at, words = _word_ticks(s.tokenizer, s.ids)
    for ax, scorer in zip(axes[:, 0], scorers):
        with s.em.scoring(scorer):
            keep = routing_map(s.em, s.ids, component, capacity)
        ax.imshow(keep, aspect="auto", cmap="Blues", vmin=0, vmax=1.4, interpolation="nearest")
        ax.set_xticks(at, words, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("layer", fontsize=8), ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"{scorer}: tokens whose {component.split('_')[0]} is computed (dark), capacity {capacity:g}",
                     fontsize=9)
    return fig


def panel(s: Subject, component: str | None = None):
    """Widgets: a component, a scorer and a capacity slider; each change measures that point and draws it on
    the subject's last ``frontier`` when there is one."""
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    from .quality import plot_frontier
    df = s.frontier_table
    comps = list(s.em.capacities)
    comp = W.Dropdown(options=comps, value=component or comps[0], description="component")
    scorer = W.Dropdown(options=list(SCORERS[s.kind]), value="oracle", description="scorer")
    cap = W.FloatSlider(value=0.75, min=0.25, max=1.0, step=0.05, description="capacity", continuous_update=False)

    def show(component, scorer, capacity):
        try:
            p = point(s, component, scorer, capacity)
        except ValueError as e:
            print(e)
            return
        metric = s.task.metric.replace("_", " ")  # a ViT without a probe: cosine, known after the first point
        print(f"{scorer}, {component} at {capacity:.2f}: {metric} {p['quality']:.3f} | compute {p['compute']:.3f} "
              f"of the sub-layer | model compute {p['model_compute']:.3f}")
        if df is not None and component in set(df.component):
            fig = plot_frontier(df[df.component == component])
            fig.axes[0].plot([p["compute"]], [p["quality"]], marker="*", ms=16, color="gold", mec="k", zorder=5)
            plt.show()

    out = W.interactive_output(show, {"component": comp, "scorer": scorer, "capacity": cap})
    display(W.VBox([W.HBox([comp, scorer, cap]), out]))


def best_points(df: pd.DataFrame, tolerance: float = 0.05) -> pd.DataFrame:
    """Per component and scorer, the largest measured saving of the sub-layer within ``tolerance`` of the
    teacher (perplexity ratio <= 1 + tolerance, or agreement / cosine within tolerance of 1)."""
    from .quality import max_saving
    out = max_saving(df, tolerance)
    return out.sort_values(["component", "saving"], ascending=[True, False]).reset_index(drop=True)
