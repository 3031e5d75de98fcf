"""Views of the committed speed measurements (notebook 04): the headline rows of an ``elastilab bench speed`` table."""
from __future__ import annotations

import pandas as pd

HEADLINE_COLUMNS = ["component", "backend", "heads", "dense_s", "routed_s", "speedup", "ideal_speedup", "realised"]


def headline(df: pd.DataFrame, capacity: float = 0.5):
    """The rows of the largest input (batch x tokens) at ``capacity``: dense and routed seconds, measured and
    ideal (FLOP) speedup and the share of it realised, as a styled table; prints the shape it shows."""
    missing = [c for c in HEADLINE_COLUMNS + ["batch", "seq", "capacity"] if c not in df.columns]
    if missing:
        raise ValueError(f"not a bench speed table (elastilab bench speed): missing columns {missing}")
    if capacity not in set(df.capacity):
        raise ValueError(f"no rows at capacity {capacity}; measured: {sorted(set(df.capacity))}")
    B, T = df.sort_values(["batch", "seq"]).iloc[-1][["batch", "seq"]]
    sub = df[(df.batch == B) & (df.seq == T) & (df.capacity == capacity)]
    print(f"batch {B} x {T} tokens, capacity {capacity}:")
    return sub[HEADLINE_COLUMNS].style.format({"dense_s": "{:.2f}", "routed_s": "{:.2f}", "speedup": "{:.2f}",
                                               "ideal_speedup": "{:.2f}", "realised": "{:.0%}"}).hide(axis="index")
