"""A compute budget allocated across layers (elastilab.core.budget): the cheapest layers are cut first,
the measured compute follows the budget, and the allocation is saved with the routers."""
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.core.budget import capacities_at, greedy_schedule
from elastilab.core.compute import measure_flops

LEVELS = [1.0, 0.75, 0.5, 0.25]


def test_greedy_cuts_the_cheapest_loss_per_compute_first():
    costs = {0: [0, 5.0, 9.0, 20.0], 1: [0, 0.1, 0.2, 0.3], 2: [0, 1.0, 1.1, 1.2]}
    steps = greedy_schedule(costs, LEVELS)
    assert steps[:3] == [(1, 0.75), (1, 0.5), (1, 0.25)]  # the flat layer goes first, all the way
    assert steps[3] == (2, 0.25)  # a bent curve: one jump to the bottom beats stopping at 0.75
    assert steps[-1] == (0, 0.25) and len({layer for layer, _ in steps}) == 3


def test_noisy_costs_never_make_a_deeper_cut_look_free():
    steps = greedy_schedule({0: [0, 2.0, 0.1, 5.0], 1: [0, 0.5, 1.0, 1.5]}, LEVELS)
    assert steps[0] == (1, 0.75)  # layer 0's 0.1 at 0.5 is noise below its 2.0 at 0.75, not a bargain


def test_budgets_are_nested_and_their_mean_is_the_budget():
    steps = greedy_schedule({0: [0, 5.0, 9.0, 20.0], 1: [0, 0.1, 0.2, 0.3], 2: [0, 1.0, 1.1, 1.2]}, LEVELS)
    prev = None
    for budget in (1.0, 0.9, 0.75, 0.5, 0.3):
        caps = capacities_at(steps, [0, 1, 2], budget)
        assert sum(caps.values()) / 3 <= budget + 1e-9
        if prev is not None:
            assert all(caps[i] <= prev[i] for i in caps)  # a smaller budget only adds cuts
        prev = caps
    assert capacities_at(steps, [0, 1, 2], 1.0) == {0: 1.0, 1: 1.0, 2: 1.0}
    pinned = capacities_at(steps, [0, 1, 2], 0.5, pinned={1})
    assert pinned[1] == 1.0 and sum(pinned.values()) / 3 <= 0.5 + 1e-9  # the others pay for it
    low = capacities_at(steps, [0, 1, 2], 0.1)  # below the schedule's end the knob keeps going
    assert sum(low.values()) / 3 == pytest.approx(0.1)


def _costly_layer_case():
    """A tiny Llama whose layer 1 MLP writes ten times more into the residual stream than the others."""
    case = CASES["llama"]()
    with torch.no_grad():
        case.model.model.layers[1].mlp.down_proj.weight.mul_(10.0)
    return case


def test_allocate_protects_the_costly_layer_and_measured_compute_follows(tmp_path):
    torch.manual_seed(0)
    case = _costly_layer_case()
    em = el.elastify(case.model, el.ElasticConfig(mlp_experts=1.0, n_experts=4))
    calibration = torch.randint(0, 101, (4, 16))
    steps = el.allocate(em, "mlp_experts", el.LMTask(calibration), progress=False)
    assert em.elastic_config.allocation["mlp_experts"] == tuple(steps)
    assert steps[-1][0] == 1  # the costly layer is the last one cut to the bottom
    with torch.no_grad():
        dense = measure_flops(em, **case.inputs)["mlp"]
        em.set_capacity(mlp_experts=0.5)
        caps = em.layer_capacities["mlp_experts"]
        assert sum(caps.values()) / len(caps) <= 0.5 + 1e-9
        assert caps[1] == max(caps.values()) > min(caps.values())
        assert em.capacities["mlp_experts"] == 0.5  # the knob, while the view shows the layers
        measured = measure_flops(em, **case.inputs)["mlp"] - measure_flops(em, **case.inputs)["routers"]
        assert measured / dense == pytest.approx(sum(caps.values()) / len(caps), abs=0.02)
        out = case.output(em(**case.inputs))
    em.save_routers(tmp_path / "r")
    em.unelastify()
    back = el.load_routers(case.model, tmp_path / "r")
    assert back.layer_capacities == {"mlp_experts": caps}
    with torch.no_grad():
        assert torch.equal(case.output(back(**case.inputs)), out)
    back.set_allocation(mlp_experts=())  # one capacity for every layer again
    assert set(back.layer_capacities["mlp_experts"].values()) == {0.5} and not back.elastic_config.allocation


def test_allocation_beats_one_capacity_on_the_costly_layer_model():
    torch.manual_seed(0)
    case = _costly_layer_case()
    em = el.elastify(case.model, el.ElasticConfig(mlp_experts=1.0, n_experts=4))
    task = el.LMTask(torch.randint(0, 101, (4, 16)))
    with em.capacity(mlp_experts=0.5):
        uniform = task.distance(em)
    el.allocate(em, "mlp_experts", task, progress=False)
    with em.capacity(mlp_experts=0.5):
        budget = task.distance(em)
    assert budget < uniform


def test_bad_allocations_are_clear_errors():
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_experts=0.5, n_experts=4))
    with pytest.raises(ValueError, match="not an elastic layer component"):
        em.set_allocation(attn_heads=[(0, 0.5)])
    with pytest.raises(ValueError, match=r"list of \(layer, capacity\) pairs"):
        em.set_allocation(mlp_experts=[0.5, 0.25])
    with pytest.raises(ValueError, match="has 3 layers"):
        em.set_allocation(mlp_experts=[(7, 0.5)])
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        em.set_allocation(mlp_experts=[(0, 1.5)])
    with pytest.raises(ValueError, match="not elastic in this model"):
        el.allocate(em, "mlp_tokens", el.LMTask(torch.randint(0, 101, (2, 8))), progress=False)
    assert em.layer_capacities == {"mlp_experts": {0: 0.5, 1: 0.5, 2: 0.5}}  # a failed call changed nothing


def test_frontier_skips_a_scorer_the_allocation_takes_out_of_range():
    """ToMe merges at most half the tokens per step: where a budget cuts a layer below 0.5 the frontier
    skips that point (and says so) instead of failing."""
    case = CASES["hf_dinov2"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=1.0))
    n = len(em.blocks)
    em.set_allocation(mlp_tokens=[(i, 0.25) for i in range(n)])  # every layer straight to 0.25
    df = el.frontier(em, el.ViTTask(case.inputs["pixel_values"]), capacities=(0.875, 0.5),
                     scorers=("random", "tome"), progress=False)
    assert set(df[df.scorer == "random"].capacity) == {1.0, 0.875, 0.5}
    assert ("tome", "mlp_tokens at 0.5") in df.attrs["skipped"]
    assert (df.allocation == "budget").all()
