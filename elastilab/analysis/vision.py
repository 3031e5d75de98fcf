"""ViT experiments on DINOv2-S: train routers per image domain, benchmark them, evaluate across domains.

The task they run (outputs, loss, evaluation, image domains) is ``elastilab.tasks.vit``; the command,
``cli/vision.py``. Results go
where ``--out`` says: the shipped ones are benchmarks/results/vision.json and data/routers/dinov2-small-*/:

    elastilab vit train --domain digits04 --out runs/dinov2-digits04
    elastilab vit bench --routers data/routers/dinov2-small-digits04 --out runs/vision.json
    elastilab vit crossdomain --out runs/vision.json
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from elastilab.core.config import LAYER_COMPONENTS, TOKEN_COMPONENTS, VISUAL_COMPONENTS
from elastilab.data import ROOT
from elastilab.files import atomic_write
from elastilab.tasks.vit import (
    DEFAULT_CAPS,
    DOMAINS,
    SIZE,
    distill_vit,
    domain,
    evaluate_vit,
    load_dinov2,
    pixels,
    teacher_outputs,
)

SHIPPED_ROUTERS = str(ROOT / "data" / "routers" / "dinov2-small-digits04")  # read by default, never written


def check_components(components) -> tuple[str, ...]:
    """The components a ViT routes, validated: a non-empty subset of DEFAULT_CAPS, in order, no repeats."""
    comps = tuple(dict.fromkeys(components))
    allowed = ", ".join(DEFAULT_CAPS)
    bad = [c for c in comps if c not in DEFAULT_CAPS]
    if bad:
        visual = [c for c in bad if c in VISUAL_COMPONENTS]
        hint = f" ({', '.join(visual)} belongs to visual-language models: elastilab vlm)" if visual else ""
        raise ValueError(f"unknown ViT component{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}{hint}; "
                         f"allowed: {allowed}")
    if not comps:
        raise ValueError(f"no component to route; give one or more of: {allowed}")
    return comps


def train(domain_name: str, out: str, n: int = 256, steps: int = 40, batch_size: int = 8, lr: float = 2e-2,
          capacity_range=(0.5, 1.0), components_per_step: int | None = 1, components=tuple(DEFAULT_CAPS),
          seed: int = 0, skipped_tokens: str = "drop", command: str = "") -> dict:
    """Distill the four routers of DINOv2-S on one domain; each step routes one random component at a
    random capacity in capacity_range (the others at 1.0), so each slider is trained where it is used.
    skipped_tokens="merge": the token routers learn which tokens can take their nearest kept token's
    output (saved in the checkpoint's config, so loading routes that way too)."""
    components = check_components(components)
    torch.manual_seed(seed)
    em, probe = load_dinov2(config={c: DEFAULT_CAPS[c] for c in components})
    em.set_skipped_tokens(skipped_tokens)
    images, _ = domain(domain_name, "train", n, seed)
    x = pixels(images)
    t0 = time.perf_counter()
    log = distill_vit(em, x, probe, steps=steps, batch_size=batch_size, lr=lr, capacity_range=capacity_range,
                      components_per_step=components_per_step, seed=seed, progress=False)
    info = {"domain": domain_name, "components": list(components), "images": n, "steps": steps,
            "batch_size": batch_size, "lr": lr,
            "capacity_range": list(capacity_range), "components_per_step": components_per_step,
            "skipped_tokens": skipped_tokens, "size": SIZE, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": float(log.loss.tail(5).mean()), "first_loss": float(log.loss.head(5).mean()),
            "command": command}
    em.save_routers(out, **info)
    log.to_csv(Path(out) / "log.csv", index=False)
    return info


def _update_results(out, key: str, value) -> None:
    """Set ``key`` of the results JSON ``out`` (other keys kept); ``out=None`` writes nothing."""
    if out is None:
        return
    out = Path(out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[key] = value
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def bench(routers: str = SHIPPED_ROUTERS, n: int = 16, caps=(0.75, 0.5), command: str = "", out=None) -> list[dict]:
    """Per component, at each capacity: learned vs random vs CLS attention (tokens) on held-out digits;
    the rows are returned, and stored under "bench" in the JSON file ``out`` if given."""
    em, probe = load_dinov2(routers)
    images, labels = domain("digits", "test", n)
    x = pixels(images)
    teacher = teacher_outputs(em, x, probe)
    rows = []
    base = {c: 1.0 for c in em.capacities}
    for comp in em.capacities:
        for cap in caps:
            em.set_capacity(**{**base, comp: cap})
            for method in ("learned", "random") + (("cls_attention",) if comp in TOKEN_COMPONENTS else ()):
                with em.scoring(method):
                    r = evaluate_vit(em, x, labels, probe, teacher=teacher)
                rows.append({"component": comp, "capacity": cap, "method": method, **r})
                print(json.dumps(rows[-1]))
    em.set_capacity(**base)
    rows.append({"component": "all", "capacity": 1.0, "method": "learned",
                 **evaluate_vit(em, x, labels, probe, teacher=teacher)})
    _update_results(out, "bench", {"routers": os.path.relpath(routers, ROOT),
                                   "eval": f"{n} held-out digits (all 10 classes), {SIZE}px",
                              "command": command, "rows": rows})
    return rows


def crossdomain(n: int = 24, caps: dict | None = None, command: str = "", out=None) -> list[dict]:
    """Routers trained on each domain, evaluated on every domain at the same capacities; random
    routing (``trained_on="random"``) as the floor. Stored under "crossdomain" in ``out`` if given."""
    caps = caps or {**dict.fromkeys(LAYER_COMPONENTS, 1.0), "mlp_experts": 0.75}
    tests = {d: domain(d, "test", n) for d in DOMAINS}
    rows = []
    for trained in (*DOMAINS, "random"):
        path = ROOT / "data" / "routers" / f"dinov2-small-{DOMAINS[0] if trained == 'random' else trained}"
        em, probe = load_dinov2(path)
        em.set_capacity(**caps)
        for target, (images, labels) in tests.items():
            with em.scoring("random" if trained == "random" else "learned"):
                r = evaluate_vit(em, pixels(images), labels, probe)
            rows.append({"trained_on": trained, "evaluated_on": target, **r})
            print(json.dumps(rows[-1]))
    _update_results(out, "crossdomain", {"capacities": caps, "eval": f"{n} test images per domain, {SIZE}px",
                                    "command": command, "rows": rows})
    return rows
