"""Checkpoints, caches and results are written atomically: a failed write never leaves a broken file."""
import os

import pytest

from elastilab.files import atomic_folder, atomic_write


def test_failed_write_keeps_the_old_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "routers.json"
    atomic_write(target, lambda tmp: open(tmp, "w").write("old"))
    assert target.read_text() == "old" and oct(os.stat(target).st_mode & 0o777) == "0o644"

    def crash(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["routers.json"]


def test_folder_is_swapped_in_whole(tmp_path):
    target = tmp_path / "cache"
    atomic_folder(target, lambda tmp: (tmp / "a").write_text("1"))
    with pytest.raises(RuntimeError):
        atomic_folder(target, lambda tmp: ((tmp / "b").write_text("2"), (_ for _ in ()).throw(RuntimeError("x"))))
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    atomic_folder(target, lambda tmp: (tmp / "b").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b"]
