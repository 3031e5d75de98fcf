"""mlp_units: single MLP hidden units per token, chosen by the gate activations the MLP computes anyway
(CATS-style), with only the chosen units' up and down projections computed."""
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.core.compute import measure_flops
from elastilab.core.routing import n_kept
from elastilab.core.spec import mlp_gate, mlp_hidden
from elastilab_kernels import ops

FAMILIES = ["llama", "llama_biases", "gpt2", "hf_dinov2", "timm_vit"]


def masked_mlp(w, h, keep):
    """The definition: the dense MLP with every unchosen hidden unit set to 0."""
    y = torch.nn.functional.linear(mlp_hidden(w, h) * keep, w.w_out)
    return y if w.b_out is None else y + w.b_out


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("capacity", [0.75, 0.5, 0.25])
def test_each_token_computes_its_largest_gate_units_only(name, capacity):
    case = CASES[name]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_units=capacity))
    block = em.blocks[-1]
    spec = block._spec()
    h = torch.randn(7, spec.mlp.w_in.shape[1])
    with torch.no_grad():
        y = block.mlp(spec.mlp, h, units=(capacity, None))
        gate = mlp_gate(spec.mlp, h)
    k = n_kept(capacity, spec.mlp.width)
    keep = torch.zeros_like(gate, dtype=torch.bool).scatter_(1, gate.abs().topk(k, -1).indices, True)
    torch.testing.assert_close(y, masked_mlp(spec.mlp, h, keep), rtol=1e-4, atol=1e-5)
    # the skipped units mattered: the output is not the dense one
    assert (y - masked_mlp(spec.mlp, h, torch.ones_like(keep))).abs().max() > 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_only_the_chosen_units_are_computed(name):
    """Measured FLOPs: the whole gate projection plus the other projections for k of F units."""
    case = CASES[name]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_units=1.0))
    dense = measure_flops(em, **case.inputs)["mlp"]
    spec = em.blocks[0]._spec()
    n_mat = 3 if spec.mlp.kind == "swiglu" else 2
    for capacity in (0.5, 0.25):
        em.set_capacity(mlp_units=capacity)
        f = measure_flops(em, **case.inputs)
        expected = (1 + (n_mat - 1) * capacity) / n_mat  # gate always; the rest for the chosen units
        assert f["mlp"] == pytest.approx(expected * dense, rel=0.02)
        assert f["mlp"] == pytest.approx(f["analytic_mlp"], rel=0.02) and f["routers"] == 0


def test_capacity_one_is_the_teacher_and_generation_with_cache_is_exact():
    case = CASES["llama"]()
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        teacher = case.model(ids).logits
    em = el.elastify(case.model, el.ElasticConfig(mlp_units=1.0))
    with torch.no_grad():
        assert torch.equal(em(ids).logits, teacher)
    em.set_capacity(mlp_units=0.5)
    with torch.no_grad():
        out = case.generate(em, ids, 6)  # per-token choices are causal: the KV cache changes nothing
        recomputed = em(out[:, :-1], use_cache=False).logits
    assert torch.equal(recomputed[0, 11:].argmax(-1), out[0, 12:])
    assert not em.router_parameters()  # nothing to train: the gate chooses


def test_scorers_choose_units_and_oracle_work_is_not_counted():
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_units=0.5))
    with torch.no_grad():
        base = em(**case.inputs).logits
        with em.scoring("magnitude"):  # the gate's own choice: identical, no scoring work
            assert torch.equal(em(**case.inputs).logits, base)
            assert measure_flops(em, **case.inputs)["routers"] == 0
        with em.scoring("random"):
            assert not torch.allclose(em(**case.inputs).logits, base)
        with em.scoring("oracle"):
            f = measure_flops(em, **case.inputs)
        assert f["oracle"] > 0 and f["routers"] == 0
        with em.scoring("taylor"):
            em(**case.inputs)
    assert not el.scorers.supports("learned", em, "mlp_units")


def test_router_training_alongside_units_matches_the_routed_forward():
    """The training estimator runs the same unit choice as the routed execution (same values)."""
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_units=0.5, attn_heads=0.5))
    ids = case.inputs["input_ids"]
    with torch.no_grad():
        routed = em(ids, use_cache=False).logits
    with em.training_estimator():
        estimated = em(ids, use_cache=False).logits
    torch.testing.assert_close(estimated, routed, rtol=1e-4, atol=1e-4)


def test_clear_errors():
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_units=0.5, mlp_experts=0.5, n_experts=4))
    with pytest.raises(ValueError, match="choose one MLP granularity"):
        em(**case.inputs)
    w = em.blocks[0]._spec().mlp
    h = torch.randn(3, w.w_in.shape[1])
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.unit_mlp(h, mlp_gate(w, h), torch.zeros(3, 2, dtype=torch.long), w, backend="cuda")
    with pytest.raises(ValueError, match="gate must be"):
        ops.unit_mlp(h, torch.zeros(3, 5), torch.zeros(3, 2, dtype=torch.long), w)


def test_a_budget_across_layers_is_allocated_without_routers_and_saved(tmp_path):
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_units=1.0))
    ids = case.inputs["input_ids"]
    schedule = el.allocate(em, "mlp_units", el.LMTask(ids), progress=False)
    assert schedule and {layer for layer, _ in schedule} <= {0, 1, 2}
    em.set_capacity(mlp_units=0.6)
    caps = em.layer_capacities["mlp_units"]
    assert sum(caps.values()) / len(caps) <= 0.6 + 1e-9 and min(caps.values()) < 0.6  # cuts by the schedule
    em.save_routers(tmp_path / "units")  # no router weights: the allocation is what is saved
    again = el.load_routers(em.unelastify(), tmp_path / "units")
    assert again.layer_capacities["mlp_units"] == caps


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_gather_path_equals_the_sparse_path_in_value_and_measured_flops(name, monkeypatch):
    """A few rows (a decode step) take the gather path (unit-major down projection, embedding_bag; the whole up
    projection); forced off (GATHER_ROWS = 0) the same rows take the sparse-matmul path: same output, and the
    FLOPs differ by the up projection of the units not chosen, each path's matching its analytic count."""
    from elastilab.core import routing
    case = CASES[name]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_units=0.5))
    inputs = {k: v[:1, :routing.GATHER_ROWS] if k == "input_ids" else v[:1] for k, v in case.inputs.items()}
    block = em.blocks[-1]
    spec = block._spec()
    h = torch.randn(3, spec.mlp.w_in.shape[1])
    with torch.no_grad():
        sparse = block.mlp(spec.mlp, h, units=(0.5, None))
        spec.mlp.w_out_t = block._transposed("w_out", spec.mlp.w_out)
        gathered = block.mlp(spec.mlp, h, units=(0.5, None))
    torch.testing.assert_close(gathered, sparse, rtol=1e-5, atol=1e-5)
    if not case.causal:  # a ViT forward has more rows than a decode step: the model-level check is for LMs
        return
    block._copies.clear()
    with torch.no_grad():
        fast_out, fast = case.output(em(**inputs)), measure_flops(em, **inputs)
    assert block._copies  # the unit-major copy was made: the gather path ran
    monkeypatch.setattr(routing, "GATHER_ROWS", 0)
    with torch.no_grad():
        slow_out, slow = case.output(em(**inputs)), measure_flops(em, **inputs)
    torch.testing.assert_close(fast_out, slow_out, rtol=1e-4, atol=1e-5)
    assert fast["mlp"] == pytest.approx(fast["analytic_mlp"], rel=0.02)
    assert slow["mlp"] == pytest.approx(slow["analytic_mlp"], rel=0.02)
    # SwiGLU: the decode step computes the whole up projection (ops.unit_up_is_whole); GELU has none to compute
    extra = 2 * inputs["input_ids"].numel() * spec.mlp.width * spec.mlp.w_in.shape[1] // 2 * len(em.blocks)
    assert fast["mlp"] - slow["mlp"] == (extra if spec.mlp.kind == "swiglu" else 0)
