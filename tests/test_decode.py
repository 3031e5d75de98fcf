"""The decode gather paths (a few rows, no grad: routing.GATHER_ROWS): head routing projects and attends
only each row's chosen heads with no loop over heads, mlp_units reads only the chosen units' rows of the down
projection (and on a CPU computes the whole up projection, faster there than a sampled product). On every
causal LM family, a cached decode step gives the same logits as the batched paths (forced by
GATHER_ROWS = 0), and the measured FLOPs match the analytic count."""
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.adapters import find_adapter
from elastilab.core import routing
from elastilab.core.compute import measure_flops

LMS = [name for name in CASES if set(CASES[name]().inputs) == {"input_ids"} and CASES[name]().causal]
POINTS = [{"attn_heads": 0.5}, {"attn_heads": 0.75, "mlp_units": 0.5}]


def _decode_step(em, ids):
    """Logits and measured FLOPs of the last token's step after a cached prefill of the others (prefilled
    anew for each: the routed layers remember the positions of the keys they cached)."""
    step = lambda fn: fn(em, input_ids=ids[:, -1:], cache=_prefill(em, ids), use_cache=True)
    with torch.no_grad():
        return step(lambda em, **kw: em(**kw).logits), step(measure_flops)


def _prefill(em, ids):
    return em(input_ids=ids[:, :-1], use_cache=True).cache


@pytest.mark.parametrize("name", LMS)
@pytest.mark.parametrize("point", POINTS, ids=lambda p: "+".join(p))
@pytest.mark.parametrize("batch", [1, 2])
def test_a_decode_step_takes_the_gather_path_with_the_batched_paths_values_and_flops(name, point, batch,
                                                                                     monkeypatch):
    case = CASES[name]()
    adapter = find_adapter(case.model)
    if unsupported := [c for c in point if c not in adapter.components]:
        pytest.skip(f"{name} does not support {unsupported}: {adapter.why_not.get(unsupported[0], '')}")
    em = el.elastify(case.model, el.ElasticConfig(**point))
    ids = case.inputs["input_ids"][:1].repeat(batch, 1)
    ids[-1] = ids[-1].flip(0)  # rows that choose differently
    fast, fast_flops = _decode_step(em, ids)
    assert all("w_o" in b._copies for b in em.blocks)  # the gather path ran in every layer
    monkeypatch.setattr(routing, "GATHER_ROWS", 0)
    slow, slow_flops = _decode_step(em, ids)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    for part in ("attention", "mlp"):
        assert fast_flops[part] == pytest.approx(fast_flops["analytic_" + part], rel=0.02)
    if batch == 1:  # the batched head path pads rows that chose other heads; one row has no padding
        assert fast_flops["attention"] == slow_flops["attention"]
    else:
        assert fast_flops["attention"] <= slow_flops["attention"]
    with em.capacity(**{c: 1.0 for c in point}):  # and the routed step did skip work: fewer FLOPs than dense
        dense = _decode_step(em, ids)[1]
    assert fast_flops["attention"] < dense["attention"]
    if "mlp_units" not in point:
        assert fast_flops["mlp"] == slow_flops["mlp"]
    elif find_adapter(case.model).block_spec(em.blocks[0].base_layer, 0).mlp.kind == "swiglu":
        # a decode step computes the whole up projection (ops.unit_up_is_whole): counted, and still less than dense
        assert slow_flops["mlp"] < fast_flops["mlp"] < dense["mlp"]
    else:  # GELU: the gate is the hidden unit, nothing more to compute
        assert fast_flops["mlp"] == slow_flops["mlp"] < dense["mlp"]


def test_greedy_generation_with_the_gather_paths_matches_the_batched_paths(monkeypatch):
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(attn_heads=0.5, mlp_units=0.5))
    ids = case.inputs["input_ids"][:1]
    fast = case.generate(em, ids, 6)
    monkeypatch.setattr(routing, "GATHER_ROWS", 0)
    assert torch.equal(fast, case.generate(em, ids, 6))
