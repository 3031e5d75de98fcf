"""What the routers chose: each ``ElasticBlock`` records one ``RoutingDecision`` per component it routed in
its last forward, and a ``RoutingTrace`` gathers them by (layer, component) for the training losses, the
threshold calibration and the routing maps of images and text alike.

    trace = em.trace(input_ids)             # one forward; trace.output is what it returned
    trace.map("mlp_tokens")                 # keep [layers, B, T]
    trace.usage("attn_heads")               # share of rows using each head [layers, H]
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from elastilab.core.components import COMPONENTS, names


@dataclass(frozen=True, eq=False)
class RoutingDecision:
    """One layer's choice for one component in one forward. The tensors are the forward's own (no copy;
    with a gradient in training). Token components ("tokens"): ``scores`` and ``chosen`` (the keep mask,
    bool) are [B, T]. Head / expert components ("params"): ``scores`` [rows, n] over the n slots and
    ``chosen`` the slot ids of each row [rows, k], rows being the tokens that reached the sub-layer."""
    layer: int
    component: str
    scores: Tensor
    chosen: Tensor

    @property
    def kind(self) -> str:
        return COMPONENTS[self.component].kind

    @property
    def n_slots(self) -> int:
        return self.scores.shape[-1]


@dataclass(frozen=True, eq=False)
class RoutingTrace(Mapping):
    """{(layer, component): RoutingDecision} of one forward, in layer order; a layer missing from it did not
    route that component (no router there, capacity 1.0, or kept dense). ``n_layers`` counts every layer."""
    decisions: dict = field(repr=False)
    n_layers: int
    output: Any = field(default=None, repr=False)

    @classmethod
    def of(cls, em, output=None) -> "RoutingTrace":
        """The decisions em's blocks made in their last forward (references: nothing is copied)."""
        decisions = {(b.layer_idx, c): d for b in em.blocks for c, d in b.decisions.items()}
        return cls(decisions, len(em.adapter.layers(em.model)), output)

    def __getitem__(self, key) -> RoutingDecision:
        return self.decisions[key]

    def __iter__(self):
        return iter(self.decisions)

    def __len__(self) -> int:
        return len(self.decisions)

    @property
    def components(self) -> tuple[str, ...]:
        """The components some layer routed, in table order."""
        seen = {c for _, c in self.decisions}
        return tuple(c for c in COMPONENTS if c in seen)

    def layers(self, component: str) -> dict[int, RoutingDecision]:
        return {layer: d for (layer, c), d in self.decisions.items() if c == component}

    def _slots(self, component: str) -> dict[int, RoutingDecision]:
        if COMPONENTS[component].kind != "params":
            raise ValueError(f"{component} chooses tokens, not slots; usage() and slot_map() are for "
                             + " and ".join(names("params")))
        found = self.layers(component)
        if not found:
            raise ValueError(f"no layer routed {component} in this forward (capacity 1.0 or not elastic?)")
        return found

    def map(self, component: str, tokens: tuple[int, int] | None = None) -> np.ndarray:
        """keep[layer, b, t] (bool) of a token component; a layer that did not route it keeps every token.
        ``tokens`` (B, T) gives the shape when no layer routed it (all kept)."""
        if COMPONENTS[component].kind != "tokens":
            raise ValueError(f"{component} does not choose tokens; map() is for " + " and ".join(names("tokens")))
        found = {layer: d.chosen for layer, d in self.layers(component).items()}
        if not found and tokens is None:
            raise ValueError(f"no layer routed {component} in this forward: pass tokens=(B, T) for an all-kept map")
        shape = tuple(next(iter(found.values())).shape) if found else tuple(tokens)
        out = np.ones((self.n_layers, *shape), bool)
        for layer, keep in found.items():
            out[layer] = keep.detach().cpu().numpy()
        return out

    def usage(self, component: str) -> np.ndarray:
        """The share of rows choosing each slot (head / expert) per layer [layers, n]; each row chooses k, so
        a layer's shares sum to k. A layer that did not route it uses every slot (1.0)."""
        found = self._slots(component)
        n = next(iter(found.values())).n_slots
        out = np.ones((self.n_layers, n))
        for layer, d in found.items():
            out[layer] = np.bincount(d.chosen.detach().reshape(-1).cpu().numpy(), minlength=n) / len(d.chosen)
        return out

    def slot_map(self, component: str, layer: int) -> np.ndarray:
        """0/1 [rows, n]: which slots each row of ``layer`` chose."""
        found = self._slots(component)
        if layer not in found:
            raise ValueError(f"layer {layer} did not route {component}; routed layers: {sorted(found)}")
        d = found[layer]
        out = np.zeros((len(d.chosen), d.n_slots))
        np.put_along_axis(out, d.chosen.detach().cpu().numpy(), 1, axis=1)
        return out
