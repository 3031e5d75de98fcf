"""One colour, marker and line style per scorer, shared by every plot (frontiers, notebooks, figures), so a
scorer looks the same wherever it appears. Colours are fixed hex values (matplotlib's tab10), not the
``C0``..``C9`` cycle, so a notebook's theme (seaborn) cannot re-colour them."""
from __future__ import annotations

from typing import NamedTuple


class Style(NamedTuple):
    color: str
    marker: str
    linestyle: str


# learned: solid; the floor (random): dotted grey; oracles: dashed; training-free rules: dash-dot
SCORER_STYLE: dict[str, Style] = {
    "learned": Style("#1f77b4", "o", "-"),
    "random": Style("#7f7f7f", "x", ":"),
    "oracle": Style("#d62728", "^", "--"),
    "taylor": Style("#ff7f0e", "v", "--"),
    "magnitude": Style("#2ca02c", "s", "-."),
    "attention_received": Style("#9467bd", "D", "-."),
    "cls_attention": Style("#8c564b", "P", "-."),
    "fastv": Style("#e377c2", "X", "-."),
    "tome": Style("#17becf", "*", "-."),
    # unit choosers that predict the gate before it runs (scorers/unit_choice)
    "lowrank_gate": Style("#bcbd22", "h", "-"),
    "two_stage": Style("#aec7e8", "p", "-"),
}
UNKNOWN = Style("#000000", ".", "-")


def scorer_style(name: str) -> Style:
    """The style of a scorer; a scorer this table does not know is drawn black with dots."""
    return SCORER_STYLE.get(name, UNKNOWN)
