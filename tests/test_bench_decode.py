"""``elastilab bench decode`` on the offline SmolLM2 at toy size: rows, FLOPs behind the ideal speedup,
quality columns, files, and clear errors (no timing assertions: speed is the benchmark's job)."""
import argparse
import re

import pytest

from elastilab.analysis import bench
from elastilab.cli import main as cli


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    # the whole-model checkpoint: the head routers with mlp_units, a schedule and recommended points
    code = cli.main(["bench", "decode", "--routers", "data/routers/smollm2-135m-model",
                     "--point", "mlp_units=0.5", "--point", "attn_heads=0.75,mlp_units=0.75",
                     "--point", '{"mlp_units": 0.5, "prefill": "dense"}', "--point", "compute=x1.05",
                     "--batches", "1", "2",
                     "--prompt-len", "16", "--new-tokens", "4", "--prefill", "1x16", "--reps", "1", "--warmup", "0",
                     "--quality-blocks", "1", "--seq-len", "32", "--out", str(out)])
    assert code == 0
    return bench.read(out / "decode_cpu.csv"), bench.read_info(out / "decode_cpu.csv"), out


def test_one_row_per_point_and_phase_with_quality_next_to_speed(table):
    df, info, out = table
    assert (out / "decode_cpu.png").stat().st_size > 0
    assert {"torch", "transformers", "cpu", "date", "command", "threads"} <= set(info)
    assert info["threads"] == "1"  # pinned by default
    assert set(zip(df.phase, df.batch)) == {("decode", 1), ("decode", 2), ("prefill", 1)}
    assert list(df.point.unique()) == ["dense", "mlp_units=0.5", "attn_heads=0.75 mlp_units=0.75",
                                       "mlp_units=0.5 (dense prefill)", "compute x1.05"]
    assert list(df.prefill.unique()) == ["routed", "dense"]
    assert set(df[df.point == "compute x1.05"].capacities) == {"compute x1.05"}
    # a dense prefill computes the prompt as the dense model does and routes the decode steps as the routed point
    fallback, same = df[df.prefill == "dense"].set_index("phase"), df[df.point == "mlp_units=0.5"].set_index("phase")
    assert fallback.loc["prefill", "ideal_speedup"] == 1 and same.loc["prefill", "ideal_speedup"] > 1.05
    assert (fallback.loc["decode", "ideal_speedup"] == same.loc["decode", "ideal_speedup"]).all()
    assert fallback.loc["prefill", "ppl_ratio"] == same.loc["prefill", "ppl_ratio"]  # quality: every token routed
    df = df[df.prefill == "routed"]
    dense = df[df.point == "dense"]
    assert (dense.speedup == 1).all() and (dense.ideal_speedup == 1).all() and (dense.ppl_ratio == 1).all()
    routed = df[df.point != "dense"]
    # the routed points skip measured work in every phase, change the model, and the table says how much
    assert (routed.ideal_speedup > 1.05).all() and (routed.model_compute < 0.95).all()
    assert (routed.ppl_ratio != 1).all() and (routed.dense_tok_s > 0).all() and (routed.routed_tok_s > 0).all()
    decode = df[df.phase == "decode"]
    assert decode.teacher_tokens_matched.between(0, 4).all() and (decode[decode.point == "dense"]
                                                                  .teacher_tokens_matched == 4).all()
    assert (df[df.phase == "decode"].tokens == df[df.phase == "decode"].batch * 3).all()  # steps after the prefill


def test_routed_components_without_routers_are_refused(tmp_path, capsys):
    assert cli.main(["bench", "decode", "--point", "attn_heads=0.5", "--out", str(tmp_path)]) == 2
    assert "need trained routers: give --routers" in capsys.readouterr().err


def test_a_compute_point_is_the_recommended_whole_model_point(tmp_path, capsys):
    import elastilab as el
    from elastilab.analysis.bench_decode import DENSE
    from elastilab.analysis.generation_points import apply_point, point_spec
    from elastilab.core.loading import load_routers
    em = load_routers(el.zoo.load("smollm2-135m")[0], "data/routers/smollm2-135m-model")
    base = {c: 1.0 for c in em.capacities}
    apply_point(em, base, point_spec("compute=x1.05"), "drop")
    at_point = {b.layer_idx: dict(b.capacity) for b in em.blocks}
    apply_point(em, base, DENSE, "drop")
    assert all(c == 1.0 for b in em.blocks for c in b.capacity.values())
    em.set_compute("x1.05")
    assert at_point == {b.layer_idx: dict(b.capacity) for b in em.blocks}
    assert any(c < 1.0 for caps in at_point.values() for c in caps.values())
    assert point_spec('{"compute": 0.9}')["compute"] == 0.9
    for bad, says in [("compute=1.5", "compute must be a fraction in (0, 1]"), ("compute=x0.9", "compute must be"),
                      ("compute=x1.05,mlp_units=0.5", "name it alone")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
            point_spec(bad)
    # routers without a schedule: refused before any timing, naming what is missing
    assert cli.main(["bench", "decode", "--routers", "data/routers/smollm2-135m-heads", "--point", "compute=x1.05",
                     "--batches", "1", "--prompt-len", "16", "--new-tokens", "2", "--prefill", "1x16", "--reps", "1",
                     "--warmup", "0", "--quality-blocks", "1", "--seq-len", "32", "--out", str(tmp_path)]) == 2
    assert "hold no recommended point" in capsys.readouterr().err
