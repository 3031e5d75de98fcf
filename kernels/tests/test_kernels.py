"""Triton kernels vs their torch references, run under the Triton interpreter on CPU."""
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the import of the @triton.jit module

import subprocess
import sys

import pytest
import torch

from elastilab_kernels import mlp, mlp_triton, ops
from elastilab_kernels.mlp import MLPWeights
from elastilab_kernels.reference import routed_mlp_residual_reference

KINDS_ACTS = [(k, a) for k in ("swiglu", "gelu") for a in mlp.ACTIVATIONS]
D, F = 40, 96  # odd sizes: neither is a multiple of the 64-blocks


def test_interpreter_is_on():
    assert mlp_triton.INTERPRET, "TRITON_INTERPRET=1 was not set before elastilab_kernels.mlp_triton was imported"


def make_mlp(kind, act, dtype=torch.float32, biases=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype)
    return MLPWeights(kind, act, r(F, D), r(D, F), r(F, D) if kind == "swiglu" else None,
                      r(F) if biases else None, r(D) if biases else None)


def test_mlp_weights_to_converts_a_copy_of_every_tensor():
    w = make_mlp("swiglu", "silu")
    w.b_gate, w.w_out_t = torch.ones(F), w.w_out.t().contiguous()
    half = w.to(torch.bfloat16)
    fields = ("w_in", "w_out", "w_gate", "b_in", "b_out", "b_gate", "w_out_t")
    assert all(getattr(half, f).dtype == torch.bfloat16 for f in fields)
    assert all(getattr(w, f).dtype == torch.float32 for f in fields)  # the original is untouched
    assert (half.kind, half.act, half.width) == ("swiglu", "silu", F)
    torch.testing.assert_close(half.w_in.float(), w.w_in, rtol=1e-2, atol=1e-2)
    gelu = make_mlp("gelu", "gelu", biases=False).to(device="cpu", dtype=torch.float16)
    assert gelu.w_gate is None and gelu.b_in is None and gelu.w_in.dtype == torch.float16
    same = w.to()
    assert same is not w and same.w_in is w.w_in  # nothing to convert: the same tensors (as Tensor.to)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        w.to("bf16")


def rand(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def choose_experts(n, k, E, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)]) if n
            else torch.empty(0, k, dtype=torch.int64))


def choose_units(gate, capacity):
    """Each row's top ceil(capacity * F) units by |gate| (how elastilab's mlp_units chooses)."""
    k = max(1, math.ceil(capacity * gate.shape[-1]))
    return gate.abs().topk(k, dim=-1, sorted=False).indices


def run_triton(fn, *args, launches=2, **kw):
    before = ops.LAUNCHES
    out = fn(*args, backend="triton", **kw)
    assert ops.LAUNCHES - before == launches, "the Triton kernels did not run"
    return out


# ---- kernel 1: routed_mlp_residual --------------------------------------------------------------

@pytest.mark.parametrize("kind,act", KINDS_ACTS)
def test_routed_residual_matches_reference_fp32(kind, act):
    w = make_mlp(kind, act)
    N, n = 53, 37
    x, h = rand(N, D, seed=3), rand(N, D, seed=4)
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(5))[:n]
    gate = 0.5 + rand(n, seed=6).abs()
    out = run_triton(ops.routed_mlp_residual, x, h, idx, w, gate)
    ref = routed_mlp_residual_reference(x, h, idx, w, gate)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(out[untouched], x[untouched])  # rows not chosen are exact copies


def test_routed_residual_no_gate_no_bias_many_blocks_all_rows():
    w = make_mlp("swiglu", "silu", biases=False)  # Llama-style: no biases
    N = 150  # > 2 blocks of 64 rows
    x, h = rand(N, D, seed=7), rand(N, D, seed=8)
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(9))
    out = run_triton(ops.routed_mlp_residual, x, h, idx, w)
    torch.testing.assert_close(out, x + mlp.mlp_forward(w, h), atol=1e-4, rtol=1e-4)


def test_routed_residual_strided_weights():
    # weights as views with non-unit strides (e.g. slices of a fused matrix) must work
    base = make_mlp("gelu", "gelu_tanh")
    big_in = 0.3 * rand(2 * F, D, seed=10)
    w = MLPWeights("gelu", "gelu_tanh", big_in[::2], base.w_out.t().contiguous().t(), None, base.b_in, base.b_out)
    N, n = 20, 10
    x, h = rand(N, D, seed=11), rand(N, D, seed=12)
    idx = torch.arange(1, N, 2)[:n]
    out = run_triton(ops.routed_mlp_residual, x, h, idx, w, torch.full((n,), 0.7))
    torch.testing.assert_close(out, routed_mlp_residual_reference(x, h, idx, w, torch.full((n,), 0.7)),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter's numpy sigmoid at -1e3
@pytest.mark.parametrize("act", list(mlp.ACTIVATIONS))
def test_routed_residual_huge_preactivations_stay_finite(act):
    w = make_mlp("gelu", act)
    x, h = rand(6, D), 300 * rand(6, D, seed=3)
    idx = torch.tensor([0, 2, 5])
    out = run_triton(ops.routed_mlp_residual, x, h, idx, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, routed_mlp_residual_reference(x, h, idx, w), atol=1e-2, rtol=1e-4)


def test_routed_residual_empty_selection_is_copy():
    w = make_mlp("swiglu", "silu")
    x, h = rand(9, D), rand(9, D, seed=3)
    out = ops.routed_mlp_residual(x, h, torch.empty(0, dtype=torch.int64), w, torch.empty(0), backend="triton")
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])  # of max |ref|
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_routed_residual_half_precision(kind, dtype, tol):
    w32 = make_mlp(kind, "gelu")
    N, n = 45, 30
    x32, h32 = rand(N, D, seed=13), rand(N, D, seed=14)
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(15))[:n]
    gate32 = 0.5 + rand(n, seed=16).abs()
    w, x, h, gate = w32.to(dtype), x32.to(dtype), h32.to(dtype), gate32.to(dtype)
    out = run_triton(ops.routed_mlp_residual, x, h, idx, w, gate)
    assert out.dtype == dtype
    ref = routed_mlp_residual_reference(x, h, idx, w, gate)
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    # fp32 accumulation and one rounding per stored value: on average closer to the fp32 truth than torch
    exact = routed_mlp_residual_reference(x.float(), h.float(), idx, w.to(torch.float32), gate.float())
    assert (out.float() - exact).abs().mean() <= (ref.float() - exact).abs().mean()


# ---- kernel 2: expert_mlp -------------------------------------------------------------------------

# every MLP at (E, k) = (4, 2); k = 1, k = E and E = 1 on one MLP of each kind
EXPERT_CASES = [(kd, a, 4, 2) for kd, a in KINDS_ACTS] + [
    (kd, a, E, k) for kd, a in [("swiglu", "silu"), ("gelu", "gelu")] for E, k in [(4, 1), (4, 4), (3, 3), (1, 1)]]


@pytest.mark.parametrize("kind,act,E,k", EXPERT_CASES)
def test_expert_mlp_matches_reference_fp32(kind, act, E, k):
    w = make_mlp(kind, act)
    n = 37
    h = rand(n, D, seed=20)
    experts = choose_experts(n, k, E)
    gates = 0.5 + rand(n, k, seed=21).abs()
    y = run_triton(ops.expert_mlp, h, experts, gates, w, E)
    torch.testing.assert_close(y, mlp.mlp_experts_forward(w, h, experts, gates, E), atol=1e-4, rtol=1e-4)


def test_expert_mlp_all_experts_equals_dense():
    w = make_mlp("swiglu", "silu")
    h = rand(29, D, seed=22)
    experts = choose_experts(29, 6, 6)
    y = run_triton(ops.expert_mlp, h, experts, torch.ones(29, 6), w, 6)
    torch.testing.assert_close(y, mlp.mlp_forward(w, h), atol=1e-4, rtol=1e-4)


def test_expert_mlp_skewed_groups_span_blocks():
    # 150 rows mostly on expert 0: its group spans 3 blocks, expert 3 gets none, expert 2 a single row
    w = make_mlp("gelu", "gelu", biases=False)
    n = 150
    experts = torch.zeros(n, 1, dtype=torch.int64)
    experts[100:149] = 1
    experts[149] = 2
    h, gates = rand(n, D, seed=23), 0.5 + rand(n, 1, seed=24).abs()
    y = run_triton(ops.expert_mlp, h, experts, gates, w, 4)
    torch.testing.assert_close(y, mlp.mlp_experts_forward(w, h, experts, gates, 4), atol=1e-4, rtol=1e-4)


def test_expert_mlp_no_rows():
    w = make_mlp("gelu", "gelu")
    y = ops.expert_mlp(rand(0, D), torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2), w, 4, backend="triton")
    assert y.shape == (0, D)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])  # of max |ref|
def test_expert_mlp_half_precision(dtype, tol):
    w32 = make_mlp("swiglu", "gelu_tanh")
    n, E, k = 33, 4, 2
    h32, gates32 = rand(n, D, seed=25), 0.5 + rand(n, k, seed=26).abs()
    experts = choose_experts(n, k, E)
    w, h, gates = w32.to(dtype), h32.to(dtype), gates32.to(dtype)
    y = run_triton(ops.expert_mlp, h, experts, gates, w, E)
    assert y.dtype == dtype
    ref = mlp.mlp_experts_forward(w, h, experts, gates, E)
    assert (y.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    exact = mlp.mlp_experts_forward(w.to(torch.float32), h.float(), experts, gates.float(), E)
    assert (y.float() - exact).abs().mean() <= (ref.float() - exact).abs().mean()


def test_align_by_expert_groups_and_pads():
    experts = torch.tensor([[0, 2], [2, 1], [0, 2]])
    pairs, block_expert = mlp_triton.align_by_expert(experts, 4, block=4)
    assert pairs.tolist()[:12] == [0, 4, -1, -1, 3, -1, -1, -1, 1, 2, 5, -1]
    assert set(pairs.tolist()[12:]) == {-1}
    assert block_expert.tolist() == [0, 1, 2, -1, -1, -1]  # unused blocks exit at once


# ---- dispatch and input errors --------------------------------------------------------------------

def test_auto_uses_torch_on_cpu():
    w = make_mlp("gelu", "silu")
    x, h, idx = rand(8, D), rand(8, D, seed=2), torch.tensor([1, 5])
    experts, gates = choose_experts(8, 2, 4), torch.ones(8, 2)
    before = ops.LAUNCHES
    out = ops.routed_mlp_residual(x, h, idx, w, backend="auto")
    y = ops.expert_mlp(h, experts, gates, w, 4, backend="auto")
    assert ops.LAUNCHES == before
    assert torch.equal(out, routed_mlp_residual_reference(x, h, idx, w))
    assert torch.equal(y, mlp.mlp_experts_forward(w, h, experts, gates, 4))


def test_gradients_keep_the_torch_path():
    w = make_mlp("swiglu", "silu")
    x, h, idx = rand(8, D), rand(8, D, seed=2), torch.tensor([1, 5])
    gate = torch.ones(2, requires_grad=True)  # straight-through router gradient
    with pytest.raises(RuntimeError, match="forward only"):
        ops.routed_mlp_residual(x, h, idx, w, gate, backend="triton")
    ops.routed_mlp_residual(x, h, idx, w, gate, backend="auto").sum().backward()
    assert gate.grad is not None
    with torch.no_grad():
        run_triton(ops.routed_mlp_residual, x, h, idx, w, gate)


def test_bad_inputs_give_clear_errors():
    w = make_mlp("swiglu", "silu")
    x, h = rand(8, D), rand(8, D, seed=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.routed_mlp_residual(x, h, torch.tensor([1]), w, backend="bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.expert_mlp(h, choose_experts(8, 1, 4), torch.ones(8, 1), w, 4, backend="bogus")
    with pytest.raises(ValueError, match="idx must be a 1-D int64"):
        ops.routed_mlp_residual(x, h, torch.tensor([1], dtype=torch.int32), w, backend="triton")
    with pytest.raises(ValueError, match="idx values must lie in"):
        ops.routed_mlp_residual(x, h, torch.tensor([8]), w, backend="triton")
    with pytest.raises(ValueError, match="distinct"):
        ops.routed_mlp_residual(x, h, torch.tensor([3, 1, 3]), w, backend="triton")
    with pytest.raises(ValueError, match="n_experts must divide"):
        ops.expert_mlp(h, choose_experts(8, 1, 4), torch.ones(8, 1), w, 5, backend="triton")
    with pytest.raises(ValueError, match="expert ids must lie in"):
        ops.expert_mlp(h, torch.full((8, 1), 4), torch.ones(8, 1), w, 4, backend="triton")
    with pytest.raises(ValueError, match="must match h"):
        ops.expert_mlp(h.half(), choose_experts(8, 1, 4), torch.ones(8, 1), w, 4, backend="triton")


def test_triton_on_cpu_without_interpreter_is_refused():
    code = ("import torch; from elastilab_kernels import ops; from elastilab_kernels.mlp import MLPWeights\n"
            "w = MLPWeights('gelu', 'gelu', torch.zeros(8, 4), torch.zeros(4, 8))\n"
            "try: ops.routed_mlp_residual(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([0]), w, "
            "backend='triton')\n"
            "except RuntimeError as e: print('REFUSED', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


# ---- the decode gather-GEMV kernels of mlp_units (unit_triton) -----------------------------------

@pytest.mark.parametrize("kind,act", KINDS_ACTS)
@pytest.mark.parametrize("biases", [True, False])
@pytest.mark.parametrize("n,capacity", [(1, 0.75), (3, 0.5)])
def test_unit_gemv_kernels_match_the_torch_path(kind, act, biases, n, capacity, monkeypatch):
    from elastilab_kernels import reference
    w = make_mlp(kind, act, biases=biases)
    h = rand(n, D, seed=6)
    gate = mlp.mlp_gate(w, h)
    units = choose_units(gate, capacity)
    expected = reference.unit_mlp_sparse(w, h, gate, units)
    monkeypatch.setattr(ops, "unit_mlp_sparse", lambda *a: pytest.fail("the torch path ran, not the kernels"))
    got = run_triton(ops.unit_mlp, h, gate, units, w)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    w.w_out_t = w.w_out.t().contiguous()  # the block's unit-major copy is used as it is
    torch.testing.assert_close(run_triton(ops.unit_mlp, h, gate, units, w), expected, rtol=1e-4, atol=1e-5)


def test_unit_gemv_kernels_in_bf16():
    from elastilab_kernels import reference
    w = make_mlp("swiglu", "silu").to(torch.bfloat16)
    h = rand(2, D, seed=7, dtype=torch.bfloat16)
    gate = mlp.mlp_gate(w, h)
    units = choose_units(gate, 0.5)
    got = run_triton(ops.unit_mlp, h, gate, units, w)
    expected = reference.unit_mlp_sparse(w.to(torch.float32), h.float(), gate.float(), units)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=3e-2, atol=3e-2)
