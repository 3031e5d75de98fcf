"""Per-token routing maps of a text: which tokens each layer keeps, drawn with the words on the axis (notebook 01,
the README's picture). A map is keep[layer, token] (``lm_experiments.routing_map``) and the token pieces as the
tokenizer decodes them one by one; ``routing_map_table`` / ``map_of_table`` turn the pair into a CSV and back,
so a committed figure is drawn without loading the model."""
from __future__ import annotations

import numpy as np
import pandas as pd


def pieces(tok, ids) -> list[str]:
    """Each token of the first sequence of ``ids`` [B, T], decoded on its own."""
    return [tok.decode([t]) for t in ids[0].tolist()]


def word_ticks(pieces: list[str]) -> tuple[list[int], list[str]]:
    """One tick per word, at its first token, labelled with the whole word: the axis reads as text.
    A piece starting with a space starts a word; a newline is a word of its own (⏎)."""
    if not pieces:
        raise ValueError("word_ticks: no tokens")
    at, words, newline = [], [], False
    for i, piece in enumerate(pieces):
        if not words or piece[:1].isspace() or "\n" in piece or newline:
            at.append(i)
            words.append("⏎" if "\n" in piece and not piece.strip() else piece.strip())
        else:  # a lone space piece starts a word that its next pieces spell
            words[-1] += piece
        newline = "\n" in piece
    return at, [w or "·" for w in words]


def show_map(keep: np.ndarray, pieces: list[str], title: str, ax=None, fontsize: float = 9):
    """Draw keep[layer, token] (kept dark) with a tick per word; returns the axes."""
    import matplotlib.pyplot as plt
    keep = np.asarray(keep, dtype=float)
    if keep.ndim != 2 or keep.shape[1] != len(pieces):
        raise ValueError(f"show_map: keep must be [layers, tokens] with one column per piece; got {keep.shape} "
                         f"for {len(pieces)} pieces")
    ax = ax or plt.subplots(figsize=(16, 6), layout="constrained")[1]
    ax.imshow(keep, cmap="Blues", vmin=0, vmax=1.25, aspect="auto", interpolation="nearest")  # kept: dark, not black
    at, words = word_ticks(pieces)
    ax.set_xticks(at, words, rotation=90, fontsize=fontsize)  # each word under its first token
    ax.set_yticks(range(0, keep.shape[0], 2 if keep.shape[0] > 16 else 1))
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(False)
    ax.set_xlabel("text (one tick per word)")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return ax


def routing_map_table(keep: np.ndarray, pieces: list[str], **columns) -> pd.DataFrame:
    """The map as rows (layer, position, piece, kept), with ``columns`` (e.g. component, capacity) on each."""
    keep = np.asarray(keep, dtype=bool)
    layer, pos = np.indices(keep.shape)
    df = pd.DataFrame({"layer": layer.ravel(), "position": pos.ravel(),
                       "piece": np.asarray(pieces, dtype=object)[pos.ravel()], "kept": keep.ravel()})
    return df.assign(**columns)


def map_of_table(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """(keep[layer, token], pieces) back from ``routing_map_table``'s rows (as read from its CSV)."""
    keep = df.pivot(index="layer", columns="position", values="kept").to_numpy(dtype=bool)
    # a CSV reads a piece that is only spaces or newlines back as-is, an empty one as NaN
    first = df.drop_duplicates("position").sort_values("position")
    return keep, [p if isinstance(p, str) else "" for p in first.piece]


def plot_hero(routing: pd.DataFrame, model_frontier: pd.DataFrame):
    """The README's picture: one layer-by-token routing map (left) next to the whole-model quality-vs-compute
    frontier (right), from committed files: ``lm_routing_map.csv`` and ``frontier-smollm2-135m-model.csv``."""
    import matplotlib.pyplot as plt

    from elastilab.analysis.palette import scorer_style
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6), width_ratios=[2.1, 1], layout="constrained")
    keep, words = map_of_table(routing)
    row = routing.iloc[0]
    show_map(keep, words, f"Which tokens each layer's MLP computes (dark): {row.component} = {row.capacity:g}",
             left, fontsize=8)
    left.title.set_fontsize(10)
    whole = model_frontier[model_frontier.component == "model"]
    for scorer, label in (("learned", "shipped routers + units' gate choose"),
                          ("oracle", "oracle chooses (a ceiling)")):
        g = whole[whole.scorer == scorer].sort_values("model_compute")
        s = scorer_style(scorer)
        right.plot(g.model_compute, g.ppl_ratio, color=s.color, marker=s.marker, ls=s.linestyle, lw=2, label=label)
    right.axhline(1.0, color="0.4", lw=0.7, ls=":")
    right.set_xlabel("measured whole-model compute (share of dense)")
    right.set_xticks([1.0, 0.95, 0.9, 0.85, 0.8])
    right.set_ylabel("perplexity / teacher's (held-out text)")
    right.set_title("One compute knob: quality vs compute", fontsize=10)
    right.invert_xaxis()  # left to right: more saved
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    fig.suptitle("SmolLM2-135M made elastic: routers choose what to compute, the slider sets how much", fontsize=11)
    return fig


def passage_ids(tok, domain: str = "licenses", n_tokens: int = 48, start: int = 2000):
    """The first ``n_tokens`` tokens [1, T] of a held-out passage of ``domain`` (characters from ``start``):
    notebook 01's passage and the README's."""
    from elastilab import data
    text = data.split_text(data.text(domain), "eval")[start: start + 12 * n_tokens]
    return tok(text, return_tensors="pt").input_ids[:, :n_tokens]
