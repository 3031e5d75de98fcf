"""Where token routing hurts SmolLM2, and what keeping those layers dense buys, with the shipped routers.

1. One layer at a time: capacity 0.5 in that layer only (ElasticModel.keep_dense on all the others),
   perplexity ratio vs the teacher on one held-out 128-token block of licence text.
2. Layers 0, 1, 28, 29 kept dense vs every layer routed, at the same measured sub-layer compute.

    python benchmarks/lm_keep_dense.py [--blocks 4]
writes benchmarks/results/lm_layer_damage.csv and lm_keep_dense.csv (and prints them).
"""
import argparse
import datetime
import platform
from pathlib import Path

import pandas as pd
import torch

import elastilab as el
from elastilab.compute import measure_flops

PART = {"attn_tokens": "attention", "mlp_tokens": "mlp"}
EDGES = (0, 1, -2, -1)
# (layers kept dense, capacity of the others): pairs chosen so the measured compute matches (within 1%)
SETTINGS = [((), 0.75), (EDGES, 0.72), ((), 0.5), (EDGES, 0.43)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--routers", default="data/routers/smollm2-135m")
    ap.add_argument("--blocks", type=int, default=4, help="held-out 128-token blocks per domain")
    ap.add_argument("--out", default="benchmarks/results/lm_keep_dense.csv")
    a = ap.parse_args(argv)
    model, tok = el.zoo.load("smollm2-135m")
    em = el.load_routers(model, a.routers)
    dense_caps = {c: 1.0 for c in em.capacities}
    layers = range(len(em.blocks))
    damage = []
    one = el.data.token_blocks(tok, el.data.text("licenses"), 128, split="eval")[:1]
    for comp in PART:
        for layer in layers:
            em.keep_dense(**{comp: [i for i in layers if i != layer]})
            with torch.no_grad(), em.capacity(**{**dense_caps, comp: 0.5}):
                routed = em.blocks[layer].capacity.get(comp, 1.0) < 1.0  # attn_tokens: layer 0 never is
                damage.append({"component": comp, "layer": layer, "routed": routed,
                               "ppl_ratio": round(el.evaluate(em, one)["ppl_ratio"], 4)})
        em.keep_dense(**{comp: ()})
    table = pd.DataFrame(damage)
    table.to_csv(Path(a.out).with_name("lm_layer_damage.csv"), index=False)
    print(table.pivot(index="layer", columns="component", values="ppl_ratio").round(3).T.to_string())

    rows = []
    for domain in ("licenses", "pydocs"):
        blocks = el.data.token_blocks(tok, el.data.text(domain), 128, split="eval")[: a.blocks]
        for comp, part in PART.items():
            with torch.no_grad(), em.capacity(**dense_caps):
                dense = measure_flops(em, blocks[:1])[part]
            for kept, cap in SETTINGS:
                em.keep_dense(**{comp: kept})
                with torch.no_grad(), em.capacity(**{**dense_caps, comp: cap}):
                    r = el.evaluate(em, blocks)
                    frac = measure_flops(em, blocks[:1])[part] / dense
                rows.append({"domain": domain, "component": comp, "kept_dense": " ".join(map(str, kept)) or "none",
                             "capacity": cap, "compute_fraction": round(frac, 4), "ppl_ratio": round(r["ppl_ratio"], 3),
                             "agreement": round(r["agreement"], 4), "date": datetime.date.today().isoformat(),
                             "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__})
                print(rows[-1], flush=True)
            em.keep_dense(**{comp: ()})
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(a.out, index=False)
    print(pd.DataFrame(rows)[["domain", "component", "kept_dense", "capacity", "compute_fraction", "ppl_ratio", "agreement"]].to_string(index=False))


if __name__ == "__main__":
    main()
