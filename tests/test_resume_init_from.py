"""`elastilab train --resume` of a run begun with --init-from: it continues from the checkpoint in --out to the
routers of the uninterrupted run, and a run stopped before its first checkpoint is told how to start again."""
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
import test_distill
from safetensors.torch import load_file
from test_distill import assert_same_routers

import elastilab.cli.main as cli
from elastilab.tasks.lm import lm_loss
from elastilab.training.trainer_state import read_trainer_state

tiny_cli = test_distill.tiny_cli  # the fixture: the tiny Llama served as --model


def _ctrl_c_in_step(n, monkeypatch):
    calls = []

    def loss(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return lm_loss(*args)
    monkeypatch.setattr(sys.modules["elastilab.tasks.lm"], "lm_loss", loss)


def test_a_run_begun_with_init_from_resumes_to_the_uninterrupted_routers(tiny_cli, tmp_path, monkeypatch, capsys):
    run, _ = tiny_cli
    start, full, out, again = (tmp_path / n for n in ("start", "full", "out", "again"))
    assert run("--steps", "2", "--out", str(start)) == 0
    init = ("--steps", "5", "--checkpoint-every", "2", "--init-from", str(start))
    assert run(*init, "--out", str(full)) == 0  # uninterrupted
    _ctrl_c_in_step(4, monkeypatch)
    capsys.readouterr()
    assert run(*init, "--out", str(out)) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    done = re.fullmatch(rf"elastilab train: interrupted at step 3; the checkpoint of step 2 in {re.escape(str(out))} "
                        r"is kept; resume with: (elastilab train .*)", last)
    assert done and done.group(1).endswith(f"--init-from {start} --out {out} --resume"), last
    # the trainer state says where the routers began
    assert read_trainer_state(out)[1]["run"]["distill"]["extra"] == {"init_from": str(start)}
    monkeypatch.setattr(sys.modules["elastilab.tasks.lm"], "lm_loss", lm_loss)
    assert cli.main(shlex.split(done.group(1))[1:]) == 0  # the printed command
    assert_same_routers(load_file(out / "routers.safetensors"), load_file(full / "routers.safetensors"))
    assert pd.read_csv(out / "train_log.csv").step.tolist() == [1, 2, 3, 4, 5]
    # --resume alone: --init-from is read back from the trainer state
    assert run("--steps", "3", "--checkpoint-every", "2", "--init-from", str(start), "--out", str(again)) == 0
    assert run("--steps", "5", "--checkpoint-every", "2", "--out", str(again), "--resume") == 0
    assert f"resuming a run begun with --init-from {start}" in capsys.readouterr().err
    assert_same_routers(load_file(again / "routers.safetensors"), load_file(full / "routers.safetensors"))


def test_a_run_stopped_before_its_first_checkpoint_is_told_to_start_again(tiny_cli, tmp_path, monkeypatch, capsys):
    run, loads = tiny_cli
    start, out = tmp_path / "start", tmp_path / "out"
    assert run("--steps", "1", "--out", str(start)) == 0
    _ctrl_c_in_step(1, monkeypatch)
    init = ("--steps", "4", "--checkpoint-every", "2", "--init-from", str(start), "--out", str(out))
    assert run(*init) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"elastilab train: interrupted at step 0; no checkpoint was written to {out}; start "
                           "again with: elastilab train --text ") and last.endswith(shlex.join(init)), last
    n = len(loads)
    assert run(*init, "--resume") == 2
    err = capsys.readouterr().err
    assert (f"nothing to resume in {out}: it holds no trainer_state.safetensors (written at every checkpoint), so the "
            f"run stopped before its first checkpoint; start it again with: elastilab train ") in err
    assert err.strip().endswith(shlex.join(init)) and len(loads) == n  # refused before loading the model
    monkeypatch.setattr(sys.modules["elastilab.tasks.lm"], "lm_loss", lm_loss)
    assert cli.main(shlex.split(err.strip().split("start it again with: ")[1])[1:]) == 0
    assert (Path(out) / "routers.safetensors").is_file()
