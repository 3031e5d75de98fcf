"""A recommended point per target quality (elastilab.core.recommend): the least measured whole-model compute
whose calibration quality meets the target (checked against a brute-force evaluation of the same levels),
saved with the routers and read back, clear errors, and nothing changes without one."""
import json

import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.core.compute import measure_flops
from elastilab.core.recommend import compute_levels, recommend, use_recommended

ALL = dict(attn_heads=1.0, mlp_units=1.0, mlp_tokens=1.0)


def _allocated():
    torch.manual_seed(0)
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(**ALL))
    calibration = el.LMTask(torch.randint(0, 101, (2, 16)))
    el.allocate(em, calibration, budget="model", step=0.25, progress=False)
    return case, em, calibration


def _brute_force(em, task, compute):
    """Quality and measured compute of the knob at ``compute``, evaluated here from scratch."""
    args, kwargs = task.measure_input(em)
    with em.capacity(**{c: 1.0 for c in em.capacities}):
        dense = measure_flops(em, *args, **kwargs)["total"]
    em.set_compute(compute)
    return task.evaluate(em)["quality"], measure_flops(em, *args, **kwargs)["total"] / dense


def test_the_least_compute_meeting_each_target_on_the_data_given():
    _, em, calibration = _allocated()
    levels = compute_levels(em, 0.05)
    assert levels[0] == 1.0 and len(levels) > 3
    targets = (1.01, 1.05, 1.5, 1e9)
    rec, rows = recommend(em, calibration, targets=targets, computes=levels, data="random tokens")
    assert em.elastic_config.compute is None  # the model as it was: dense
    assert set(em.layer_capacities["attn_heads"].values()) == {1.0}
    truth = {c: _brute_force(em, calibration, c) for c in levels}
    assert [r["compute"] for r in rows] == levels
    for r in rows:
        assert r["quality"] == pytest.approx(truth[r["compute"]][0], rel=1e-6)
        assert r["model_compute"] == pytest.approx(truth[r["compute"]][1], rel=1e-9)
    dense = truth[1.0][0]
    for t in targets:
        ok = [c for c in levels if truth[c][0] <= dense * t + 1e-12]
        best = min(ok, key=lambda c: truth[c][1])
        point = rec[f"x{t:g}"]
        assert point["compute"] == best and point["model_compute"] == pytest.approx(truth[best][1])
        assert point["quality"] == pytest.approx(truth[best][0], rel=1e-6) and point["chosen_on"] == "random tokens"
    assert rec["x1e+09"]["model_compute"] == pytest.approx(min(v[1] for v in truth.values()))  # anything goes
    assert rec["x1e+09"]["model_compute"] < 1.0 and rec["x1.01"]["model_compute"] >= rec["x1.05"]["model_compute"]


def test_higher_is_better_quality_is_met_from_below():
    from elastilab.core.recommend import choose, meets
    assert meets(0.96, 1.0, 1.05, True) and not meets(0.95, 1.0, 1.05, True)
    assert meets(1.05, 1.0, 1.05, False) and not meets(1.06, 1.0, 1.05, False)
    rows = [{"compute": 1.0, "model_compute": 1.0, "quality": 1.0},
            {"compute": 0.9, "model_compute": 0.9, "quality": 0.97},
            {"compute": 0.8, "model_compute": 0.8, "quality": 0.995},  # not monotone: the least compute meeting it
            {"compute": 0.7, "model_compute": 0.7, "quality": 0.9}]
    picked = choose(rows, 1.0, (1.01, 1.05), higher_is_better=True)
    assert picked["x1.01"]["compute"] == 0.8 and picked["x1.05"]["compute"] == 0.8


def test_the_recommendation_travels_with_the_routers(tmp_path):
    case, em, calibration = _allocated()
    rec, _ = recommend(em, calibration, computes=compute_levels(em, 0.05), data="calibration")
    em.save_routers(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "routers.json").read_text())
    assert meta["recommended"] == json.loads(json.dumps(rec))
    em.unelastify()
    back = el.load_routers(case.model, tmp_path / "r")
    assert back.recommended == rec
    use_recommended(back, 1.05)
    assert back.elastic_config.compute == rec["x1.05"]["compute"]
    caps = back.layer_capacities
    back.set_compute(1.0)
    back.set_compute("x1.05")  # the same point by its name
    assert back.layer_capacities == caps
    _, measured = _brute_force(back, calibration, rec["x1.05"]["compute"])
    assert measured == pytest.approx(rec["x1.05"]["model_compute"])


def test_clear_errors_and_nothing_changes_without_a_recommendation(tmp_path):
    case, em, calibration = _allocated()
    em.save_routers(tmp_path / "plain")
    assert "recommended" not in json.loads((tmp_path / "plain" / "routers.json").read_text())
    with pytest.raises(ValueError, match="hold no recommended point"):
        use_recommended(em, 1.05)
    with pytest.raises(ValueError, match="hold no recommended point"):
        em.set_compute("x1.01")
    with pytest.raises(TypeError, match="compute must be a number"):
        em.set_compute("0.8")  # a number as text is still refused
    recommend(em, calibration, computes=(1.0, 0.8))
    with pytest.raises(ValueError, match=r"no recommended point for x1.2; recommended targets: x1.01, x1.05"):
        em.set_compute("x1.2")
    for bad in ("fast", 0.9, True, "x"):
        with pytest.raises(ValueError, match="a target is a quality factor >= 1"):
            use_recommended(em, bad)
    assert em.elastic_config.compute is None
    em.set_compute(1.0)  # capacity 1.0 is the teacher, recommendation or not
    with torch.no_grad():
        out = case.output(em(**case.inputs))
        with em.routers_disabled():
            teacher = case.output(em(**case.inputs))
    assert (out - teacher).abs().max().item() <= 1e-4
    el.allocate(em, calibration, budget="model", levels=(0.5,), progress=False)  # another schedule
    assert em.recommended is None  # the old points were chosen for the old one
    em.unelastify()
    back = el.load_routers(case.model, tmp_path / "plain")
    assert back.recommended is None
    meta = json.loads((tmp_path / "plain" / "routers.json").read_text())
    (tmp_path / "plain" / "routers.json").write_text(json.dumps({**meta, "recommended": {"x1.05": {"compute": 2}}}))
    back.unelastify()
    with pytest.raises(ValueError, match="'recommended' must map targets"):
        el.load_routers(case.model, tmp_path / "plain")


def test_cli_frontier_recommend(tmp_path, capsys):
    import pandas as pd
    from test_frontier import _save_char_tokenizer

    from elastilab.cli.main import main
    torch.manual_seed(0)
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    case = CASES["llama"]()
    case.model.save_pretrained(tmp_path / "llama")
    _save_char_tokenizer(tmp_path / "llama", text.read_text())
    el.elastify(case.model, el.ElasticConfig(attn_heads=1.0)).save_routers(tmp_path / "heads")
    args = ["frontier", "--model", str(tmp_path / "llama"), "--routers", str(tmp_path / "heads"), "--text", str(text),
            "--components", "attn_heads,mlp_units", "--capacities", "0.5", "--scorers", "learned",
            "--blocks", "2", "--seq-len", "24", "--split", "all", "--allocate-model", str(text),
            "--calibration-blocks", "2", "--computes", "0.9", "--levels", "0.75,0.5", "--no-oracle-schedule",
            "--recommend", "--targets", "1.01,1.05,100", "--recommend-step", "0.05", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "recommended points" in err and "held_out_quality" in err
    table = pd.read_csv(tmp_path / "out" / "recommended.csv")
    assert table.target.tolist() == ["x1.01", "x1.05", "x100"]
    assert "--recommend" in table.command.iloc[0] and {"date", "machine", "torch", "reported_on"} <= set(table)
    assert (table.calibration_quality <= table.target.str[1:].astype(float) + 1e-9).all()
    assert table.model_compute.iloc[2] < 1.0  # x100: anything goes, the least compute
    meta = json.loads((tmp_path / "out" / "routers" / "routers.json").read_text())
    assert set(meta["recommended"]) == {"x1.01", "x1.05", "x100"}
    assert meta["recommended"]["x100"]["held_out_quality"] == pytest.approx(table.held_out_quality.iloc[2])
    assert meta["elastic_config"]["model_allocation"]
    from transformers import AutoModelForCausalLM
    back = el.load_routers(AutoModelForCausalLM.from_pretrained(tmp_path / "llama"), tmp_path / "out" / "routers")
    back.set_compute("x100")
    assert back.elastic_config.compute == table.compute.iloc[2]
    capsys.readouterr()
    assert main(args[:args.index("--allocate-model")] + ["--recommend"]) == 2
    assert "--recommend chooses points of the whole-model knob" in capsys.readouterr().err

    # elastilab recommend: the same schedule, points chosen again on other calibration text
    other = tmp_path / "other.txt"
    other.write_text("A lazy dog sleeps. The brown fox jumps over it quickly. " * 20)
    again = ["recommend", "--model", str(tmp_path / "llama"), "--routers", str(tmp_path / "out" / "routers"),
             "--calibration", str(other), "--calibration-blocks", "2", "--text", str(text), "--blocks", "2",
             "--seq-len", "24", "--split", "all", "--targets", "1.01,100", "--recommend-step", "0.05",
             "--out", str(tmp_path / "again")]
    assert main(again) == 0
    meta2 = json.loads((tmp_path / "again" / "routers" / "routers.json").read_text())
    assert meta2["elastic_config"]["model_allocation"] == meta["elastic_config"]["model_allocation"]
    assert set(meta2["recommended"]) == {"x1.01", "x100"} and "other.txt" in meta2["recommended"]["x1.01"]["chosen_on"]
    table2 = pd.read_csv(tmp_path / "again" / "recommended.csv")
    assert table2.command.iloc[0].startswith("elastilab recommend") and table2.model_compute.iloc[1] < 1.0
    # x100 is the schedule's least compute whatever the calibration: the same point, the same held-out quality
    assert table2.compute.iloc[1] == table.compute.iloc[2]
    assert table2.held_out_quality.iloc[1] == pytest.approx(table.held_out_quality.iloc[2])
    capsys.readouterr()
    at = again.index("--routers") + 1
    assert main(again[:at] + [str(tmp_path / "heads")] + again[at + 1:]) == 2
    assert "holds no whole-model schedule" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["smollm2-135m-model", "dinov2-small-digits04-merge-model"])
def test_the_shipped_recommendations(folder):
    """The shipped points read back, meet their targets on the calibration data they were chosen on, and were
    measured on other data (held out) too; the schedule they were chosen for is the one stored with them."""
    from pathlib import Path

    from elastilab.core.recommend import check_recommended, meets
    meta = json.loads((Path(__file__).parents[1] / "data" / "routers" / folder / "routers.json").read_text())
    rec = check_recommended(meta["recommended"], folder)
    assert {"x1.01", "x1.05"} <= set(rec)
    steps = meta["elastic_config"]["model_allocation"]
    for p in rec.values():
        assert meets(p["quality"], p["dense_quality"], p["target"], p["higher_is_better"])
        assert p["schedule_steps"] == len(steps) and "train split" in p["chosen_on"]
        assert p["model_compute"] <= p["compute"] + 1e-9 and "held_out_quality" in p
    assert rec["x1.05"]["model_compute"] <= rec["x1.01"]["model_compute"]
