"""Cheaper mlp_units choice (issue 18): a low-rank gate predictor (lowrank_gate) and the two-stage choice
(two_stage) run only the chosen units' projections; their choosing work is counted exactly as the analytic
count says; capacity 1.0 is the teacher; the choice is per token, so causal and exact with a KV cache."""
import math

import pytest
import torch
import torch.nn.functional as F
from model_cases import CASES

import elastilab as el
from elastilab.core.compute import measure_flops
from elastilab.core.routing import n_kept
from elastilab.core.spec import ACTIVATIONS, mlp_hidden
from elastilab.core.unit_plan import UnitPlan, pre_gate_weights, unit_mlp_planned
from elastilab.scorers.unit_choice import (
    LowRankGate,
    TwoStage,
    clear_unit_predictors,
    fit_unit_predictors,
    lowrank_factors,
    predictor,
)

FAMILIES = ["llama", "llama_biases", "gpt2", "hf_dinov2"]  # SwiGLU, gate bias, GELU, LayerScale


def masked_mlp(w, h, keep):
    """The definition: the dense MLP with every unchosen hidden unit set to 0."""
    y = F.linear(mlp_hidden(w, h) * keep, w.w_out)
    return y if w.b_out is None else y + w.b_out


def elastic(name, capacity=1.0):
    torch.manual_seed(0)
    case = CASES[name]()
    return case, el.elastify(case.model, el.ElasticConfig(mlp_units=capacity))


def keep_mask(units, width):
    return torch.zeros(units.shape[0], width).scatter_(1, units, 1.0)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_plan_computes_exactly_its_units(name):
    _, em = elastic(name)
    w = em.blocks[-1]._spec().mlp
    h = torch.randn(5, w.w_in.shape[1])
    units = torch.stack([torch.randperm(w.width)[:w.width // 3] for _ in range(5)])  # unsorted, per row
    keep = keep_mask(units, w.width)
    with torch.no_grad():
        torch.testing.assert_close(unit_mlp_planned(w, h, UnitPlan(units)), masked_mlp(w, h, keep),
                                   rtol=1e-4, atol=1e-5)
        given = mlp_hidden(w, h).gather(1, units)  # hidden values handed over: only the down projection runs
        torch.testing.assert_close(unit_mlp_planned(w, h, UnitPlan(units, given)), masked_mlp(w, h, keep),
                                   rtol=1e-4, atol=1e-5)
        assert (masked_mlp(w, h, keep) - masked_mlp(w, h, torch.ones_like(keep))).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_the_choices_follow_their_definitions(name):
    _, em = elastic(name, 0.5)
    b = em.blocks[1]
    spec = b._spec()
    w, h = spec.mlp, torch.randn(6, spec.mlp.w_in.shape[1])
    p = predictor(b)
    z = h @ p.A.T @ p.B.T
    if pre_gate_weights(w)[1] is not None:
        z = z + pre_gate_weights(w)[1]
    norms = (w.w_out.t() * (1 if spec.ls2 is None else spec.ls2)).norm(dim=-1)
    predicted = ACTIVATIONS[w.act](z).abs() * norms
    k = n_kept(0.5, w.width)
    rows = torch.arange(6)
    with torch.no_grad():
        plan = LowRankGate()(el.scorers.Candidates(b, "mlp_units", h, rows))
        assert plan.hidden is None
        assert torch.equal(keep_mask(plan.units, w.width), keep_mask(predicted.topk(k, -1).indices, w.width))
        plan = TwoStage(candidates=1.5)(el.scorers.Candidates(b, "mlp_units", h, rows))
    cand = keep_mask(predicted.topk(math.ceil(1.5 * k), -1).indices, w.width)
    exact = mlp_hidden(w, h)
    oracle = (exact.abs() * norms).masked_fill(cand == 0, -1.0)  # the oracle's criterion among the candidates
    assert torch.equal(keep_mask(plan.units, w.width), keep_mask(oracle.topk(k, -1).indices, w.width))
    torch.testing.assert_close(plan.hidden, exact.gather(1, plan.units), rtol=1e-4, atol=1e-5)


# test_scorers' families (windows, post-norms, no CLS) and a gate bias
@pytest.mark.parametrize("name", FAMILIES + ["hf_vit_cls", "gemma3", "siglip", "clip"])
@pytest.mark.parametrize("scorer", ["lowrank_gate", "two_stage"])
def test_measured_compute_is_the_analytic_count(name, scorer):
    case, em = elastic(name)
    with torch.no_grad():
        dense = measure_flops(em, **case.inputs)
        with em.capacity(mlp_units=0.5), em.scoring(scorer):
            f = measure_flops(em, **case.inputs)
    w = em.blocks[0]._spec().mlp
    d, width, r = w.w_in.shape[1], w.width, predictor(em.blocks[0]).rank
    rows = case.inputs[next(iter(case.inputs))].shape[0] * em.blocks[0].counts["T"]
    k, swiglu, layers = n_kept(0.5, width), w.kind == "swiglu", len(em.blocks)
    scoring = 2 * rows * r * (d + width)          # the predictor B (A h)
    mats = 3 if swiglu else 2                     # the MLP runs gate, up, down (GELU: in, down) of k units
    if scorer == "two_stage":                     # candidates' gate (and up); the MLP only the down projection
        scoring += 2 * rows * math.ceil(TwoStage().candidates * k) * d * (2 if swiglu else 1)
        mats = 1
    assert f["routers"] == f["analytic_routers"] == layers * scoring
    assert f["mlp"] == f["analytic_mlp"] == layers * 2 * rows * k * d * mats
    assert f["total"] == dense["total"] - dense["mlp"] + f["mlp"] + f["routers"]
    assert f["total"] < dense["total"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("scorer", ["lowrank_gate", "two_stage"])
def test_capacity_one_is_the_teacher(name, scorer):
    case, em = elastic(name)
    with torch.no_grad(), em.routers_disabled():
        teacher = case.output(em(**case.inputs))
    with torch.no_grad():
        dense = case.output(em(**case.inputs))  # the routed path at capacity 1 (GPT-2: rounding off the teacher)
    torch.testing.assert_close(dense, teacher, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), em.scoring(scorer):
        assert torch.equal(case.output(em(**case.inputs)), dense)
        with em.capacity(mlp_units=1.0 - 1e-7):  # routed, every unit kept: the teacher up to rounding
            torch.testing.assert_close(case.output(em(**case.inputs)), teacher, rtol=1e-4, atol=1e-5)
        with em.capacity(mlp_units=0.5):
            assert (case.output(em(**case.inputs)) - teacher).abs().max() > 1e-3


@pytest.mark.parametrize("scorer", ["lowrank_gate", "two_stage"])
def test_causal_and_exact_with_a_kv_cache(scorer):
    case, em = elastic("llama", 0.5)
    ids = torch.randint(0, 101, (2, 12))
    later = ids.clone()
    later[:, 8:] = torch.randint(0, 101, (2, 4))
    with torch.no_grad(), em.scoring(scorer):
        a, b = em(ids).logits, em(later).logits
        assert torch.equal(a[:, :8], b[:, :8])          # a later token never changes an earlier output
        assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3
        out = case.generate(em, ids[:1], 6)             # decode steps: one row each, the gather paths
        recomputed = em(out[:, :-1], use_cache=False).logits
    assert torch.equal(recomputed[0, 11:].argmax(-1), out[0, 12:])


def test_fitted_predictor_is_best_on_its_calibration_rows():
    _, em = elastic("llama")
    ids = torch.randint(0, 101, (6, 16))
    moments = {}
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a, i=b.layer_idx: moments.setdefault(i, []).append(a[1]))
             for b in em.blocks]
    with torch.no_grad():
        em(ids)
    for hk in hooks:
        hk.remove()
    svd = [predictor(b) for b in em.blocks]
    fit = fit_unit_predictors(em, ids, batch_size=4)
    assert fit["rank"] == svd[0].rank and 0 < fit["r2"] < 1
    for b, plain in zip(em.blocks, svd):
        hs = torch.cat(moments[b.layer_idx]).reshape(-1, 64)
        W = pre_gate_weights(b._spec().mlp)[0]
        err = lambda p: (hs @ (W - p.B @ p.A).T).pow(2).sum()
        fitted = predictor(b)
        assert fitted.fitted and err(fitted) < err(plain)   # the whitened fit beats the weights' SVD on its data
    with torch.no_grad():
        W = em.blocks[0]._spec().mlp.w_gate
        W.mul_(1.0)  # a new weight version: the fitted factors no longer describe it
    with pytest.raises(ValueError, match="layer 0: the MLP weights changed since fit_unit_predictors"):
        predictor(em.blocks[0])
    clear_unit_predictors(em)
    assert not predictor(em.blocks[0]).fitted


def test_lowrank_factors_are_the_truncated_svd():
    W = torch.randn(12, 8)
    A, B = lowrank_factors(W, 8)
    torch.testing.assert_close(B @ A, W, rtol=1e-4, atol=1e-4)  # full rank: W itself
    A, B = lowrank_factors(W, 3)
    S = torch.linalg.svdvals(W)
    assert (W - B @ A).norm() == pytest.approx(S[3:].norm().item(), rel=1e-4)  # Eckart-Young


def test_bad_input_is_refused_clearly():
    case, em = elastic("llama")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LowRankGate(rank=0)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        TwoStage(candidates=0.5)
    with pytest.raises(ValueError, match="scorer 'two_stage' does not support attn_heads; it supports mlp_units"):
        TwoStage().check(em, "attn_heads")
    with pytest.raises(ValueError, match="inputs must be a non-empty batch tensor"):
        fit_unit_predictors(em, torch.zeros(0, 4, dtype=torch.long))
    torch.manual_seed(0)
    heads = el.elastify(CASES["llama"]().model, el.ElasticConfig(attn_heads=1.0))
    with pytest.raises(ValueError, match="fit_unit_predictors needs mlp_units elastic"):
        fit_unit_predictors(heads, torch.randint(0, 101, (2, 8)))


def test_cli_frontier_fits_the_predictors_on_calibration_text(tmp_path, capsys):
    import json

    from elastilab.cli.main import main
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    assert main(["frontier", "--text", str(text), "--components", "mlp_units", "--capacities", "0.5",
                 "--scorers", "lowrank_gate,two_stage", "--blocks", "1", "--seq-len", "32", "--split", "all",
                 "--calibrate", str(text), "--json"]) == 0  # (a test may calibrate on what it reports)
    captured = capsys.readouterr()
    assert "unit predictors fitted on" in captured.err and "rank 64" in captured.err
    rows = [r for r in json.loads(captured.out)["rows"] if r["capacity"] == 0.5]
    assert {r["scorer"] for r in rows} == {"lowrank_gate", "two_stage"}
    assert all(r["scoring_cost"] > 0 and r["model_compute"] < 1 for r in rows)  # the choosing is counted
    assert main(["frontier", "--model", "dinov2-small", "--calibrate", str(text), "--components", "mlp_units"]) == 2
    assert "--calibrate fits the unit predictors of language models" in capsys.readouterr().err
