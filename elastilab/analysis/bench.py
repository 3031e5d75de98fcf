"""Speed benchmarks: does skipped compute show up on the clock? (The command line and the operator
profile are in ``bench_cli``.)

    elastilab bench speed --out runs/speed     # SmolLM2 on this machine -> runs/speed/speed_cpu.{csv,png}
    elastilab bench speed --model tiny --shape 2x32 --reps 1 --out runs/speed
    elastilab bench mlp --backends torch triton --out runs/mlp  # the MLP alone: torch vs Triton (CUDA)
    elastilab bench profile --component attn_heads --shape 2x256

``speed`` times whole forwards of the pretrained model (routers disabled: the untouched blocks) and
of the routed model with one component, or all four (``all``), at each capacity. Next to the
measured speedup (dense seconds / routed seconds) it gives the *ideal* speedup, dense FLOPs /
routed FLOPs counted on the same forwards (``torch.utils.flop_counter``, via elastilab.core.compute),
and ``realised = speedup / ideal``. Ratios come from one run: dense and routed forwards alternate
within each repetition (after warm-up) and medians are taken, because this kind of machine is
shared and noisy. Routers are untrained (random): speed does not depend on which tokens are chosen,
and top-k mode gives exactly the capacity. Capacity 1.0 is one configuration (every component at
1.0, the routed code path), reported under each component.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from elastilab.analysis.timing import device_kind, interleaved, load_average, sync_for, total_flops
from elastilab.core.components import in_sublayer
from elastilab.core.config import LAYER_COMPONENTS
from elastilab_kernels.head_attention import head_routed_attention
from elastilab_kernels.reference import head_attention_reference

COMPONENTS = LAYER_COMPONENTS + ("all",)
CAPACITIES = (1.0, 0.75, 0.5, 0.25)
#: default shapes for a CPU: the capacity sweep on one short sequence, longer / larger batches at
#: 1.0 and 0.5, and the issue's target shape (batch 8 x 512 tokens) at 0.5
SHAPES = ("1x128", "1x512:1,0.5", "4x128:1,0.5", "8x512:0.5")
RESULTS = Path("benchmarks/results")

#: random-init Llama configurations (speed does not depend on the weight values)
RANDOM_LLAMAS = {
    "tiny": dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "random-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),  # SmolLM2-135M dims
    "random-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),  # Llama-3.2-1B dims
}
MODELS = ("smollm2-135m",) + tuple(RANDOM_LLAMAS)


# -- set-up ---------------------------------------------------------------------------------------
def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model in eval mode, vocabulary size): the offline SmolLM2 or a random-init Llama preset."""
    if name == "smollm2-135m":
        from elastilab import zoo
        model = zoo.load(name)[0].to(device=device, dtype=dtype)
    elif name in RANDOM_LLAMAS:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(seed)
        cfg = LlamaConfig(max_position_embeddings=8192, **RANDOM_LLAMAS[name])
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
    else:
        raise ValueError(f"unknown benchmark model {name!r}; allowed: {', '.join(MODELS)}")
    return model.eval(), model.config.vocab_size


def parse_shape(text: str, capacities=CAPACITIES) -> tuple[int, int, tuple[float, ...]]:
    """'8x512' -> (8, 512, capacities); '8x512:1,0.5' -> (8, 512, (1.0, 0.5))."""
    try:
        size, _, caps = text.partition(":")
        b, t = (int(v) for v in size.lower().split("x"))
        caps = tuple(float(c) for c in caps.split(",")) if caps else tuple(capacities)
    except ValueError:
        raise ValueError("shape must look like BATCHxSEQ or BATCHxSEQ:c1,c2 (e.g. 8x512:1,0.5), "
                         f"got {text!r}") from None
    if b < 1 or t < 2 or not caps or not all(0 < c <= 1 for c in caps):
        raise ValueError(f"shape {text!r}: batch >= 1, seq >= 2 and capacities in (0, 1] are required")
    return b, t, caps


def machine() -> dict:
    """Where and with what the numbers were measured."""
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
            "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "threads": torch.get_num_threads()}


def _capacities(component: str, capacity: float) -> dict[str, float]:
    return {c: capacity if component in ("all", c) else 1.0 for c in LAYER_COMPONENTS}


# -- whole-model speed ----------------------------------------------------------------------------
def speed(model: str = "smollm2-135m", shapes=SHAPES, capacities=CAPACITIES, components=COMPONENTS,
          backends=("auto",), reps: int = 3, warmup: int = 1, device: str = "cpu", dtype: str = "float32",
          n_experts: int = 8, seed: int = 0, heads=("grouped",), log=None) -> pd.DataFrame:
    """Dense vs routed forward time and FLOPs; one row per (shape, component, capacity, backend, heads).

    ``heads``: implementations of head routing to time, "grouped" (the library's,
    ``elastilab_kernels.head_attention``: a loop over heads with the batch in one call) and/or "loop"
    (``kernels.reference.head_attention_reference``: a loop over batch rows x heads)."""
    import elastilab as el
    from elastilab.core.routing import RoutedAttention
    log = log or (lambda *a: print(*a, flush=True))
    impls = HEAD_IMPLS
    if not heads or any(i not in impls for i in heads):
        raise ValueError(f"heads must be some of {tuple(impls)}, got {heads!r}")
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise ValueError(f"unknown components {bad}; allowed: {', '.join(COMPONENTS)}")
    plan = [parse_shape(s, capacities) if isinstance(s, str) else s for s in shapes]
    net, vocab = load_model(model, device, getattr(torch, dtype), seed)
    em = el.elastify(net, el.ElasticConfig(**{c: 1.0 for c in LAYER_COMPONENTS}, n_experts=n_experts))
    em.to(device=device, dtype=getattr(torch, dtype))  # routers are created on the CPU in fp32
    sync, rows = sync_for(device), []
    gen = torch.Generator().manual_seed(seed)
    try:
        for B, T, caps in plan:
            ids = torch.randint(0, vocab, (B, T), generator=gen).to(device)

            def dense():
                with em.routers_disabled():
                    net(ids)

            def routed(component, capacity, backend, impl, inputs=ids):
                em.set_capacity(**_capacities(component, capacity))
                em.set_backend(backend)
                RoutedAttention.head_attention = staticmethod(impls[impl])
                net(inputs)

            configs = _configs(caps, components, backends, heads)
            fns = {"dense": dense, **{cfg: (lambda cfg=cfg: routed(*cfg)) for cfg in configs}}
            load0 = load_average()
            t0 = time.perf_counter()
            with torch.no_grad():
                times = interleaved(fns, reps, warmup, sync)
                # FLOPs of one sequence: top-k keeps the same count in every row, so the ratio holds for B
                one = ids[:1]
                flops = {"dense": total_flops(lambda: _dense_once(em, net, one))}
                for comp, cap, _, _ in configs:  # counted on the torch ops (Triton matmuls are invisible to
                    if (comp, cap) not in flops:     # the counter) with the per-head loop (no padding)
                        flops[comp, cap] = total_flops(lambda: routed(comp, cap, "torch", "loop", inputs=one))
            load1 = load_average()
            log(f"{B}x{T}: {len(fns)} configurations x {warmup}+{reps} rounds in {time.perf_counter() - t0:.0f} s "
                f"(load {load0} -> {load1})")
            rows += _rows(configs, times, flops, components, (B, T),
                          dict(model=model, device=device_kind(device), dtype=dtype),
                          dict(reps=reps, threads=torch.get_num_threads(), load_start=load0, load_end=load1))
    finally:
        RoutedAttention.head_attention = staticmethod(impls["grouped"])
        em.unelastify()
    return pd.DataFrame(rows)


def _configs(caps, components, backends, heads) -> list[tuple]:
    """(component, capacity, backend, heads) to time at one shape: capacity 1.0 once (every component at
    1.0), other backends only where they differ (the MLP), other head implementations only for heads."""
    configs = [("all", 1.0, backends[0], heads[0])] if 1.0 in caps else []
    return configs + [(c, cap, b, i) for cap in caps if cap < 1.0 for c in components for b in backends for i in heads
                      if (b == backends[0] or c not in in_sublayer("attention"))
                      and (i == heads[0] or c in ("attn_heads", "all"))]


def _rows(configs, times, flops, components, shape, first: dict, last: dict) -> list[dict]:
    """One row per timed configuration (capacity 1.0: one under each component): medians, their ratio,
    the median of the paired ratios, and the ideal speedup the FLOPs of one sequence give."""
    (B, T), d_med, rows = shape, statistics.median(times["dense"]), []
    for cfg in configs:
        comp, cap, backend, impl = cfg
        r_med = statistics.median(times[cfg])
        paired = statistics.median(d / r for d, r in zip(times["dense"], times[cfg]))
        ideal = flops["dense"] / flops[comp, cap]
        rows += [{**first, "backend": backend, "heads": impl, "batch": B, "seq": T, "component": c, "capacity": cap,
                  "dense_s": d_med, "routed_s": r_med, "speedup": d_med / r_med, "speedup_paired": paired,
                  "dense_gflops": flops["dense"] * B / 1e9, "routed_gflops": flops[comp, cap] * B / 1e9,
                  "ideal_speedup": ideal, "realised": d_med / r_med / ideal, **last}
                 for c in (components if cap == 1.0 else (comp,))]
    return rows


#: the head-routing implementations ``speed(heads=...)`` can time
HEAD_IMPLS = {"grouped": head_routed_attention, "loop": head_attention_reference}


def _dense_once(em, net, ids):
    with em.routers_disabled():
        net(ids)


# -- the MLP alone --------------------------------------------------------------------------------
MLP_DIMS = {"smollm2-135m": (576, 1536), "random-135m": (576, 1536), "random-1b": (2048, 8192), "tiny": (64, 96)}


def mlp_speed(dims: str = "smollm2-135m", rows: int = 4096, capacities=(0.75, 0.5, 0.25), backends=("torch",),
              n_experts: int = 8, reps: int = 5, warmup: int = 1, device: str = "cpu", dtype: str = "float32",
              seed: int = 0) -> pd.DataFrame:
    """A SwiGLU MLP of the model's dims on ``rows`` rows: dense (with the residual add) vs
    ``routed_mlp_residual`` on a capacity fraction of the rows, ``expert_mlp`` with k of E
    slices per row and ``unit_mlp`` with the top hidden units of each row by gate, for each backend ("torch":
    the gather path; "triton": the kernels, CUDA only; at most GATHER_ROWS rows, mlp_units takes the decode path).
    Ideal speedup = dense FLOPs / routed FLOPs, counted on the same calls with the torch backend
    (the counter cannot see inside Triton kernels; both backends do the same matmul work)."""
    from elastilab.core.routing import GATHER_ROWS, choose_units, n_kept
    from elastilab.core.spec import MLPWeights, mlp_forward, mlp_gate
    from elastilab_kernels import ops
    units_mlp = lambda w, h, c, b: ops.unit_mlp(h, g := mlp_gate(w, h), choose_units(g, c), w, backend=b)  # noqa: E731
    if dims not in MLP_DIMS:
        raise ValueError(f"unknown MLP dims {dims!r}; allowed: {', '.join(MLP_DIMS)}")
    d, F = MLP_DIMS[dims]
    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dt)
    w = MLPWeights("swiglu", "silu", r(F, d, scale=d ** -0.5), r(d, F, scale=F ** -0.5), r(F, d, scale=d ** -0.5))
    x, h = r(rows, d), r(rows, d)
    # a decode-sized call: mlp_units reads the unit-major copy of w_out the block keeps (routing.gathers)
    wu = MLPWeights(**{**vars(w), "w_out_t": w.w_out.t().contiguous()}) if rows <= GATHER_ROWS else w
    dense = lambda: x + mlp_forward(w, h)  # noqa: E731
    fns, flops = {"dense": dense}, {"dense": total_flops(dense)}
    for cap in capacities:
        idx = torch.randperm(rows, generator=g, device=device)[:n_kept(cap, rows)]
        gate = torch.ones(len(idx), device=device, dtype=dt)
        k = n_kept(cap, n_experts)
        experts = torch.rand(rows, n_experts, generator=g, device=device).topk(k, dim=1).indices
        gates = torch.ones(rows, k, device=device, dtype=dt)
        routed = {"mlp_tokens": lambda b, idx=idx, gate=gate: ops.routed_mlp_residual(x, h, idx, w, gate, backend=b),
                  "mlp_experts": lambda b, e=experts, gs=gates: x + ops.expert_mlp(h, e, gs, w, n_experts, backend=b),
                  "mlp_units": lambda b, c=cap: x + units_mlp(wu, h, c, b)}  # choosing included: gate + top-k
        for comp, fn in routed.items():
            flops[comp, cap] = total_flops(lambda: fn("torch"))
            fns.update({(comp, cap, b): (lambda fn=fn, b=b: fn(b)) for b in backends})
    load0 = load_average()
    with torch.no_grad():
        times = interleaved(fns, reps, warmup, sync_for(device))
    load1 = load_average()
    d_med = statistics.median(times["dense"])
    out = []
    for key in [k for k in fns if k != "dense"]:
        comp, cap, b = key
        r_med = statistics.median(times[key])
        ideal = flops["dense"] / flops[comp, cap]
        out.append({"dims": dims, "d": d, "F": F, "device": device_kind(device), "dtype": dtype, "backend": b,
                    "rows": rows, "component": comp, "capacity": cap, "n_experts": n_experts,
                    "dense_s": d_med, "routed_s": r_med, "speedup": d_med / r_med,
                    "dense_gflops": flops["dense"] / 1e9, "routed_gflops": flops[comp, cap] / 1e9,
                    "ideal_speedup": ideal, "realised": d_med / r_med / ideal, "reps": reps,
                    "threads": torch.get_num_threads(), "load_start": load0, "load_end": load1})
    return pd.DataFrame(out)


# -- files ----------------------------------------------------------------------------------------
def write(df: pd.DataFrame, out: Path, name: str, info: dict) -> Path:
    """CSV whose first lines are '# key: value' metadata (read it back with comment='#')."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    with open(path, "w") as f:
        for k, v in info.items():
            f.write(f"# {k}: {v}\n")
        df.to_csv(f, index=False, float_format="%.6g")
    return path


def read(path) -> pd.DataFrame:
    return pd.read_csv(path, comment="#")


def read_info(path) -> dict:
    info = {}
    for line in open(path):
        if not line.startswith("# "):
            break
        k, _, v = line[2:].rstrip("\n").partition(": ")
        info[k] = v
    return info


def plot_speed(df: pd.DataFrame, title: str = "", path: Path | None = None):
    """One panel per shape: measured speedup (solid) and ideal speedup (dashed) vs capacity."""
    import matplotlib
    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    shapes = df[["batch", "seq"]].drop_duplicates().values.tolist()
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False, sharey=True)
    colors = dict(zip(COMPONENTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = dict(zip(sorted(df.backend.unique()), "osD^"))
    for ax, (B, T) in zip(axes[0], shapes):
        sub = df[(df.batch == B) & (df.seq == T)]
        for (comp, backend, impl), g in sub.groupby(["component", "backend", "heads"], sort=False):
            g = (pd.concat([g, sub[(sub.component == comp) & (sub.capacity == 1.0)]]).drop_duplicates("capacity")
                 .sort_values("capacity"))
            label = (comp + ("" if len(markers) == 1 else f" ({backend})")
                     + (" loop (reference)" if impl == "loop" else ""))
            ax.plot(g.capacity, g.speedup, marker=markers[backend], color=colors[comp], label=label,
                    ls=":" if impl == "loop" else "-")
            if impl != "loop":
                ax.plot(g.capacity, g.ideal_speedup, ls="--", color=colors[comp], alpha=0.5)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title=f"batch {B} x {T} tokens", xlabel="capacity", xlim=(1.05, 0.2))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup over dense (dashed: ideal, FLOPs)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return finish_plot(fig, path)


def finish_plot(fig, path=None):
    """Lay the figure out; with a path, write it (PNG) and close it. Returns the figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def _summary(df: pd.DataFrame) -> str:
    cols = ["batch", "seq", "component", "capacity", "backend", "heads", "dense_s", "routed_s", "speedup",
            "ideal_speedup", "realised"]
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}")
