"""Atomic file writes: a reader (or a crash) never sees a half-written checkpoint, cache or result; and
the lock that keeps two runs out of one output folder."""
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

#: written into every folder ``atomic_folder`` creates, listing the entries the library wrote there:
#: a folder is replaced only if it holds nothing else (a file a user added keeps the whole folder)
MARKER = ".elastilab-cache"
_MARKER_HEADER = "made by elastilab; replaced whole when rebuilt. Entries it wrote:"
_RANDOM = "[a-z0-9_]{8}"  # the random part of tempfile's names (mkstemp / mkdtemp)


def _umask() -> int:
    """The process's umask: read on Linux, else set and restored (a brief, process-wide change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def publish_files(tmp: Path) -> None:
    """Give every file under ``tmp`` the permissions of a file the user creates (umask), and
    every folder those of a folder: libraries saving into ``tmp`` may have used mkstemp (0600)."""
    mask = _umask()
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(Path(root) / d, 0o777 & ~mask)
        for f in files:
            os.chmod(Path(root) / f, 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700 folders


def atomic_folder(path: str | Path, fill) -> Path:
    """Call ``fill(tmp_dir)`` on a fresh folder next to ``path``, then swap it in for ``path``.

    An existing ``path`` is replaced only if it is empty or was made here (it holds ``MARKER``):
    a folder of the user's that happens to sit at ``path`` is never deleted."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    old = None
    try:
        fill(tmp)
        written = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text("\n".join([_MARKER_HEADER, *written]) + "\n")
        publish_files(tmp)
        if path.exists():  # an older or half-written folder of ours: move it aside, swap, delete
            if not _replaceable(path):  # (checked again: it may have changed while fill ran)
                raise FileExistsError(f"{path} changed while it was being rebuilt and is no longer ours")
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-old-"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():  # put the old folder back
            os.replace(old / path.name, path)
        raise
    finally:
        if old is not None:  # our mkdtemp folder, holding only the replaced folder (checked as ours)
            shutil.rmtree(old, ignore_errors=True)
    return path


def check_replaceable(path: str | Path) -> None:
    """Raise unless ``atomic_folder`` may replace ``path``: call it before expensive work."""
    path = Path(path)
    if path.exists() and not _replaceable(path):
        foreign = sorted(_foreign(path))[:5] if path.is_dir() else []
        raise FileExistsError(
            f"{path} exists and holds files elastilab did not write ({', '.join(foreign) or 'it is not a folder'}; "
            f"only a folder whose {MARKER} lists all its entries is replaced), so it is not replaced; move "
            f"or delete it yourself, or point ELASTILAB_CACHE to another folder")


def _foreign(path: Path) -> set[str]:
    """Entries of ``path`` that its marker does not list (all of them without a marker)."""
    marker = path / MARKER
    lines = marker.read_text().splitlines() if marker.is_file() else []
    ours = set(lines[1:]) if lines[:1] == [_MARKER_HEADER] else set()
    return {p.name for p in path.iterdir()} - ours - {MARKER}


def _replaceable(path: Path) -> bool:
    return path.is_dir() and not _foreign(path)


def atomic_files(folder: str | Path, writers: dict, tag: str) -> Path:
    """Write several files of ``folder`` as one unit: ``writers`` maps file names to ``write(path)``.

    All are written into a temporary folder ``.<tag>.*.tmp``, which is then renamed to
    ``.<tag>.pending`` (the commit point) and its files moved into ``folder``. A run killed before
    the commit leaves the old files in place (its temporary folder is removed on the next save);
    one killed after it leaves the rest of the new files in ``.<tag>.pending``, which readers
    (``current_files``) take in preference and the next save moves in: never old and new mixed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pending = folder / f".{tag}.pending"
    _finish(pending, writers)
    _remove_stale(folder, writers, tag)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{tag}.", suffix=".tmp"))
    try:
        for name, write in writers.items():
            write(tmp / name)
        publish_files(tmp)
        os.replace(tmp, pending)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _finish(pending, writers)
    return folder


def _remove_stale(folder: Path, names, tag: str) -> None:
    """Temporaries that killed saves left: our mkdtemp folders ``.<tag>.XXXXXXXX.tmp`` holding nothing
    but the unit's files, and atomic_write's ``.<name>.XXXXXXXX.tmp`` files of the unit's names (which
    earlier saves used). Names are matched exactly; anything else in ``folder`` is left alone."""
    ours = re.compile(rf"\.(?:{re.escape(tag)}|{'|'.join(map(re.escape, names))})\.{_RANDOM}\.tmp")
    for t in folder.iterdir():
        if not ours.fullmatch(t.name):
            continue
        if t.is_dir() and not t.is_symlink():
            # only plain files of the unit's names inside: a folder or link in there is not what a save left
            if all(p.name in names and p.is_file() and not p.is_symlink() for p in t.iterdir()):
                shutil.rmtree(t, ignore_errors=True)
        elif t.is_file():
            t.unlink(missing_ok=True)


def current_files(folder: str | Path, names, tag: str) -> dict[str, Path]:
    """Where to read each file of a unit written by ``atomic_files``: from ``.<tag>.pending`` where a
    save was interrupted after its commit point, else from ``folder``."""
    folder = Path(folder)
    pending = folder / f".{tag}.pending"
    return {n: pending / n if (pending / n).is_file() else folder / n for n in names}


def _finish(pending: Path, names) -> None:
    """Move the committed files of ``pending`` (the unit's ``names`` only) into its folder."""
    if pending.is_dir():
        for name in names:
            if (pending / name).is_file():
                os.replace(pending / name, pending.parent / name)
        if not any(pending.iterdir()):
            pending.rmdir()


@contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT) inside the block takes effect when it ends: files written together (a checkpoint's
    routers and trainer state) are never left from two different steps. Main thread only (signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *sig: caught.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(*caught[0])  # the handler that was there, e.g. Python's: raises KeyboardInterrupt


#: the lock file ``folder_lock`` keeps in the folder it holds, with the holder's pid
LOCK = ".elastilab.lock"


@contextmanager
def folder_lock(folder: str | Path, what: str = "folder"):
    """Hold ``folder`` (created if needed) for the block, or refuse with the pid of the process that holds
    it. The lock is an flock on ``LOCK``, which the OS drops when its process dies: a lock file left by a
    dead process is taken over at once, never waited on. The lock file is removed at the end, and the
    folder too if it was created here and is still empty."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what} {folder} is a file, not a folder; choose another path")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(folder / LOCK, f"{what} {folder}")
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write to {what} {folder}: {exc.strerror or exc}") from exc
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        (folder / LOCK).unlink(missing_ok=True)  # while still held: the next run creates a fresh file
        os.close(fd)
        if created:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                pass


def _acquire(path: Path, what: str) -> int:
    """An open descriptor of ``path`` holding its exclusive flock; RuntimeError naming the holder's pid."""
    import fcntl
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(f"{what} is in use by another elastilab run (pid {holder}, which holds {path}); "
                               "wait for it to finish, or choose another folder") from None
        try:  # the previous holder may have removed the file between our open and our lock: open it again
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
