"""The LM experiments (elastilab.analysis.lm_experiments, `elastilab lm ...`) on a tiny Llama, and the CLI on the
shipped SmolLM2: measured numbers, the committed CSVs' columns, and files written only into --out."""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.analysis import lm_experiments as lx
from elastilab.cli import lm as lm_cli
from elastilab.cli import main as cli
from elastilab.core.routing import n_kept

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
STAMP = ["date", "machine", "torch"]


def committed_columns(name: str) -> list[str]:
    """The columns of a committed result, less the date/machine/torch stamp the CLI adds."""
    return [c for c in pd.read_csv(RESULTS / name, nrows=1).columns if c not in STAMP]


@pytest.fixture()
def em():
    torch.manual_seed(0)
    model = CASES["llama"]().model  # 3 layers, 4 heads, 4 experts
    return el.elastify(model, el.ElasticConfig(attn_tokens=1.0, mlp_tokens=1.0, attn_heads=1.0, mlp_experts=1.0,
                                               n_experts=4))


@pytest.fixture()
def blocks():
    return torch.randint(0, 101, (3, 40))


def test_quality_table_measures_the_teacher_and_the_saving(em, blocks):
    df = lx.quality_table(em, {"a": blocks, "b": blocks[:2]}, capacities=(0.75, 0.5))
    assert list(df.columns) == [c for c in committed_columns("lm_quality.csv")]
    assert len(df) == 2 * 4 * 3 and set(df.capacity) == {1.0, 0.75, 0.5}
    dense = df[df.capacity == 1.0]  # measured: the elastic path at capacity 1.0 is the teacher
    assert (dense.ppl_ratio == 1.0).all() and (dense.agreement == 1.0).all() and (dense.kl.abs() < 1e-6).all()
    assert (dense.compute_fraction == 1.0).all() and (dense.student_ppl == dense.teacher_ppl).all()
    half = df[df.capacity == 0.5].set_index(["domain", "component"])
    assert (half.compute_fraction < 1).all() and (half.model_compute_fraction < 1).all()
    assert half.loc[("a", "mlp_experts"), "compute_fraction"] == pytest.approx(0.5)  # 2 of 4 slices
    assert (half.ppl_ratio != 1.0).any()
    assert em.capacities == {c: 1.0 for c in em.capacities}  # left as it was


def test_untrained_like_replaces_the_routers(em):
    model, old = em.model, em.router_state()
    fresh = lx.untrained_like(em, seed=1)
    assert fresh.model is model and fresh.capacities == em.capacities
    assert fresh.elastic_config.n_experts == 4
    assert any(not torch.equal(old[k], v) for k, v in fresh.router_state().items())


def test_layer_damage_routes_one_layer_at_a_time(em, blocks):
    em.keep_dense(mlp_tokens=(2,))
    df = lx.layer_damage(em, blocks[:1], capacity=0.5)
    assert list(df.columns) == committed_columns("lm_layer_damage.csv")
    assert len(df) == 2 * 3
    first = df.set_index(["component", "layer"])
    assert not first.loc[("attn_tokens", 0), "routed"] and first.loc[("attn_tokens", 0), "ppl_ratio"] == 1.0
    routed = df[df.routed]
    assert len(routed) == 5 and (routed.ppl_ratio != 1.0).all()
    assert em.elastic_config.keep_dense == {"mlp_tokens": (2,)}  # the layers kept before are restored


def test_keep_dense_table_costs_compute_where_layers_stay_dense(em, blocks):
    df = lx.keep_dense_table(em, {"a": blocks}, settings=(((), 0.5), ((-1,), 0.5)))
    assert list(df.columns) == committed_columns("lm_keep_dense.csv")
    assert list(df.kept_dense) == ["none", "-1"] * 2
    for comp, g in df.groupby("component"):
        every, edge = g.compute_fraction
        assert every < edge < 1, comp  # the dense layer computes every token
    assert em.elastic_config.keep_dense == {}


def test_attn_variants_keep_kv_computes_every_key(em, blocks):
    df = lx.attn_variants(em, blocks, capacities=(0.5,), scorers=("learned", "random"), kept=((),))
    assert list(df.columns) == committed_columns("lm_attn_variants.csv")
    by = df.set_index(["variant", "scorer"]).attn_compute
    assert by[("drop", "learned")] < by[("keep_kv", "learned")] < 1  # k/v projections of every token
    assert em.elastic_config.attn_tokens_variant == "drop"


def test_threshold_modes_measure_what_is_kept(em, blocks):
    with em.capacity(attn_tokens=0.5, mlp_tokens=0.5):
        em.calibrate(blocks)
    df = lx.threshold_modes(em, blocks, capacities=(0.9, 0.5))
    assert list(df.columns) == [c for c in committed_columns("lm_threshold_modes.csv") if c != "command"]
    assert len(df) == 2 * 2 * 2 and em.elastic_config.mode == "topk"
    for (comp, mode), g in df.groupby(["component", "mode"]):
        high, low = g.sort_values("requested", ascending=False).measured_compute
        assert 0 < low < high, (comp, mode)  # the realised compute follows the request


def test_routing_map_and_slot_usage(em, blocks):
    ids = blocks[:1]
    keep = lx.routing_map(em, ids, "attn_tokens", 0.5)
    assert keep.shape == (3, 40) and keep[0].all()  # layer 0 is never token-routed for attention
    # top-k keeps half of the tokens after the first (the attention sink, always kept)
    assert keep[:, 0].all() and (keep[1:].sum(1) == 1 + n_kept(0.5, 39)).all()
    token_map, per_layer = lx.slot_usage(em, ids, "mlp_experts", 0.5, layer=1)
    assert token_map.shape == (40, 4) and (token_map.sum(1) == 2).all()  # 2 of 4 experts per token
    assert per_layer.shape == (3, 4) and np.allclose(per_layer.sum(1), 2)
    with pytest.raises(ValueError, match="one sequence"):
        lx.slot_usage(em, blocks, "mlp_experts", 0.5, layer=1)


# ---------------------------------------------------------------- the command line, on SmolLM2
def run(argv) -> int:
    """``elastilab ...`` through cli.main once cli registers the lm commands, else on a parser of our own."""
    if any(m == "elastilab.cli.lm" for m, _ in getattr(cli, "SUBCOMMANDS", ())):
        return cli.main(argv)
    p = argparse.ArgumentParser(prog="elastilab")
    lm_cli.add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_help_lists_the_experiments(capsys):
    with pytest.raises(SystemExit) as e:
        run(["lm", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("quality", "keep-dense", "attn-variants", "threshold-modes"))


def test_cli_writes_only_into_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--blocks", "1", "--seq-len", "48", "--capacities", "0.5"]
    assert run(["lm", "threshold-modes", *small, "--components", "mlp_tokens", "--out", "res"]) == 0
    written = pd.read_csv(tmp_path / "res" / "lm_threshold_modes.csv")
    assert list(written.columns) == list(pd.read_csv(RESULTS / "lm_threshold_modes.csv", nrows=1).columns)
    assert list(written["mode"]) == ["threshold", "running"] and (written.measured_compute < 1).all()
    assert written.command[0].startswith("elastilab lm threshold-modes --model smollm2-135m --blocks 1")
    assert "--argv" not in written.command[0]  # every option spelled out, not the parsed argv again
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["lm_threshold_modes.csv", "res"]
    capsys.readouterr()
    assert run(["lm", "attn-variants", *small[:4], "--capacities", "0.5", "--scorers", "random"]) == 0
    assert "keep_kv" in capsys.readouterr().out  # the table is printed ...
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["lm_threshold_modes.csv", "res"]  # ... and nothing written
