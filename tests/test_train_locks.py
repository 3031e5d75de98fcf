"""`elastilab vit train` and `elastilab vlm train` hold --out as `elastilab train` does (files.folder_lock): a second
run on the same folder is refused (exit 2, naming the holder's pid), and the first run's files are untouched."""
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from elastilab.analysis import vision, vlm
from elastilab.cli import main as cli

COMMANDS = [(vision, "train", ["vit", "train", "--domain", "photos", "--steps", "1"]),
            (vlm, "train_visual_router", ["vlm", "train", "--steps", "1"])]


@pytest.mark.parametrize("module, name, argv", COMMANDS, ids=["vit", "vlm"])
def test_a_second_train_on_the_same_out_is_refused_and_the_first_runs_files_stay(
        module, name, argv, monkeypatch, tmp_path, capsys):
    out = tmp_path / "out"
    training, finish = threading.Event(), threading.Event()

    def fake_train(*args, **kwargs):  # writes into --out as the real one does; the first run (a thread) waits
        first = threading.current_thread() is not threading.main_thread()
        out.mkdir(exist_ok=True)
        (out / "routers.json").write_text("first" if first else "second")
        if first:
            training.set()
            finish.wait(60)
        return {}

    monkeypatch.setattr(module, name, functools.wraps(getattr(module, name))(fake_train))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(cli.main, [*argv, "--out", str(out)])
        assert training.wait(60)
        try:
            second = cli.main([*argv, "--out", str(out)])
        finally:
            finish.set()
        assert first.result(60) == 0 and second == 2
    assert (out / "routers.json").read_text() == "first"
    assert (f"--out {out} is in use by another elastilab run (pid {os.getpid()}, which holds "
            f"{out / '.elastilab.lock'}); wait for it to finish, or choose another folder") in capsys.readouterr().err
    assert not (out / ".elastilab.lock").exists()
    assert cli.main([*argv, "--out", str(out)]) == 0  # free again once the first run ended
    assert (out / "routers.json").read_text() == "second"
