"""The down projection of one decode step, per layer, as a decode step meets it (weights out of cache): the dense
GEMV against the gather-sums torch offers for reading only k of F rows of a unit-major copy of w_out.

    python benchmarks/gather_cpu.py --out benchmarks/results             # gather_cpu.csv
    python benchmarks/gather_cpu.py --compile --out runs/gather          # also torch.compile's loop (minutes)

It answers where the limit of ``mlp_units`` decoding on a CPU is: in the kernels (a gather that reads fewer bytes
but at a lower rate than the GEMV) or in what the point skips. SmolLM2-135M dims (d 576, F 1536) over 30 layers'
own weights, so each call reads from memory and not from a cache the previous call warmed; fp32, threads pinned;
every method runs in each round (interleaved), medians over the rounds. ``per_byte`` = the method's time per
byte it must read over the dense GEMV's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from elastilab.analysis import bench, timing  # noqa: E402


def methods(compile_too: bool) -> dict:
    """name -> fn(w [d, F], w_t [F, d] unit-major, hidden [1, F], units [1, k] sorted, weights [1, k]) -> [1, d]."""
    def csr(w, w_t, hidden, units, weights):
        k = units.shape[1]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            m = torch.sparse_csr_tensor(torch.tensor([0, k]), units[0], weights[0], size=(1, w_t.shape[0]),
                                        check_invariants=False)
            return torch.sparse.mm(m, w_t)

    out = {"dense GEMV (every unit)": lambda w, w_t, hidden, units, weights: F.linear(hidden, w),
           "embedding_bag gather-sum (the library's)":
               lambda w, w_t, hidden, units, weights: F.embedding_bag(units, w_t, per_sample_weights=weights,
                                                                      mode="sum"),
           "index_select + GEMV": lambda w, w_t, hidden, units, weights: weights @ w_t.index_select(0, units[0]),
           "sparse CSR x unit-major": csr}
    if compile_too:
        loop = torch.compile(lambda w_t, units, weights: (w_t[units] * weights[..., None]).sum(1), dynamic=True)
        out["torch.compile gather-sum"] = lambda w, w_t, hidden, units, weights: loop(w_t, units, weights)
    return out


def run(capacities=(0.9999, 0.875, 0.75, 0.5, 0.25), layers: int = 30, d: int = 576, width: int = 1536,
        reps: int = 7, calls: int = 20, compile_too: bool = False) -> pd.DataFrame:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(d, width, generator=g) for _ in range(layers)]
    wts = [w.t().contiguous() for w in ws]
    hidden = torch.randn(1, width, generator=g)
    fns = methods(compile_too)
    rows = []
    for cap in capacities:
        k = max(1, round(cap * width))
        units = hidden.abs().topk(k, dim=-1).indices.sort(-1).values
        weights = hidden.gather(1, units)
        ref = F.linear(torch.zeros_like(hidden).scatter(1, units, weights), ws[0])
        times = {name: [] for name in fns}
        for r in range(reps + 1):
            for name, fn in fns.items():
                if r == 0:  # warm-up (and compilation); the values checked once (the GEMV's: of every unit)
                    want = F.linear(hidden, ws[0]) if name.startswith("dense") else ref
                    torch.testing.assert_close(fn(ws[0], wts[0], hidden, units, weights), want, atol=1e-3, rtol=1e-4)
                t0 = time.perf_counter()
                for _ in range(calls):
                    for w, w_t in zip(ws, wts):
                        fn(w, w_t, hidden, units, weights)
                if r:
                    times[name].append((time.perf_counter() - t0) / (calls * layers))
        dense = statistics.median(times["dense GEMV (every unit)"])
        for name, t in times.items():
            med = statistics.median(t)
            share = 1.0 if name.startswith("dense") else k / width  # of w_out's bytes the method must read
            rows.append({"capacity": cap, "k": k, "F": width, "d": d, "layers": layers, "method": name,
                         "us_per_layer": med * 1e6, "speedup_vs_dense": dense / med,
                         "ideal_speedup": 1.0 / share, "per_byte": med / share / dense, "reps": reps})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gather_cpu.csv")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned; decode bench default)")
    p.add_argument("--reps", type=int, default=7, help="timed rounds (medians)")
    p.add_argument("--compile", action="store_true", help="also torch.compile's gather-sum loop (compiles first)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    torch.set_num_threads(args.threads)
    info = {**bench.machine(), "command": "python benchmarks/gather_cpu.py " + " ".join(args.argv),
            "load_start": timing.load_average()}
    df = run(reps=args.reps, compile_too=args.compile)
    info["load_end"] = timing.load_average()
    path = bench.write(df, args.out, "gather_cpu", info)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
