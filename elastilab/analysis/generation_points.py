"""The operating points of ``elastilab generation``: the ``--point`` grammar (``point_spec``), the
sweep's list of points (``generation_points``) and putting a model at one (``apply_point``). A point
is a dict: capacities, keep_dense {component: layers}, attn_tokens variant, prefill, compute (the whole-model
knob, ``em.set_compute``: a fraction or a recommended target such as "x1.05"), label, source.
"""
from __future__ import annotations

import argparse
import json

from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS, TOKEN_COMPONENTS, ElasticConfig

#: the per-layer components a point can name (routed ones and the gated ones, which need no router)
PER_LAYER = LAYER_COMPONENTS + GATED_COMPONENTS
#: a --point of component=capacity pairs, as the help and the error messages show it
EXAMPLE_POINT = "attn_heads=0.875,mlp_experts=0.875"

#: what a --point JSON object may hold besides component capacities
POINT_KEYS = ("keep_dense", "attn_tokens_variant", "prefill", "compute", "label")


def point_spec(text: str) -> dict:
    """An argparse type for ``--point``: component=capacity pairs (``EXAMPLE_POINT``), or a JSON object that
    may also keep layers dense and pick the attn_tokens variant, e.g. ``{"attn_tokens": 0.95,
    "keep_dense": {"attn_tokens": [0, 1, -2, -1]}, "attn_tokens_variant": "keep_kv", "label": "edges"}``.
    Capacities, keep_dense and the variant are checked by ElasticConfig, as when a model is elastified.
    ``compute=x1.05`` (or ``compute=0.9``) instead of capacities: the whole model by its stored schedule."""
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
        if not isinstance(spec, dict):
            raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    else:
        pairs = [item.partition("=") for item in text.split(",")]
        if not all(eq for _, eq, _ in pairs):
            raise argparse.ArgumentTypeError(f"takes component=capacity pairs separated by commas "
                                             f"(e.g. {EXAMPLE_POINT}), got {text!r}")
        spec = {name.strip(): _number(value) for name, _, value in pairs}
    unknown = [k for k in spec if k not in PER_LAYER + POINT_KEYS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown key(s) {', '.join(map(repr, unknown))}; components: "
                                         f"{', '.join(PER_LAYER)}; other keys: {', '.join(POINT_KEYS)}")
    caps = {k: v for k, v in spec.items() if k in PER_LAYER}
    compute = _compute(spec["compute"]) if "compute" in spec else None
    if compute is not None and (caps or "keep_dense" in spec):
        raise argparse.ArgumentTypeError(f"compute sets every layer by the routers' schedule: name it alone (no "
                                         f"capacities or keep_dense), got {text!r}")
    if not caps and compute is None:
        raise argparse.ArgumentTypeError(f"names no component capacity (or compute=x1.05): {text!r}")
    keep, variant, label = spec.get("keep_dense", {}), spec.get("attn_tokens_variant"), spec.get("label")
    prefill = spec.get("prefill", "routed")
    try:  # every layer component present, so keep_dense may name any of them
        ElasticConfig(**{**dict.fromkeys(PER_LAYER, 1.0), **caps}, keep_dense=keep,
                      attn_tokens_variant="drop" if variant is None else variant, prefill=prefill)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if label is not None and not isinstance(label, str):
        raise argparse.ArgumentTypeError(f"label must be a string, got {label!r}")
    return {"capacities": {k: float(v) for k, v in caps.items()}, "keep_dense": {k: tuple(v) for k, v in keep.items()},
            "variant": variant, "prefill": prefill, "compute": compute, "label": label, "source": "point"}


def _compute(value):
    """A point's whole-model compute: a fraction in (0, 1] or a recommended target such as "x1.05"."""
    from elastilab.core.recommend import target_key
    try:
        if isinstance(value, str) and value[:1] in "xX":
            return target_key(value)
        if not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1:
            return float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"compute must be a fraction in (0, 1] of the dense model's FLOPs or a "
                                     f"recommended target such as x1.05, got {value!r}")


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text.strip()  # ElasticConfig refuses it, naming the component


def point_name(pt: dict) -> str:
    """Capacities, dense layers and variant in words: also what makes two points the same."""
    caps = " ".join(f"{c}={v:g}" for c, v in pt["capacities"].items()) or "dense"
    if pt.get("compute") is not None:
        caps = f"compute={pt['compute']:g}" if isinstance(pt["compute"], float) else f"compute {pt['compute']}"
    keep = "".join(f" ({c} dense in layers {','.join(map(str, v))})" for c, v in pt["keep_dense"].items() if v)
    prefill = " (dense prefill)" if pt.get("prefill", "routed") == "dense" else ""
    return caps + keep + (f" [{pt['variant']}]" if pt["variant"] else "") + prefill


def generation_points(em, args, recommended: dict | None) -> list[dict]:
    """The sweep: dense, each component alone at each capacity, the routers' recommended point and
    the --point ones; a point met twice runs once (its sources joined)."""
    elastic = [c for c in em.capacities if c in PER_LAYER]
    comps = list(args.components) if args.components else elastic
    pts = [{"capacities": {}, "keep_dense": {}, "variant": None, "label": "dense", "source": "dense"}]
    pts += [{"capacities": {c: cap}, "keep_dense": {}, "variant": None, "label": None, "source": "sweep"}
            for c in comps for cap in args.capacities if cap < 1.0]
    if recommended:
        pts.append({"capacities": {c: float(v) for c, v in recommended.items()}, "keep_dense": {}, "variant": None,
                    "label": None, "source": "recommended"})
    pts += [dict(p) for p in args.point or ()]
    out: dict[str, dict] = {}
    for p in pts:
        named = {**p["capacities"], **{c: None for c in p["keep_dense"]}}
        missing = [c for c in named if c not in elastic]
        if missing:
            where = (f"{args.routers}: recommended_capacities" if p["source"] == "recommended"
                     else "--components/--point")
            raise ValueError(f"{where}: {', '.join(missing)} not routed by {args.routers}; its components: "
                             f"{', '.join(elastic)}")
        tokens = [c for c, v in p["capacities"].items() if c in TOKEN_COMPONENTS and v < 1.0]
        if tokens and args.mode == "topk":
            raise ValueError(f"{point_name(p)}: token routing ({', '.join(tokens)}) cannot generate in --mode topk "
                             "(decoding feeds one token per step, and top-k of one token always keeps it); use "
                             "--mode threshold (or another causal mode)")
        p["name"] = p["label"] or point_name(p)
        key = point_name(p)
        if key in out:
            out[key]["source"] += ", " + p["source"]
        else:
            out[key] = p
    return list(out.values())


def apply_point(em, base: dict, pt: dict, default_variant: str) -> None:
    """Put ``em`` at the point: ``base`` capacities overridden by the point's, only its layers kept dense."""
    em.keep_dense(**{c: () for c in em.capacities if c in PER_LAYER})
    em.set_capacity(**{**base, **pt["capacities"]})
    if pt["keep_dense"]:
        em.keep_dense(**pt["keep_dense"])
    if pt.get("compute") is not None:  # every layer by the routers' whole-model schedule
        em.set_compute(pt["compute"])
    if "attn_tokens" in em.capacities:
        em.set_attn_tokens_variant(pt["variant"] or default_variant)
    if em.adapter.causal:
        em.set_prefill(pt.get("prefill", "routed"))
