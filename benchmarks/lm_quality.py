"""Quality vs teacher of the shipped SmolLM2 routers, one component at a time, in-domain and
cross-domain, against random routers at the same capacities.

    python benchmarks/lm_quality.py [--routers data/routers/smollm2-135m] [--blocks 8]
writes benchmarks/results/lm_quality.csv (and prints it).
"""
import argparse
import datetime
import platform
from pathlib import Path

import pandas as pd
import torch

import elastilab as el
from elastilab.compute import measure_flops

PART = {"attn_tokens": "attention", "attn_heads": "attention", "mlp_tokens": "mlp", "mlp_experts": "mlp"}


def sweep(em, label, domains, capacities):
    rows = []
    for domain, blocks in domains.items():
        with em.capacity(**{c: 1.0 for c in em.capacities}):
            dense = measure_flops(em, blocks[:1])
        for comp in em.capacities:
            for cap in capacities:
                caps = {c: 1.0 for c in em.capacities}
                caps[comp] = cap
                with em.capacity(**caps):
                    r = el.evaluate(em, blocks)
                    f = measure_flops(em, blocks[:1])
                rows.append({"routers": label, "domain": domain, "component": comp, "capacity": cap,
                             "compute_fraction": f[PART[comp]] / dense[PART[comp]],
                             "model_compute_fraction": f["total"] / dense["total"],
                             **{k: r[k] for k in ("teacher_ppl", "student_ppl", "ppl_ratio", "kl", "agreement")}})
                print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--routers", default="data/routers/smollm2-135m")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/lm_quality.csv")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = el.zoo.load("smollm2-135m")
    domains = {d: el.data.token_blocks(tok, el.data.text(d), args.seq_len, split="eval")[: args.blocks]
               for d in el.data.text_domains()}
    capacities = [1.0, 0.75, 0.5]
    em = el.load_routers(model, args.routers)
    config = em.elastic_config
    rows = sweep(em, "learned", domains, capacities)
    em.unelastify()
    em = el.elastify(model, el.ElasticConfig(**config.capacities(), n_experts=config.n_experts))
    rows += sweep(em, "random", domains, capacities)
    df = pd.DataFrame(rows)
    df["date"] = datetime.date.today().isoformat()
    df["machine"] = f"{platform.machine()} {torch.get_num_threads()} threads"
    df["torch"] = torch.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(df.pivot_table(index=["domain", "component", "capacity"], columns="routers",
                         values=["ppl_ratio", "agreement"]).round(3).to_string())


if __name__ == "__main__":
    main()
