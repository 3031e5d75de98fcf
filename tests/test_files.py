"""Checkpoints, caches and results are written atomically: a failed write never leaves a broken file."""
import os
import tempfile

import pytest

from elastilab.files import MARKER, atomic_folder, atomic_write


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
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "a"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    atomic_folder(target, lambda tmp: (tmp / "b").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "b"]


def test_a_folder_not_made_here_is_never_replaced(tmp_path):
    target = tmp_path / "smollm2-135m"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError,
                       match="smollm2-135m exists and holds files elastilab did not write \\(notes.txt"):
        atomic_folder(target, lambda tmp: (tmp / "a").write_text("1"))
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]
    (target / "notes.txt").unlink()  # an empty folder may be filled
    atomic_folder(target, lambda tmp: (tmp / "a").write_text("1"))
    assert (target / MARKER).is_file()  # ours now: it may be replaced
    atomic_folder(target, lambda tmp: (tmp / "b").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "b"]


def test_a_users_file_inside_our_folder_keeps_the_whole_folder(tmp_path):
    """The marker lists what the library wrote: a file a user adds to a folder of ours is never
    deleted with it (the rebuild is refused, naming the file)."""
    target = tmp_path / "cache"
    atomic_folder(target, lambda tmp: (tmp / "model.safetensors").write_text("1"))
    (target / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"holds files elastilab did not write \(notes.txt"):
        atomic_folder(target, lambda tmp: (tmp / "model.safetensors").write_text("2"))
    assert (target / "notes.txt").read_text() == "precious" and (target / "model.safetensors").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary folder left either


def test_written_files_follow_the_users_umask(tmp_path):
    def fill(tmp):  # libraries may write with mkstemp, which makes 0600 files
        fd, _ = tempfile.mkstemp(dir=tmp)
        os.close(fd)
        (tmp / "sub").mkdir(mode=0o700)

    old = os.umask(0o002)
    try:
        atomic_write(tmp_path / "f.json", lambda tmp: open(tmp, "w").write("{}"))
        atomic_folder(tmp_path / "cache", fill)
    finally:
        os.umask(old)
    mode = lambda p: oct(os.stat(p).st_mode & 0o777)
    assert mode(tmp_path / "f.json") == "0o664"
    assert {mode(p) for p in (tmp_path / "cache").iterdir() if p.is_file()} == {"0o664"}
    assert mode(tmp_path / "cache") == mode(tmp_path / "cache" / "sub") == "0o775"
