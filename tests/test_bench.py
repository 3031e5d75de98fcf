"""The benchmark code on a tiny random Llama: rows, the FLOPs behind the ideal speedup, \
files (no timing assertions)."""
import pytest
import torch

import elastilab as el
from elastilab.analysis import bench
from elastilab.cli import main as cli
from elastilab.core.compute import measure_flops
from elastilab.core.config import LAYER_COMPONENTS
from elastilab.core.routing import n_kept

COLUMNS = {"model", "device", "backend", "heads", "batch", "seq", "component", "capacity", "dense_s", "routed_s",
           "speedup", "speedup_paired", "dense_gflops", "routed_gflops", "ideal_speedup", "realised",
           "threads", "load_start", "load_end"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny ops on a shared 2-core machine: with 2 threads every op waits for the other core
    # (tens of ms under load); one thread keeps this test fast
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rows():
    return bench.speed("tiny", shapes=["2x16:0.5"], reps=1, warmup=0, heads=("grouped", "loop"), log=lambda *a: None)


def test_speed_rows(rows):
    assert COLUMNS <= set(rows.columns)
    assert sorted(rows.component.unique()) == sorted(bench.COMPONENTS)
    assert set(rows[rows.heads == "loop"].component) == {"attn_heads", "all"}
    assert (rows.capacity == 0.5).all() and (rows.batch == 2).all() and (rows.seq == 16).all()
    assert (rows.dense_s > 0).all() and (rows.routed_s > 0).all()


def test_speed_flops_are_the_work_the_blocks_kept(rows):
    """The FLOPs behind the ideal speedup are those of the rows, heads and slices each block really
    computed (elastilab.core.compute's count from the block's choices), so routing at 0.5 cuts real work."""
    net, vocab = bench.load_model("tiny")
    em = el.elastify(net, el.ElasticConfig(**{c: 1.0 for c in LAYER_COMPONENTS}, n_experts=8))
    ids = torch.randint(0, vocab, (1, 16))  # top-k keeps the same counts whatever the tokens
    dense = measure_flops(em, ids)
    kept = lambda f: f["analytic_attention"] + f["analytic_mlp"] + f["analytic_routers"]  # noqa: E731
    for r in rows.itertuples():
        em.set_capacity(**bench._capacities(r.component, r.capacity))
        f = measure_flops(em, ids)
        assert r.dense_gflops * 1e9 / r.batch == pytest.approx(dense["total"], rel=1e-9)  # (float rounding only)
        # the rest of the model (embeddings, head) is untouched: the routed count is the blocks' kept work
        assert r.routed_gflops * 1e9 / r.batch == pytest.approx(dense["total"] - kept(dense) + kept(f), rel=1e-9)
        assert kept(f) < kept(dense), r.component
        assert r.ideal_speedup == pytest.approx(r.dense_gflops / r.routed_gflops)
    full = rows[rows.heads == "grouped"].set_index("component").routed_gflops
    assert full["all"] < full.drop("all").min()  # routing everything cuts more than any one component


def test_write_read_and_plot(rows, tmp_path):
    path = bench.write(rows, tmp_path, "speed_test", {"cpu": "x", "torch": torch.__version__})
    assert bench.read_info(path) == {"cpu": "x", "torch": torch.__version__}
    back = bench.read(path)
    assert list(back.columns) == list(rows.columns) and len(back) == len(rows)
    bench.plot_speed(back, "test", tmp_path / "speed_test.png")
    assert (tmp_path / "speed_test.png").stat().st_size > 1000


def test_capacity_one_is_the_same_flops_as_dense():
    rows = bench.speed("tiny", shapes=["1x12:1"], components=["mlp_tokens"], reps=1, warmup=0, log=lambda *a: None)
    assert len(rows) == 1 and rows.routed_gflops.iloc[0] == rows.dense_gflops.iloc[0]


def test_mlp_micro_benchmark_counts_the_kept_rows_and_slices():
    n, E = 64, 8
    df = bench.mlp_speed("tiny", rows=n, capacities=(0.5, 0.25), reps=1, warmup=0, n_experts=E)
    d, F = bench.MLP_DIMS["tiny"]
    per_row = 2 * 3 * d * F  # SwiGLU: up, gate and down matmuls
    assert (df.dense_gflops * 1e9 == n * per_row).all()
    for r in df.itertuples():  # measured on the routed call: only the kept rows / slices / units were multiplied
        share = {"mlp_tokens": n_kept(r.capacity, n) / n, "mlp_experts": n_kept(r.capacity, E) / E,
                 # units: the gate projection of every unit, up and down of the kept ones
                 "mlp_units": (1 + 2 * n_kept(r.capacity, F) / F) / 3}[r.component]
        assert r.routed_gflops * 1e9 == pytest.approx(n * per_row * share), (r.component, r.capacity)
        assert r.ideal_speedup == pytest.approx(r.dense_gflops / r.routed_gflops)
    assert sorted(zip(df.component, df.capacity)) == sorted((c, cap)
                                                            for c in ("mlp_tokens", "mlp_experts", "mlp_units")
                                                            for cap in (0.5, 0.25))


def test_cli_writes_csv_and_png(tmp_path, capsys):
    code = cli.main(["bench", "speed", "--model", "tiny", "--shape", "1x8:0.5", "--components", "mlp_experts",
                     "--reps", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "speed_cpu_tiny.csv").exists() and (tmp_path / "speed_cpu_tiny.png").exists()
    assert "mlp_experts" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["8by512", "0x4", "2x8:1.5", "2x8:"])
def test_bad_shapes_are_refused(text):
    if text == "2x8:":  # empty capacity list after ':' means the defaults
        assert bench.parse_shape(text)[2] == bench.CAPACITIES
        return
    with pytest.raises(ValueError, match="shape"):
        bench.parse_shape(text)


def test_unknown_model_and_component_are_refused():
    with pytest.raises(ValueError, match="allowed"):
        bench.load_model("gpt-5")
    with pytest.raises(ValueError, match="allowed"):
        bench.speed("tiny", shapes=["1x8"], components=["everything"])


def test_gather_benchmark_methods_compute_the_down_projection():
    """benchmarks/gather_cpu.py: every gather-sum it times gives the dense down projection of the kept units
    (checked inside run), one row per method and capacity."""
    import importlib.util
    from pathlib import Path
    script = Path(__file__).parents[1] / "benchmarks" / "gather_cpu.py"
    spec = importlib.util.spec_from_file_location("gather_cpu", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    df = mod.run(capacities=(1.0, 0.5), layers=2, d=8, width=16, reps=1, calls=1)
    assert len(df) == 2 * 4 and set(df.k) == {16, 8}
    assert (df[df.method.str.startswith("dense")].speedup_vs_dense == 1).all()
    assert (df[df.capacity == 0.5].ideal_speedup.iloc[1:] == 2).all()
