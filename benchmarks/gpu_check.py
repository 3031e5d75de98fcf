"""One command for a lent GPU machine (no network, < 8 minutes):

    python benchmarks/gpu_check.py            # writes CSV/PNG into $OUT if set, else benchmarks/results
    python benchmarks/gpu_check.py --dry-run  # the same code on this CPU: interpreter, tiny sizes, into /tmp

1. the kernel tests (tests/test_kernels.py, tests/test_torch_paths.py; interpreter, CPU) still pass here;
2. the Triton kernels on CUDA against their torch references: every MLP kind / activation, fp32, bf16,
   fp16, odd sizes, k = 1 and k = E, an empty selection -> gpu_kernels.csv (max abs errors);
3. the MLP alone, torch gather path vs Triton, Llama-1B dims (d 2048, F 8192), 16384 rows, bf16 \
-> mlp_gpu_random-1b.csv;
4. the whole model, random-init Llama-1B dims, 16 x 1024 tokens, bf16, torch vs Triton backends and
   the two head-routing implementations -> speed_gpu_random-1b.csv/.png;
5. decoding (batch 1, 64-token prompt, 64 greedy tokens with the KV cache), Llama-1B dims, bf16: dense vs
   mlp_units at 0.875 / 0.75 / 0.5 (the gather-GEMV kernels of kernels/unit_triton.py), tokens/s and the
   ideal speedup from the measured FLOPs of a decode step -> decode_gpu_random-1b.csv; and the MLP alone at
   decode size (1 and 4 rows) -> mlp_gpu_random-1b_decode.csv.
Random weights: the machine has no SmolLM2 package, and speed does not depend on the values.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # elastilab from this checkout, installed or not
OUT = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
T0 = time.time()


def say(*a):
    print(f"[{time.time() - T0:6.1f} s]", *a, flush=True)


def kernel_tests() -> int:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
           "tests/test_torch_paths.py"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    say("kernel tests (interpreter):",
        res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:])
    return res.returncode


def cuda_errors(device="cuda", N=1000, D=200, F=520):
    import pandas as pd
    import torch

    from elastilab.core import spec
    from elastilab.core.routing import choose_units
    from elastilab.core.spec import MLPWeights
    from elastilab_kernels import ops
    from elastilab_kernels.reference import routed_mlp_residual_reference, unit_mlp_sparse

    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    cases = [("swiglu", "silu", dt) for dt in (torch.float32, torch.bfloat16, torch.float16)]
    cases += [("gelu", "gelu", torch.float32), ("swiglu", "gelu_tanh", torch.float32),
              ("gelu", "gelu_tanh", torch.bfloat16)]
    E = 8  # D, F: odd sizes, no multiple of the blocks
    for kind, act, dt in cases:
        r = lambda *s, scale=0.3: (torch.randn(*s, generator=g, device=device) * scale).to(dt)
        w = MLPWeights(kind, act, r(F, D), r(D, F), r(F, D) if kind == "swiglu" else None, r(F), r(D))
        x, h = r(N, D, scale=1.0), r(N, D, scale=1.0)
        for n in (0, 1, N // 3 + 7, N):
            idx = torch.randperm(N, generator=g, device=device)[:n]
            gate = torch.rand(n, generator=g, device=device).to(dt)
            before = ops.LAUNCHES
            out = ops.routed_mlp_residual(x, h, idx, w, gate, backend="triton")
            ran = ops.LAUNCHES - before == (2 if n else 0)
            ref = routed_mlp_residual_reference(x.float(), h.float(), idx, _f32(w), gate.float())
            rows.append(dict(op="routed_mlp_residual", kind=kind, act=act, dtype=str(dt)[6:], n=n, k=None,
                             max_abs_err=float((out.float() - ref).abs().max()),
                             ref_max=float(ref.abs().max()), kernel_ran=ran))
        for k in (1, 3, E):
            experts = torch.rand(N, E, generator=g, device=device).topk(k, dim=1).indices
            gates = torch.rand(N, k, generator=g, device=device).to(dt)
            before = ops.LAUNCHES
            out = ops.expert_mlp(h, experts, gates, w, E, backend="triton")
            ran = ops.LAUNCHES - before == 2
            ref = spec.mlp_experts_forward(_f32(w), h.float(), experts, gates.float(), E)
            rows.append(dict(op="expert_mlp", kind=kind, act=act, dtype=str(dt)[6:], n=N, k=k,
                             max_abs_err=float((out.float() - ref).abs().max()), ref_max=float(ref.abs().max()),
                             kernel_ran=ran))
        for n in (1, 4):  # the decode gather-GEMV kernels of mlp_units
            h1 = h[:n]
            gate = spec.mlp_gate(w, h1)
            units = choose_units(gate, 0.5)
            before = ops.LAUNCHES
            out = ops.unit_mlp(h1, gate, units, w, backend="triton")
            ran = ops.LAUNCHES - before == 2
            ref = unit_mlp_sparse(_f32(w), h1.float(), gate.float(), units)
            rows.append(dict(op="unit_mlp", kind=kind, act=act, dtype=str(dt)[6:], n=n, k=units.shape[1],
                             max_abs_err=float((out.float() - ref).abs().max()), ref_max=float(ref.abs().max()),
                             kernel_ran=ran))
    df = pd.DataFrame(rows)
    tol = df.dtype.map({"float32": 1e-3, "bfloat16": 0.1, "float16": 2e-2})
    df["ok"] = (df.max_abs_err <= tol * df.ref_max.clip(lower=1)) & df.kernel_ran
    return df


def decode(model: str, device: str, dtype: str, capacities=(0.875, 0.75, 0.5), reps=5, warmup=1, new_tokens=64):
    """Greedy decoding tokens/s, dense vs mlp_units points (backend auto: the Triton kernels on CUDA)."""
    import statistics

    import pandas as pd
    import torch

    import elastilab as el
    from elastilab.analysis import bench
    from elastilab.analysis.bench_decode import _step_flops, greedy
    net, vocab = bench.load_model(model, device, getattr(torch, dtype))
    em = el.elastify(net, el.ElasticConfig(mlp_units=1.0))
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(c):
        em.set_capacity(mlp_units=c)
        with torch.no_grad():
            if c == 1.0:
                with em.routers_disabled():
                    return greedy(em, ids, new_tokens)[1]
            return greedy(em, ids, new_tokens)[1]

    caps = (1.0, *capacities)
    times = {c: [] for c in caps}
    for r in range(warmup + reps):
        for c in caps:
            sync()
            t = run(c)
            sync()
            if r >= warmup:
                times[c].append(t)
    flops = {}
    for c in caps:
        em.set_capacity(mlp_units=c)
        flops[c] = _step_flops(em, ids)
    d = statistics.median(times[1.0])
    steps = new_tokens - 1
    return pd.DataFrame([{"model": model, "dtype": dtype, "point": "dense" if c == 1.0 else f"mlp_units={c:g}",
                          "dense_tok_s": steps / d, "routed_tok_s": steps / statistics.median(times[c]),
                          "speedup": d / statistics.median(times[c]), "ideal_speedup": flops[1.0] / flops[c],
                          "realised": d / statistics.median(times[c]) * flops[c] / flops[1.0], "reps": reps}
                         for c in caps])


def _f32(w):
    c = lambda t: None if t is None else t.float()
    from elastilab.core.spec import MLPWeights
    return MLPWeights(w.kind, w.act, c(w.w_in), c(w.w_out), c(w.w_gate), c(w.b_in), c(w.b_out))


def main(dry: bool = False) -> int:
    global OUT
    if dry:  # before anything imports the kernels: the interpreter switch is read then
        os.environ["TRITON_INTERPRET"] = "1"
        OUT = Path("/tmp/gpu_check_dry_run")
    import pandas as pd
    import torch

    import elastilab
    from elastilab.analysis import bench
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this script is for a GPU machine (try --dry-run)", file=sys.stderr)
        return 2
    dev, model, dims = ("cpu", "tiny", "tiny") if dry else ("cuda", "random-1b", "random-1b")
    OUT.mkdir(parents=True, exist_ok=True)
    info = {**bench.machine(), "elastilab": str(Path(elastilab.__file__).parent),
            "command": "python benchmarks/gpu_check.py"}
    say("machine:", info)
    status = kernel_tests()

    errs = cuda_errors("cpu", 100, 40, 72) if dry else cuda_errors()
    bench.write(errs, OUT, "gpu_kernels", info)
    say("Triton on CUDA vs torch reference (max abs error):\n" + errs.to_string(index=False))
    status |= int(not errs.ok.all())

    mlp = bench.mlp_speed(dims, rows=64 if dry else 16384, capacities=(0.75, 0.5, 0.25), backends=("torch", "triton"),
                          reps=1 if dry else 20, warmup=0 if dry else 3, device=dev,
                          dtype="float32" if dry else "bfloat16")
    bench.write(mlp, OUT, f"mlp_gpu_{dims}", info)
    say("MLP alone:\n" + mlp.drop(columns=["dims", "device", "dtype", "reps", "threads", "load_start", "load_end"])
        .to_string(index=False, float_format=lambda v: f"{v:.4g}"))

    df = bench.speed(model, shapes=["2x16:1,0.5"] if dry else ["16x1024:1,0.5,0.25"], backends=("torch", "triton"),
                     heads=("grouped", "loop"), reps=1 if dry else 5, warmup=0 if dry else 2, device=dev,
                     dtype="float32" if dry else "bfloat16", log=say)
    bench.write(df, OUT, f"speed_gpu_{model}", info)
    bench.plot_speed(df, f"random-init Llama-1B dims, bf16, {info['gpu']}", OUT / f"speed_gpu_{model}.png")
    say("whole model:\n" + bench._summary(df))
    dec = bench.mlp_speed(dims, rows=1, capacities=(0.75, 0.5), backends=("torch", "triton"), reps=1 if dry else 50,
                          warmup=0 if dry else 5, device=dev, dtype="float32" if dry else "bfloat16")
    dec = pd.concat([dec, bench.mlp_speed(dims, rows=4, capacities=(0.75, 0.5), backends=("torch", "triton"),
                                          reps=1 if dry else 50, warmup=0 if dry else 5, device=dev,
                                          dtype="float32" if dry else "bfloat16")])
    bench.write(dec, OUT, f"mlp_gpu_{dims}_decode", info)
    say("MLP at decode size:\n" + dec[["component", "capacity", "backend", "rows", "speedup", "ideal_speedup",
                                       "realised"]]
        .to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    gen = decode(model, dev, "float32" if dry else "bfloat16", reps=1 if dry else 5, warmup=0 if dry else 1,
                 new_tokens=4 if dry else 64)
    bench.write(gen, OUT, f"decode_gpu_{model}", info)
    say("decoding:\n" + gen.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    say("done, status", status, "; files in", OUT)
    return status


if __name__ == "__main__":
    sys.exit(main(dry="--dry-run" in sys.argv[1:]))
