"""ViT experiments on DINOv2-S: train routers per image domain, benchmark them, evaluate across domains.

The task they run (outputs, loss, evaluation, image domains) is ``elastilab.tasks.vit``. Results go
where ``--out`` says: the shipped ones are benchmarks/results/vision.json and data/routers/dinov2-small-*/:

    python -m elastilab.vision train --domain digits04 --out runs/dinov2-digits04
    python -m elastilab.vision bench --routers data/routers/dinov2-small-digits04 --out runs/vision.json
    python -m elastilab.vision crossdomain --out runs/vision.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .config import TOKEN_COMPONENTS
from .data import ROOT
from .files import atomic_write
from .tasks.vit import (DEFAULT_CAPS, DOMAINS, SIZE, distill_vit, domain, evaluate_vit, load_dinov2, pixels,
                        teacher_outputs)


def check_components(components) -> tuple[str, ...]:
    """The components a ViT routes, validated: a non-empty subset of DEFAULT_CAPS, in order, no repeats."""
    comps = tuple(dict.fromkeys(components))
    allowed = ", ".join(DEFAULT_CAPS)
    bad = [c for c in comps if c not in DEFAULT_CAPS]
    if bad:
        hint = " (visual_tokens belongs to visual-language models: python -m elastilab.vlm)" \
            if "visual_tokens" in bad else ""
        raise ValueError(f"unknown ViT component{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}{hint}; "
                         f"allowed: {allowed}")
    if not comps:
        raise ValueError(f"no component to route; give one or more of: {allowed}")
    return comps


def _components_arg(text: str) -> tuple[str, ...]:
    """argparse type of --components: comma-separated names."""
    try:
        return check_components(c.strip() for c in text.split(",") if c.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def train(domain_name: str, out: str, n: int = 256, steps: int = 40, batch_size: int = 8, lr: float = 2e-2,
          capacity_range=(0.5, 1.0), components_per_step: int | None = 1, components=tuple(DEFAULT_CAPS),
          seed: int = 0, command: str = "") -> dict:
    """Distill the four routers of DINOv2-S on one domain; each step routes one random component at a
    random capacity in capacity_range (the others at 1.0), so each slider is trained where it is used."""
    components = check_components(components)
    torch.manual_seed(seed)
    em, probe = load_dinov2(config={c: DEFAULT_CAPS[c] for c in components})
    images, _ = domain(domain_name, "train", n, seed)
    x = pixels(images)
    t0 = time.perf_counter()
    log = distill_vit(em, x, probe, steps=steps, batch_size=batch_size, lr=lr, capacity_range=capacity_range,
                      components_per_step=components_per_step, seed=seed, progress=False)
    info = {"domain": domain_name, "components": list(components), "images": n, "steps": steps, "batch_size": batch_size, "lr": lr,
            "capacity_range": list(capacity_range), "components_per_step": components_per_step, "size": SIZE, "seconds": round(time.perf_counter() - t0, 1),
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


def bench(routers: str, n: int = 16, caps=(0.75, 0.5), command: str = "", out=None) -> list[dict]:
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
    _update_results(out, "bench", {"routers": os.path.relpath(routers, ROOT), "eval": f"{n} held-out digits (all 10 classes), {SIZE}px",
                              "command": command, "rows": rows})
    return rows


def crossdomain(n: int = 24, caps: dict | None = None, command: str = "", out=None) -> list[dict]:
    """Routers trained on each domain, evaluated on every domain at the same capacities; random
    routing (``trained_on="random"``) as the floor. Stored under "crossdomain" in ``out`` if given."""
    caps = caps or {"attn_tokens": 1.0, "mlp_tokens": 1.0, "attn_heads": 1.0, "mlp_experts": 0.75}
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


def main(argv=None) -> None:
    import sys
    parser = argparse.ArgumentParser(prog="python -m elastilab.vision", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="distill DINOv2-S routers on one image domain")
    p.add_argument("--domain", choices=DOMAINS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--components", type=_components_arg, default=tuple(DEFAULT_CAPS),
                   help=f"comma-separated components to route, from {','.join(DEFAULT_CAPS)} (default: all)")
    p = sub.add_parser("bench", help="learned vs random vs CLS-attention routing per component")
    p.add_argument("--routers", default=str(ROOT / "data" / "routers" / "dinov2-small-digits04"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--out", required=True, help="results JSON (its \"bench\" key is replaced, others kept)")
    p = sub.add_parser("crossdomain", help="routers of each domain evaluated on every domain")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--out", required=True, help="results JSON (its \"crossdomain\" key is replaced, others kept)")
    args = parser.parse_args(argv)
    command = "python -m elastilab.vision " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.cmd == "train":
        print(json.dumps(train(args.domain, args.out, args.images, args.steps, args.batch_size, args.lr,
                               components=args.components, command=command), indent=1))
    elif args.cmd == "bench":
        bench(args.routers, args.images, command=command, out=args.out)
    else:
        crossdomain(args.images, command=command, out=args.out)


if __name__ == "__main__":
    main()
