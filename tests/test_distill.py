import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from model_cases import CASES
from safetensors.torch import load_file

import elastilab as el
from elastilab.tasks.lm import lm_loss
from elastilab.training.distill import DistillConfig, TrainingDiverged
from elastilab.training.losses import kl_loss

HERE = Path(__file__).parent


def test_kl_is_zero_for_identical_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert kl_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(a, torch.randn(2, 5, 11)).item() > 0.01


def test_distillation_lowers_kl_and_logs_a_dataframe(tmp_path):
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=0.5, attn_heads=0.5))
    data = torch.randint(0, 101, (32, 16))
    before = el.evaluate(em, data[:8])
    log = el.distill(em, data, steps=30, batch_size=8, lr=3e-2, progress=False,
                     checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=10)
    after = el.evaluate(em, data[:8])
    assert list(log.columns[:6]) == ["step", "loss", "kl", "bce", "balance", "agreement"]
    assert len(log) == 30 and log.step.iloc[-1] == 30
    assert after["kl"] < before["kl"]
    assert (tmp_path / "ck" / "routers.safetensors").exists()
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]  # no temp files left
    loaded = el.load_routers(case.model.__class__(case.model.config), tmp_path / "ck", strict_fingerprint=False)
    for k, v in em.router_state().items():  # the checkpoint holds the trained routers (and NaN quantile
        torch.testing.assert_close(loaded.router_state()[k], v.cpu(), rtol=0, atol=0, equal_nan=True)  # tables)


def test_capacity_sampling_covers_the_range_and_restores_capacities():
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=0.5, attn_tokens=0.5))
    log = el.distill(em, torch.randint(0, 101, (16, 8)), steps=12, batch_size=4, capacity_range=(0.3, 0.9),
                     components_per_step=1, progress=False)
    caps = log[["cap_attn_tokens", "cap_mlp_tokens"]].to_numpy()
    assert ((caps == 1.0).sum(1) == 1).all()  # exactly one component routed per step
    routed = caps[caps < 1.0]
    assert routed.min() >= 0.3 and routed.max() <= 0.9 and routed.std() > 0.05
    assert em.capacities == {"attn_tokens": 0.5, "mlp_tokens": 0.5}


def test_bad_distill_settings_are_refused():
    with pytest.raises(ValueError, match="capacity_range"):
        DistillConfig(capacity_range=(0.8, 0.2))
    em = el.elastify(CASES["llama"]().model, el.ElasticConfig(mlp_tokens=0.5))
    with pytest.raises(ValueError, match="training blocks"):
        el.distill(em, torch.randint(0, 101, (2, 8)), batch_size=4, progress=False)
    with pytest.raises(TypeError, match="LongTensor"):
        el.distill(em, torch.randn(8, 8), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        el.distill(em, "some text", progress=False)
    units = el.elastify(CASES["llama"]().model, el.ElasticConfig(mlp_units=0.5))
    with pytest.raises(ValueError, match="nothing to train.*mlp_units"):
        el.distill(units, torch.randint(0, 101, (8, 8)), batch_size=4, progress=False)


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_cpu_processes_train_the_same_routers_as_one(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    subprocess.run([sys.executable, str(HERE / "ddp_train.py"), str(tmp_path / "one.st")], check=True, env=env,
                   capture_output=True, timeout=300)
    subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", str(HERE / "ddp_train.py"),
                    str(tmp_path / "two.st")], check=True, env=env, capture_output=True, timeout=300)
    one, two = load_file(tmp_path / "one.st"), load_file(tmp_path / "two.st")
    assert one.keys() == two.keys() and len(one) > 0
    for k in one:
        # stated tolerance: gradients are all-reduced in a different summation order
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
        if not k.startswith("init.") and k.endswith("weight"):
            assert (one[k] - one["init." + k]).abs().max() > 1e-3  # the routers really trained


# -- reproducible, resumable, safe training (issue 9: items 4, 8, 9, 11) --------------------------
DATA = torch.randint(0, 101, (10, 12), generator=torch.Generator().manual_seed(1))  # 2 batches of 4 per epoch
SAMPLED = dict(batch_size=4, lr=1e-2, seed=3, capacity_range=(0.3, 0.9), components_per_step=1, progress=False)


def tiny_elastic(router_seed=0):
    """The same tiny Llama every time; ``router_seed`` sets the global RNG elastify draws routers from."""
    torch.manual_seed(0)
    model = CASES["llama"]().model
    torch.manual_seed(router_seed)
    return el.elastify(model, el.ElasticConfig(mlp_tokens=0.5, attn_heads=0.5))


def routers(em):
    return {k: v.detach().clone() for k, v in em.router_state().items()}


def assert_same_routers(a, b):
    assert a.keys() == b.keys() and a
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bit-identical (NaN: uncalibrated)


def test_same_seed_gives_identical_routers_whatever_the_global_rng():
    runs = []
    for router_seed in (1, 2):  # e.g. the CLI: loading a model moves the global RNG differently
        em = tiny_elastic(router_seed)
        el.distill(em, DATA, steps=4, init_routers=True, **SAMPLED)
        runs.append(routers(em))
    assert_same_routers(runs[0], runs[1])
    em = tiny_elastic(1)
    el.distill(em, DATA, steps=4, init_routers=True, **{**SAMPLED, "seed": 4})
    assert not torch.equal(routers(em)["1.mlp_tokens.proj.weight"], runs[0]["1.mlp_tokens.proj.weight"])


@pytest.mark.parametrize("stop", [3, 4])  # mid-epoch, and at an epoch's end
def test_resume_reaches_the_routers_of_an_uninterrupted_run(tmp_path, stop):
    full = tiny_elastic()
    full_log = el.distill(full, DATA, steps=7, init_routers=True, **SAMPLED)
    ck = str(tmp_path / "ck")
    el.distill(tiny_elastic(), DATA, steps=stop, init_routers=True, checkpoint_dir=ck, checkpoint_every=2, **SAMPLED)
    resumed = tiny_elastic(router_seed=5)  # other routers: the checkpoint must bring them back
    log = el.distill(resumed, DATA, steps=7, init_routers=True, checkpoint_dir=ck, checkpoint_every=2, resume=True,
                     **SAMPLED)
    assert_same_routers(routers(resumed), routers(full))
    pd.testing.assert_frame_equal(log.drop(columns="seconds"), full_log.drop(columns="seconds"))
    assert json.loads((tmp_path / "ck" / "routers.json").read_text())["metadata"]["step"] == 7


def test_resume_refuses_another_run_or_nothing_to_resume(tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        el.distill(tiny_elastic(), DATA, steps=2, checkpoint_dir=str(ck), resume=True, **SAMPLED)
    el.distill(tiny_elastic(), DATA, steps=2, checkpoint_dir=str(ck), **SAMPLED)
    with pytest.raises(ValueError, match="other settings.*distill.lr: 0.01 then, 0.02 now"):
        el.distill(tiny_elastic(), DATA, steps=4, checkpoint_dir=str(ck), resume=True, **{**SAMPLED, "lr": 2e-2})
    with pytest.raises(ValueError, match="other settings.*data.sha256"):
        el.distill(tiny_elastic(), DATA.flip(0), steps=4, checkpoint_dir=str(ck), resume=True, **SAMPLED)
    with pytest.raises(ValueError, match="past steps=1"):
        el.distill(tiny_elastic(), DATA, steps=1, checkpoint_dir=str(ck), resume=True, **SAMPLED)
    other = el.elastify(CASES["llama"]().model, el.ElasticConfig(mlp_tokens=0.5, attn_heads=0.5))
    with pytest.raises(ValueError, match="different model"):
        el.distill(other, DATA, steps=4, checkpoint_dir=str(ck), resume=True, **SAMPLED)
    state = load_file(ck / "trainer_state.safetensors")  # plain tensors, no pickle
    assert {"rng.torch", "rng.data_epoch_start"} <= set(state) and any(k.startswith("optimizer.") for k in state)


def test_bad_numbers_are_refused_when_the_config_is_made():
    for name, value in [("temperature", float("nan")), ("temperature", 0.0), ("lr", float("inf")),
                        ("lr", float("nan")), ("weight_decay", float("nan")), ("grad_clip", float("inf")),
                        ("checkpoint_every", -1)]:
        with pytest.raises(ValueError, match=name):
            DistillConfig(**{name: value})
    cfg = DistillConfig()
    cfg.lr = float("inf")  # changed after it was made: distill checks its copy again
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got inf"):
        el.distill(tiny_elastic(), DATA, cfg)


def poisoned(at_step, how):
    """An LM loss that goes wrong from the ``at_step``-th call on."""
    calls = []

    def loss_fn(em, wrapped, batch, cfg):
        calls.append(1)
        loss, metrics = lm_loss(em, wrapped, batch, cfg)
        if len(calls) >= at_step:
            if how == "loss":
                return loss * float("nan"), {**metrics, "kl": float("nan")}
            w = em.router_parameters()[0]  # finite value, NaN gradient (the torch.where trap): like lr=inf
            loss = loss + torch.where(w > 1e9, w.sqrt(), torch.zeros_like(w)).sum()
        return loss, metrics
    return loss_fn


@pytest.mark.parametrize("how, message", [("loss", "at step 3: the loss is nan .*non-finite: kl=nan"),
                                          ("weights", "at step 3: the update made router weights non-finite")])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, how, message):
    em, ck = tiny_elastic(), tmp_path / "ck"
    with pytest.raises(TrainingDiverged, match=message + ".*checkpoint of step 2 .* is kept"):
        el.distill(em, DATA, steps=6, checkpoint_dir=str(ck), checkpoint_every=2, loss_fn=poisoned(3, how), **SAMPLED)
    assert json.loads((ck / "routers.json").read_text())["metadata"]["step"] == 2
    saved = load_file(ck / "routers.safetensors")
    assert all(v.isfinite().all() for k, v in saved.items() if "quantiles" not in k)
    assert load_file(ck / "trainer_state.safetensors")["routers.1.mlp_tokens.proj.weight"].isfinite().all()


def test_checkpoint_folder_is_checked_before_step_1(tmp_path):
    calls = []

    def counting(*args):
        calls.append(1)
        return lm_loss(*args)

    def train(folder, **kw):
        return el.distill(tiny_elastic(), DATA, steps=2, checkpoint_dir=str(folder), loss_fn=counting,
                          **{**SAMPLED, **kw})

    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(a_file)
    with pytest.raises(OSError, match="cannot write checkpoints to"):
        train(a_file / "sub")  # cannot be created (as root, chmod would not block a write)
    other = tmp_path / "other"  # another model's routers
    el.elastify(CASES["gpt2"]().model, el.ElasticConfig(mlp_tokens=0.5)).save_routers(other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(ValueError, match="already holds a router checkpoint.*resume=True.*overwrite=True"):
        train(other)
    assert not calls and {p.name: p.read_bytes() for p in other.iterdir()} == before
    train(other, overwrite=True)
    assert json.loads((other / "routers.json").read_text())["model_class"] == "LlamaForCausalLM"
    fresh = tmp_path / "fresh"
    train(fresh, checkpoint_every=0)  # 0: only after the last step
    assert json.loads((fresh / "routers.json").read_text())["metadata"]["step"] == 2
    assert not [p for p in fresh.iterdir() if p.name.startswith(".")]  # the write probe is gone


# -- the same through `elastilab train`, on the tiny Llama (no pretrained model is loaded) ----------
@pytest.fixture
def tiny_cli(monkeypatch, tmp_path):
    """cli.main with --model served by the tiny Llama (and a character tokenizer); returns (run, text)."""
    import elastilab.cli.main as cli
    import elastilab.cli.train as train_cli

    def load_tiny(name):
        torch.manual_seed(0)
        model = CASES["llama"]().model
        torch.manual_seed(len(calls))  # each load leaves the global RNG elsewhere, as real loads may
        calls.append(name)
        return model, lambda s: [ord(c) % 101 for c in s]

    calls = []
    monkeypatch.setattr(train_cli, "_load_lm", load_tiny)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    args = ["--text", str(text), "--mlp-tokens", "0.5", "--attn-heads", "0.5", "--capacity-range", "0.3", "0.9",
            "--batch-size", "4", "--seq-len", "12", "--lr", "1e-2", "--calibration-blocks", "2"]
    return (lambda *extra: cli.main(["train", *args, *extra])), calls


def test_cli_train_repeats_and_resumes_exactly(tiny_cli, tmp_path):
    run, _ = tiny_cli
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert run("--steps", "5", "--checkpoint-every", "2", "--out", a) == 0
    assert run("--steps", "5", "--checkpoint-every", "2", "--out", b) == 0  # same seed: same routers
    assert run("--steps", "3", "--checkpoint-every", "2", "--out", c) == 0  # "interrupted" after step 3
    assert run("--steps", "5", "--checkpoint-every", "2", "--out", c, "--resume") == 0
    first = load_file(Path(a) / "routers.safetensors")
    for other in (b, c):
        assert_same_routers(load_file(Path(other) / "routers.safetensors"), first)
    assert pd.read_csv(Path(c) / "train_log.csv").step.tolist() == [1, 2, 3, 4, 5]


def test_cli_train_refuses_bad_settings_and_outputs_before_loading(tiny_cli, tmp_path, capsys):
    run, loads = tiny_cli
    a_file = tmp_path / "file"
    a_file.write_text("x")
    done = tmp_path / "done"
    el.elastify(CASES["gpt2"]().model, el.ElasticConfig(mlp_tokens=0.5)).save_routers(done)
    for extra, message in [(["--temperature", "nan"], "temperature must be a finite number > 0, got nan"),
                           (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
                           (["--out", str(a_file)], "is a file, not a folder"),
                           (["--out", str(a_file / "sub")], f"cannot write to --out {a_file}/sub: Not a directory"),
                           (["--out", str(done)], "already holds a router checkpoint"),
                           (["--resume"], "nothing to resume"),
                           (["--resume", "--init-from", str(done)], "so the run stopped before its first checkpoint")]:
        out = [] if "--out" in extra else ["--out", str(tmp_path / "new")]
        assert run(*extra, *out) == 2
        assert message in capsys.readouterr().err
    for extra in (["--checkpoint-every", "-1"], ["--resume", "--overwrite"]):
        with pytest.raises(SystemExit) as exit_:
            run(*extra, "--out", str(tmp_path / "new"))
        assert exit_.value.code == 2
    assert not loads  # every refusal came before the model was loaded
    assert run("--steps", "1", "--out", str(done), "--overwrite") == 0


def test_cli_train_warm_start_fits_the_routers_before_distilling(tiny_cli, tmp_path):
    run, _ = tiny_cli
    cold, warm = str(tmp_path / "cold"), str(tmp_path / "warm")
    assert run("--steps", "1", "--out", cold) == 0
    assert run("--steps", "1", "--warm-start", "4", "--out", warm) == 0
    meta = json.loads((Path(warm) / "routers.json").read_text())["metadata"]
    assert meta["warm_start_blocks"] == 4 and set(meta["warm_start_r2"]) == {"mlp_tokens", "attn_heads"}
    # the fit, not the seeded random draw, is what distillation started from
    a, b = load_file(Path(cold) / "routers.safetensors"), load_file(Path(warm) / "routers.safetensors")
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_cli_train_without_token_components_needs_no_calibration(tiny_cli, tmp_path):
    """Heads and slices only: there is no token router to calibrate, and the run still saves its routers."""
    import elastilab.cli.main as cli
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    out = tmp_path / "heads"
    assert cli.main(["train", "--text", str(text), "--attn-heads", "0.5", "--mlp-experts", "0.5", "--n-experts", "4",
                     "--steps", "1", "--batch-size", "4", "--seq-len", "12", "--out", str(out)]) == 0
    assert json.loads((out / "routers.json").read_text())["metadata"]["steps"] == 1


def test_cli_train_warm_start_alone_and_steps_zero_without_it(tiny_cli, tmp_path, capsys):
    run, _ = tiny_cli
    out = tmp_path / "fit"
    assert run("--steps", "0", "--warm-start", "4", "--out", str(out)) == 0
    meta = json.loads((out / "routers.json").read_text())["metadata"]
    assert meta["steps"] == 0 and "seconds_per_step" not in meta and meta["warm_start_blocks"] == 4
    assert not (out / "train_log.csv").exists()
    assert run("--steps", "0", "--out", str(tmp_path / "nothing")) == 2
    assert "--steps 0 trains nothing" in capsys.readouterr().err


# -- issue 21: Ctrl-C, two runs on one --out, --mlp-units ------------------------------------------
def test_ctrl_c_during_train_prints_the_resume_command_which_reaches_the_uninterrupted_routers(
        tiny_cli, tmp_path, monkeypatch, capsys):
    import re
    import shlex

    import elastilab.cli.main as cli
    run, _ = tiny_cli
    full, out = tmp_path / "full", tmp_path / "out"
    assert run("--steps", "5", "--checkpoint-every", "2", "--out", str(full)) == 0
    calls = []

    def ctrl_c_in_step_4(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return lm_loss(*args)

    monkeypatch.setattr(sys.modules["elastilab.tasks.lm"], "lm_loss", ctrl_c_in_step_4)
    capsys.readouterr()
    assert run("--steps", "5", "--checkpoint-every", "2", "--out", str(out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    done = re.fullmatch(rf"elastilab train: interrupted at step 3; the checkpoint of step 2 in {re.escape(str(out))} "
                        r"is kept; resume with: (elastilab train .*)", err.strip().splitlines()[-1])
    assert done and done.group(1).endswith(f"--out {out} --resume"), err
    monkeypatch.setattr(sys.modules["elastilab.tasks.lm"], "lm_loss", lm_loss)
    assert cli.main(shlex.split(done.group(1))[1:]) == 0  # the printed command, as a shell would split it
    assert_same_routers(load_file(out / "routers.safetensors"), load_file(full / "routers.safetensors"))
    assert pd.read_csv(out / "train_log.csv").step.tolist() == [1, 2, 3, 4, 5]
    assert not (out / ".elastilab.lock").exists()


def test_ctrl_c_while_a_checkpoint_is_written_takes_effect_once_it_is_whole(tmp_path, monkeypatch):
    import signal

    from elastilab.training.trainer_state import read_trainer_state
    save = el.ElasticModel.save_routers

    def save_then_ctrl_c(self, *args, **kwargs):  # Ctrl-C between the routers and the trainer state
        done = save(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return done

    monkeypatch.setattr(el.ElasticModel, "save_routers", save_then_ctrl_c)
    ck = tmp_path / "ck"
    # Python's own Ctrl-C handler, whatever this run inherited (a shell starts a background job with SIGINT
    # ignored, and Python then keeps ignoring it)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as interrupt:
            el.distill(tiny_elastic(), DATA, steps=6, checkpoint_dir=str(ck), checkpoint_every=2, **SAMPLED)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert json.loads((ck / "routers.json").read_text())["metadata"]["step"] == read_trainer_state(ck)[1]["step"] == 2
    assert str(interrupt.value) == f"interrupted at step 2; the checkpoint of step 2 in {ck} is kept"


def test_a_second_train_on_the_same_out_is_refused_and_a_dead_runs_lock_is_taken_over(
        tiny_cli, tmp_path, monkeypatch, capsys):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    LOCK = ".elastilab.lock"  # what the error names
    run, loads = tiny_cli
    out = tmp_path / "out"
    training, finish = threading.Event(), threading.Event()

    def first_run_waits(*args):  # the first run (in a thread) stays in training until the second one is done
        if threading.current_thread() is not threading.main_thread():
            training.set()
            finish.wait(60)
        return lm_loss(*args)

    monkeypatch.setattr(sys.modules["elastilab.tasks.lm"], "lm_loss", first_run_waits)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(run, "--steps", "1", "--out", str(out))
        assert training.wait(60)
        try:
            second = [run("--steps", "1", "--out", str(out), *extra) for extra in ([], ["--overwrite"])]
        finally:
            finish.set()
        assert first.result(60) == 0 and second == [2, 2]
    assert (f"elastilab train: error: --out {out} is in use by another elastilab run (pid {os.getpid()}, which holds "
            f"{out / LOCK}); wait for it to finish, or choose another folder") in capsys.readouterr().err
    assert len(loads) == 1 and not (out / LOCK).exists()  # the second was refused before loading a model
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(f"{dead.pid}\n")  # left by a run that was killed
    assert run("--steps", "1", "--out", str(out), "--overwrite") == 0
    assert not (out / LOCK).exists()


def test_train_takes_mlp_units_beside_a_routed_component_and_refuses_it_alone(tiny_cli, tmp_path, capsys):
    run, loads = tiny_cli
    out = tmp_path / "units"
    assert run("--steps", "2", "--mlp-units", "0.5", "--out", str(out)) == 0
    assert json.loads((out / "routers.json").read_text())["elastic_config"]["mlp_units"] == 0.5
    import elastilab.cli.main as cli
    text = tmp_path / "text.txt"
    n = len(loads)
    assert cli.main(["train", "--text", str(text), "--mlp-units", "0.5", "--out", str(tmp_path / "alone")]) == 2
    assert ("nothing to train: mlp_units has no router (the MLP's gate chooses its units); evaluate it with "
            "`elastilab eval --mlp-units C`") in capsys.readouterr().err
    assert len(loads) == n and not (tmp_path / "alone").exists()  # refused before loading
