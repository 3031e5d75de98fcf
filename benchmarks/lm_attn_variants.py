"""Attention-token routing that drops skipped tokens vs one that keeps their keys and values
(``attn_tokens_variant="keep_kv"``, FlexiDepth-style), with the shipped SmolLM2 routers (trained for
"drop"), random choice and the norm oracle, every layer routed and with layers 0, 1, 28, 29 dense;
only attn_tokens routed, 8 held-out 128-token licence blocks.

    python benchmarks/lm_attn_variants.py --out benchmarks/results/lm_attn_variants.csv
"""
import argparse
import datetime
import platform
import time

import pandas as pd
import torch

import elastilab as el
from elastilab.compute import measure_flops


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--routers", default="data/routers/smollm2-135m")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--out", required=True, help="CSV file to write")
    args = p.parse_args()
    model, tok = el.zoo.load("smollm2-135m")
    em = el.load_routers(model, args.routers)
    em.set_capacity(**{c: 1.0 for c in em.capacities})  # only attn_tokens is routed below
    blocks = el.data.token_blocks(tok, el.data.text("licenses"), 128, split="eval")[: args.blocks]
    task = el.LMTask(blocks)
    dense = measure_flops(em, blocks[:1])["attention"]
    rows, t0 = [], time.time()
    for kept in ((), (0, 1, -2, -1)):
        em.keep_dense(attn_tokens=kept)
        for variant in ("drop", "keep_kv"):
            em.set_attn_tokens_variant(variant)
            for scorer in ("learned", "random", "oracle"):
                with em.scoring(scorer):
                    for cap in (0.875, 0.75, 0.5):
                        with em.capacity(attn_tokens=cap):
                            r = task.evaluate(em)
                            f = measure_flops(em, blocks[:1])
                        rows.append({"kept_dense": " ".join(map(str, kept)) or "none", "variant": variant,
                                     "scorer": scorer, "capacity": cap, "attn_compute": f["attention"] / dense,
                                     **{k: r[k] for k in ("ppl_ratio", "agreement", "kl")}})
                        print(rows[-1], flush=True)
    df = pd.DataFrame(rows).round(4)
    df["date"] = datetime.date.today().isoformat()
    df["machine"] = f"{platform.machine()} {torch.get_num_threads()} threads"
    df["torch"] = torch.__version__
    df.to_csv(args.out, index=False)
    print(f"{len(df)} rows in {time.time() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
