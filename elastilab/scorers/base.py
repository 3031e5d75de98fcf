"""The scorer contract (what a scorer sees, the hooks it implements, its checked registry, the block's
slot for it), random choice (the floor) and the attention helpers the scorers share."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS, VISUAL_COMPONENTS

#: the model kinds a scorer declares (an adapter's ``kind``): causal LMs, vision transformers, and
#: visual-language models (whose image tokens a visual component chooses; their LM blocks are causal)
KINDS = ("lm", "vit", "vlm")
#: what a scorer may choose: every layer component, the gated ones and a VLM's image tokens
SCORABLE = LAYER_COMPONENTS + GATED_COMPONENTS + VISUAL_COMPONENTS


@dataclass
class Candidates:
    """What a scorer sees: one block's candidates for one component.

    h: the rows the component would run on, normalised as the sub-layer sees them: [B, T, d] for
    token components, [B, K, d] attention rows for heads, [n, d] MLP rows for MLP slices and units;
    for a VLM's image tokens the whole sequence [B, T, d] as the scored LM layer receives it (not
    normalised: ``spec.attn_norm`` is the layer's own norm).
    rows: index of each row in the flattened B x T batch (shape h.shape[:-1]), so a scorer can look
    up anything it computed per position; for image tokens [n_images, N]: the flat index of each
    image's tokens in h. pos / rope / valid: positions, rotary tables and validity (False = padding)
    of attention rows (for image tokens: of the sequence).
    block: the ElasticBlock (for image tokens: the ElasticLlava); layer_spec: the scored LM
    layer's BlockSpec for image tokens (``spec`` returns it)."""

    block: nn.Module
    component: str
    h: Tensor
    rows: Tensor
    pos: Tensor | None = None
    rope: tuple | None = None
    valid: Tensor | None = None
    layer_spec: object = None

    @property
    def spec(self):
        return self.layer_spec if self.layer_spec is not None else self.block._spec()

    def n_out(self) -> int:
        if self.component in VISUAL_COMPONENTS:
            return 1
        if self.component in GATED_COMPONENTS:
            return self.spec.mlp.width
        return self.block.routers[self.component].proj.out_features


class Scorer:
    """The scorer contract. A scorer declares ``name``, ``components`` and ``kinds`` and implements
    ``__call__``; every other hook has a default, overridden where a method needs it. ``register``
    (and ``em.scoring`` for an unregistered instance) checks the declarations; the library calls each
    hook directly, never through hasattr."""

    #: the registry key: ``em.scoring(name)``, the frontier's ``scorer`` column
    name: str = ""
    #: the components it can choose (a subset of ``SCORABLE``); declared by every scorer
    components: tuple[str, ...] = ()
    #: the model kinds it works on (a subset of ``KINDS``); declared by every scorer
    kinds: tuple[str, ...] = ()
    #: True: a real method, whose scoring work is part of the measured compute (as router FLOPs);
    #: False: an oracle (a ceiling for analysis), whose own work is left out (``compute.measure_flops``)
    counted: bool = True

    def check(self, em, component: str) -> None:
        """Raise a clear ValueError if this scorer cannot choose ``component`` on ``em``. Called by
        ``em.scoring()`` for every component below capacity 1.0, and by ``supports``, before any
        forward. Default: the declared components and kinds; extend it (calling super) for more."""
        if component not in self.components:
            raise ValueError(f"scorer {self.name!r} does not support {component}; it supports "
                             f"{', '.join(self.components)}")
        kind = em.adapter.kind
        if kind not in self.kinds:
            raise ValueError(f"scorer {self.name!r} works on models of kind {', '.join(self.kinds)}; "
                             f"{type(em.model).__name__} is of kind {kind}")

    def before_forward(self, em, args: tuple, kwargs: dict) -> None:
        """Prepare for the routed forward ``em(*args, **kwargs)``. Called by ``ElasticModel.forward``
        (without grad, with routed blocks) and by the FLOP counters just before they count, so this
        work is never counted. Returns nothing. Default: nothing (Taylor: its dense forward + backward)."""

    def __call__(self, c: Candidates):
        """The scores of c's candidates, shaped like the router's output (larger = kept): [B, T] for
        token components, [B, K, H] for heads, [n, E] for MLP slices; for MLP units [n, F] scores, a
        ``UnitPlan`` (units chosen before the gate) or None (by the gate activations); for a VLM's image
        tokens [n_images, N]. Called by the block's ``Scoring`` module (whose FLOPs are
        the scoring work), or by ElasticLlava for the image tokens. Required."""
        raise NotImplementedError

    def merged_into(self) -> Tensor | None:
        """After ``__call__`` chose a token component: the token each token merges into [B, T]
        (itself when kept), for a merging method (ToMe); None (default) drops the skipped tokens.
        Called by the block right after the scores of a token component."""
        return None

    def image_layer(self, em) -> int:
        """For a VLM's image tokens: the first LM layer that sees only the kept ones. 0 (default):
        they are scored as the LM receives them and chosen before it runs, so every layer and the KV
        cache hold only the kept ones; K >= 1: layers < K see every image token, the scores read layer
        K-1's input, and layers >= K run on the kept ones (FastV; no KV cache). Called by ElasticLlava
        before each forward with image tokens to choose."""
        return 0


SCORERS: dict[str, type[Scorer]] = {}


def check_contract(cls: type) -> None:
    """Raise a clear error unless ``cls`` is a Scorer that declares a name, the components and the
    model kinds it supports (known ones) and implements ``__call__``."""
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"a scorer subclasses elastilab.scorers.Scorer; got {cls!r}")
    who = f"scorer class {cls.__qualname__}"
    if not isinstance(cls.name, str) or not cls.name or cls.name == "learned":
        raise ValueError(f"{who} must set `name` (a non-empty string other than 'learned')")
    for attr, known in (("components", SCORABLE), ("kinds", KINDS)):
        got = getattr(cls, attr)
        if not isinstance(got, tuple) or not got:
            raise ValueError(f"{who} ({cls.name!r}) must declare `{attr}`: a non-empty tuple of {', '.join(known)}")
        if bad := [g for g in got if g not in known]:
            raise ValueError(f"{who} ({cls.name!r}) declares unknown {attr} {bad}; known: {', '.join(known)}")
    if cls.__call__ is Scorer.__call__:
        raise TypeError(f"{who} ({cls.name!r}) must implement __call__(candidates) -> scores")
    if not isinstance(cls.counted, bool):
        raise ValueError(f"{who} ({cls.name!r}): `counted` must be True or False, got {cls.counted!r}")


def register(cls):
    """Class decorator: check the contract and add the scorer to ``SCORERS`` under its name (a name
    taken by another class is refused; the same class again, e.g. a re-run notebook cell, replaces it)."""
    check_contract(cls)
    old = SCORERS.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"scorer name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}")
    SCORERS[cls.name] = cls
    return cls


def get_scorer(scorer) -> Scorer | None:
    """A Scorer from a registered name (None for "learned": the routers) or a Scorer instance."""
    if isinstance(scorer, Scorer):
        check_contract(type(scorer))
        return scorer
    if scorer in (None, "learned"):
        return None
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; registered: learned, {', '.join(SCORERS)}")
    return SCORERS[scorer]()


def supports(scorer, em, component: str) -> bool:
    """Whether ``scorer`` can choose ``component`` on ``em`` (the learned routers: every component
    with a router, and a VLM's image tokens)."""
    s = get_scorer(scorer)
    if s is None:  # the routers: a gated component has none (its gate chooses, which is "magnitude")
        return component not in GATED_COMPONENTS and (component not in VISUAL_COMPONENTS or em.adapter.kind == "vlm")
    try:
        s.check(em, component)
    except ValueError:
        return False
    return True


class Scoring(nn.Module):
    """The block's slot for a scorer: a module, so the FLOP counter sees its work by name."""

    def __init__(self):
        super().__init__()
        self.scorer: Scorer | None = None

    def forward(self, c: Candidates) -> Tensor:
        if c.component not in self.scorer.components:  # capacities may have changed since scoring()
            raise ValueError(f"scorer {self.scorer.name!r} does not support {c.component}; it supports "
                             f"{', '.join(self.scorer.components)}")
        return self.scorer(c)


# ------------------------------------------------------------------------------ the scorers
@register
class Random(Scorer):
    """Seeded noise: the floor any method must beat at the same compute."""

    name = "random"
    components = SCORABLE
    kinds = KINDS

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, c):
        if c.component in VISUAL_COMPONENTS:  # uniform, from the seed on every call: the same choice each time
            return torch.rand(c.rows.shape, generator=torch.Generator().manual_seed(self.seed)).to(c.h.device)
        n = c.n_out()
        s = torch.randn(*c.h.shape[:-1], n, generator=self.generator).to(c.h)
        return s.squeeze(-1) if n == 1 else s


def _project(a, h: Tensor, part: str, rope=None) -> Tensor:
    """Rows h [B, K, d] through the q, k or v projection, split into heads [B, n, K, hd] (q and k through
    the per-head norm, if any, and rotated when rope is given)."""
    w, b, n = {"q": (a.w_q, a.b_q, a.n_heads), "k": (a.w_k, a.b_k, a.n_kv_heads),
               "v": (a.w_v, a.b_v, a.n_kv_heads)}[part]
    x = F.linear(h, w, b).view(*h.shape[:2], n, a.head_dim).transpose(1, 2)
    return x if part == "v" else a.heads(x, part, rope)


def _heads(a, h: Tensor, pos: Tensor, rope, valid: Tensor | None) -> Tensor:
    """Per-head attention outputs o [B, H, K, hd] of rows h [B, K, d] attending to each other
    (causal and windowed by position when the model is; padding rows are never keys)."""
    K = h.shape[1]
    q, k, v = _project(a, h, "q", rope), _project(a, h, "k", rope), _project(a, h, "v")
    mask = a.visible(pos, pos)
    if valid is not None and not bool(valid.all()):
        keys = valid[:, None, :].expand(-1, K, -1)
        mask = keys if mask is None else mask & keys
        mask = mask | ~valid[:, :, None]  # padding queries still see a key (no NaN)
    return a.attend(q, k, v, None if mask is None else mask[:, None])


def _positions(c: Candidates) -> Tensor:
    if c.pos is not None:
        return c.pos
    B, T = c.h.shape[:2]
    return torch.arange(T, device=c.h.device).expand(B, T)
