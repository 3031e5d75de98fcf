"""One compute knob for the whole model (elastilab.global_budget): the measured compute meets the
request within one cut, a smaller budget contains the larger one's cuts, the cheapest layers are cut
first, the schedule travels with the routers, and capacity 1.0 is the teacher."""
import json

import pandas as pd
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.core.compute import measure_flops
from elastilab.core.cut_costs import cut_levels
from elastilab.core.global_budget import capacities_for, schedule_table, set_model_allocation

ALL = dict(attn_tokens=1.0, mlp_tokens=1.0, attn_heads=1.0, mlp_units=1.0)


def _allocated(name="llama", costly=False, **components):
    torch.manual_seed(0)
    case = CASES[name]()
    if costly:  # layer 1's MLP writes ten times more into the residual stream than the others
        with torch.no_grad():
            case.model.model.layers[1].mlp.down_proj.weight.mul_(10.0)
    em = el.elastify(case.model, el.ElasticConfig(**(components or ALL)))
    task = el.LMTask(torch.randint(0, 101, (2, 16)))
    steps = el.allocate(em, task, budget="model", step=0.25, progress=False)
    return case, em, task, steps


def _compute(em, task):
    args, kwargs = task.measure_input(em)
    with em.capacity(**{c: 1.0 for c in em.capacities}):
        dense = measure_flops(em, *args, **kwargs)["total"]
    return measure_flops(em, *args, **kwargs)["total"] / dense


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_measured_compute_meets_the_request_within_one_cut(name):
    case, em, task, steps = _allocated(name)
    assert {c for _, c, _, _ in steps} >= {"attn_heads", "mlp_units", "mlp_tokens"}
    computes = [s[3] for s in steps]
    assert all(a > b for a, b in zip([1.0] + computes, computes))  # every cut saves FLOPs
    for target in (0.97, 0.9, 0.8, 0.7, 0.6):
        em.set_compute(target)
        measured = _compute(em, task)
        per_layer, predicted = capacities_for(em, target)
        n_cuts = sum(len(v) for v in per_layer.values())
        assert measured == pytest.approx(predicted, rel=1e-9)  # the table is the counter's own count
        assert measured <= target + 1e-9
        before = 1.0 if n_cuts <= 1 else steps[n_cuts - 2][3]  # the compute one cut earlier
        assert before > target  # no cut more than needed
        assert em.elastic_config.compute == target
        assert em.capacities["mlp_units"] == pytest.approx(
            sum(em.layer_capacities["mlp_units"].values()) / len(em.blocks))  # the knob shows the mean


def test_a_smaller_budget_contains_the_larger_budgets_cuts():
    _, em, _, steps = _allocated()
    prev = None
    for target in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, steps[-1][3]):
        em.set_compute(target)
        caps = em.layer_capacities
        if prev is not None:
            assert all(caps[c][i] <= prev[c][i] for c in caps for i in caps[c])
        prev = caps
    assert any(v < 1.0 for layers in prev.values() for v in layers.values())
    table = schedule_table(em)
    assert list(table.columns) == ["step", "layer", "component", "capacity", "compute"]
    assert len(table) == len(steps)


def test_the_costly_layer_is_cut_last():
    _, em, _, steps = _allocated(costly=True, mlp_units=1.0)
    assert cut_levels(em, "mlp_units", 0.25) == [1.0, 0.75, 0.5, 0.25]
    order = [(layer, cap) for layer, _, cap, _ in steps]
    assert order.index((1, 0.75)) > max(order.index((0, 0.25)), order.index((2, 0.25)))
    em.set_compute(0.85)
    caps = em.layer_capacities["mlp_units"]
    assert caps[1] == 1.0 and min(caps.values()) < 1.0


def test_head_levels_are_whole_heads():
    _, em, _, _ = _allocated(attn_heads=1.0)
    assert cut_levels(em, "attn_heads", 0.25) == [1.0, 0.75, 0.5, 0.25]  # 4 heads
    assert cut_levels(em, "attn_heads", 0.5) == [1.0, 0.5]  # a step that does not divide 0.75 stops above LOWEST
    assert cut_levels(em, "attn_heads", 0.125, wanted=(0.8, 0.625, 0.4)) == [1.0, 0.75, 0.5]  # nearest k/4, ties up


def test_capacity_one_is_the_teacher():
    case, em, task, _ = _allocated()
    em.set_compute(0.8)
    em.set_compute(1.0)
    assert all(v == 1.0 for layers in em.layer_capacities.values() for v in layers.values())
    assert _compute(em, task) == 1.0
    with torch.no_grad():
        out = case.output(em(**case.inputs))
        with em.routers_disabled():
            teacher = case.output(em(**case.inputs))
    assert (out - teacher).abs().max().item() <= 1e-4  # (the suite's bound for the routed path at 1.0)


def test_the_schedule_and_the_knob_are_saved_with_the_routers(tmp_path):
    case, em, _, steps = _allocated()
    em.set_compute(0.8)
    caps = em.layer_capacities
    with torch.no_grad():
        out = case.output(em(**case.inputs))
    em.save_routers(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "routers.json").read_text())
    assert meta["elastic_config"]["compute"] == 0.8 and len(meta["elastic_config"]["model_allocation"]) == len(steps)
    em.unelastify()
    back = el.load_routers(case.model, tmp_path / "r")
    assert back.elastic_config.model_allocation == tuple(steps)
    assert back.elastic_config.compute == 0.8 and back.layer_capacities == caps
    with torch.no_grad():
        assert torch.equal(case.output(back(**case.inputs)), out)
    back.set_compute(0.9)  # the knob moves after loading
    assert back.layer_capacities != caps


def test_component_knobs_and_the_whole_model_knob():
    _, em, task, _ = _allocated()
    em.set_compute(0.8)
    caps = em.layer_capacities
    with em.capacity(attn_heads=0.5):  # a temporary change, then back to the whole-model knob's layers
        assert em.elastic_config.compute is None
    assert em.elastic_config.compute == 0.8 and em.layer_capacities == caps
    _compute(em, task)  # (compute_report-style measurements restore it too)
    assert em.layer_capacities == caps
    em.set_capacity(mlp_units=0.5)  # a component knob leaves the whole-model knob
    assert em.elastic_config.compute is None
    assert set(em.layer_capacities["mlp_units"].values()) == {0.5}


def test_clear_errors():
    torch.manual_seed(0)
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(attn_heads=1.0, mlp_units=1.0))
    task = el.LMTask(torch.randint(0, 101, (2, 8)))
    with pytest.raises(ValueError, match="no whole-model schedule yet"):
        em.set_compute(0.8)
    with pytest.raises(TypeError, match="budget='model' allocates every routed component"):
        el.allocate(em, "attn_heads", task, budget="model")
    with pytest.raises(ValueError, match="budget must be 'layers'"):
        el.allocate(em, "attn_heads", task, budget="all")
    with pytest.raises(ValueError, match="mlp_tokens not routed"):
        el.allocate(em, task, budget="model", components=["mlp_tokens"])
    with pytest.raises(ValueError, match="not an elastic layer component"):
        set_model_allocation(em, [(0, "mlp_tokens", 0.5, 0.9)])
    with pytest.raises(ValueError, match="has 3 layers"):
        set_model_allocation(em, [(5, "attn_heads", 0.5, 0.9)])
    el.allocate(em, task, budget="model", step=0.25, progress=False)
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"compute must be in \(0, 1\]"):
            em.set_compute(bad)
    for bad in ("0.8", None, True, float("nan")):
        with pytest.raises(TypeError, match="compute must be a number"):
            em.set_compute(bad)
    lowest = em.elastic_config.model_allocation[-1][3]
    with pytest.raises(ValueError, match="below the least the schedule reaches"):
        em.set_compute(lowest / 2)
    assert em.elastic_config.compute is None  # a failed call changed nothing
    assert set(em.layer_capacities["attn_heads"].values()) == {1.0}


def test_cli_frontier_allocate_model(tmp_path, capsys):
    from test_frontier import _save_char_tokenizer

    from elastilab.cli.main import main
    torch.manual_seed(0)
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    CASES["llama"]().model.save_pretrained(tmp_path / "llama")
    _save_char_tokenizer(tmp_path / "llama", text.read_text())
    args = ["frontier", "--model", str(tmp_path / "llama"), "--text", str(text),
            "--components", "attn_heads,mlp_units", "--capacities", "0.5", "--scorers", "magnitude,oracle",
            "--blocks", "2", "--seq-len", "24",
            "--split", "all", "--allocate-model", str(text), "--calibration-blocks", "2", "--computes", "0.9,0.8",
            "--levels", "0.75,0.5", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "saving@1.05" in out
    df = pd.read_csv(tmp_path / "out" / "frontier.csv")
    model = df[df.component == "model"]
    lines = {("magnitude", "model"), ("oracle", "model"), ("oracle", "model, magnitude schedule")}
    assert set(zip(model.scorer, model.allocation)) == lines
    routed = model[model.capacity < 1]
    assert (routed.model_compute <= routed.capacity + 1e-9).all() and (routed.model_compute < 1).all()
    own = routed[routed.allocation == "model"]  # a schedule's compute is its chooser's (the oracle's work is free)
    assert ((own.model_compute - own.predicted_compute).abs() < 1e-9).all()
    assert set(df[df.component != "model"].component) == {"attn_heads", "mlp_units"}
    assert df.command.iloc[0].startswith("elastilab frontier") and "--allocate-model" in df.command.iloc[0]
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0
    assert len(list((tmp_path / "out" / "costs-oracle").glob("*.json"))) == 6  # 3 layers x 2 components
    assert main(args) == 0  # again: every cost comes from the cache
    again = pd.read_csv(tmp_path / "out" / "frontier.csv")
    assert again.ppl_ratio.tolist() == df.ppl_ratio.tolist()


def test_check_schedule_compares_the_summed_costs_with_a_measurement():
    from elastilab.core.global_budget import check_schedule
    _, em, task, _ = _allocated(mlp_units=1.0)
    em.set_compute(0.9)
    caps = em.layer_capacities
    rows = check_schedule(em, task, computes=(1.0, 0.8))
    assert rows[0]["summed_costs"] == 0.0 and rows[0]["measured"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["predicted_compute"] <= 0.8 and rows[1]["measured"] > 0 and rows[1]["summed_costs"] > 0
    assert em.layer_capacities == caps and em.elastic_config.compute == 0.9  # the model as it was
