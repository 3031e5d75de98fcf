"""The benchmark code on a tiny random Llama: rows, FLOP ratios and files (no timing assertions)."""
import pytest
import torch

from elastilab import bench, cli

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


def test_speed_rows_ideal_and_realised(rows):
    assert COLUMNS <= set(rows.columns)
    assert sorted(rows.component.unique()) == sorted(bench.COMPONENTS)
    assert set(rows[rows.heads == "loop"].component) == {"attn_heads", "all"}
    assert (rows.capacity == 0.5).all() and (rows.batch == 2).all() and (rows.seq == 16).all()
    assert (rows.ideal_speedup > 1).all(), "capacity 0.5 must cut FLOPs for every component"
    assert (rows.routed_gflops < rows.dense_gflops).all()
    full = rows.set_index(["component", "heads"])
    # routing everything cuts more than any single component
    assert full.loc[("all", "grouped"), "ideal_speedup"] > full.xs("grouped", level="heads").drop("all").ideal_speedup.max()
    assert torch.allclose(torch.tensor(rows.realised.values), torch.tensor((rows.speedup / rows.ideal_speedup).values))
    assert (rows.dense_s > 0).all() and (rows.routed_s > 0).all()


def test_write_read_and_plot(rows, tmp_path):
    path = bench.write(rows, tmp_path, "speed_test", {"cpu": "x", "torch": torch.__version__})
    assert bench.read_info(path) == {"cpu": "x", "torch": torch.__version__}
    back = bench.read(path)
    assert list(back.columns) == list(rows.columns) and len(back) == len(rows)
    bench.plot_speed(back, "test", tmp_path / "speed_test.png")
    assert (tmp_path / "speed_test.png").stat().st_size > 1000


def test_capacity_one_is_the_same_flops_as_dense():
    rows = bench.speed("tiny", shapes=["1x12:1"], components=["mlp_tokens"], reps=1, warmup=0, log=lambda *a: None)
    assert len(rows) == 1 and rows.ideal_speedup.iloc[0] == pytest.approx(1.0)


def test_mlp_micro_benchmark():
    df = bench.mlp_speed("tiny", rows=64, capacities=(0.5,), reps=1, warmup=0)
    assert set(df.component) == {"mlp_tokens", "mlp_experts"}
    assert df.ideal_speedup.tolist() == [2.0, 2.0]
    assert (df.realised == df.speedup / 2).all()


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
