"""Does the realised compute follow the slider on new text? Token routing of SmolLM2 in the two causal
modes, with the shipped routers (thresholds calibrated on Python docstrings), measured on licence text:
"threshold" (the calibrated per-layer bar) vs "running" (each sequence's own running quantile).

    python benchmarks/lm_threshold_modes.py [--blocks 8]
writes benchmarks/results/lm_threshold_modes.csv: requested capacity, measured sub-layer compute
(routers included) and perplexity ratio per component, mode and capacity (and prints it).
"""
import argparse
import datetime
import platform

import pandas as pd
import torch

import elastilab as el
from elastilab.compute import measure_flops

PART = {"attn_tokens": "attention", "mlp_tokens": "mlp"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--routers", default="data/routers/smollm2-135m")
    ap.add_argument("--blocks", type=int, default=8, help="held-out 128-token blocks of licence text")
    ap.add_argument("--capacities", default="0.9,0.75,0.5")
    ap.add_argument("--out", required=True, help="CSV to write")
    a = ap.parse_args(argv)
    model, tok = el.zoo.load("smollm2-135m")
    em = el.load_routers(model, a.routers)
    blocks = el.data.token_blocks(tok, el.data.text("licenses"), 128, split="eval")[: a.blocks]
    task = el.LMTask(blocks)
    dense_caps = {c: 1.0 for c in em.capacities}
    with torch.no_grad(), em.capacity(**dense_caps):
        dense = measure_flops(em, blocks)
    rows = []
    for comp, part in PART.items():
        for cap in (float(c) for c in a.capacities.split(",")):
            for mode in ("threshold", "running"):
                em.set_mode(mode)
                with torch.no_grad(), em.capacity(**{**dense_caps, comp: cap}):
                    f = measure_flops(em, blocks)  # the whole held-out set: what the thresholds really keep
                    q = task.evaluate(em)
                rows.append({"component": comp, "mode": mode, "requested": cap,
                             "measured_compute": round((f[part] + f["routers"]) / dense[part], 4),
                             "ppl_ratio": round(q["ppl_ratio"], 4)})
                print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df["command"] = "python benchmarks/lm_threshold_modes.py " + " ".join(argv or [])
    df["date"], df["machine"], df["torch"] = (datetime.date.today().isoformat(),
                                              f"{platform.machine()}, {torch.get_num_threads()} threads", torch.__version__)
    df.to_csv(a.out, index=False)
    print(df.drop(columns=["command", "date", "machine", "torch"]).to_string(index=False))


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
