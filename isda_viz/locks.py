"""One writer per output: an exclusive lock on an `--out` (or a cache entry), held for one command.

`exclusive(path)` takes an advisory `flock` on `.<name>.lock` beside `path` (so the lock
never sits inside the output it guards, and an output assembled aside and renamed into
place keeps its lock). A second process asking for the same path is refused at once with
one `IsdaVizError` naming the holder's pid. The kernel drops an `flock` when its process
dies however it dies, so a lock file left by a killed process is simply taken over by the
next run; the holder removes the file when it is done.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from isda_viz.errors import IsdaVizError


def lock_path(path) -> Path:
    """The lock file guarding `path`: `.<name>.lock` in the same folder."""
    path = Path(path).expanduser().absolute()
    return path.parent / f".{path.name}.lock"


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _open_locked(lock: Path, what: str, path: Path, wait) -> int:
    """A descriptor of `lock` holding its exclusive flock; the file is the one at `lock` now. `wait`: None
    refuses a held lock; a function is told the holder and the lock is then waited for."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise IsdaVizError(f"cannot lock {what} {path}: {lock} cannot be created ({os.strerror(e.errno)})") \
                from None
        failure = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            failure = e.errno
        if failure in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(fd)
            if wait is None:
                os.close(fd)
                raise IsdaVizError(f"{what} {path} is in use by another isda-viz process ({holder}); wait for "
                                   f"it to finish or choose another {what}")
            wait(f"waiting for {holder}, which is writing {what} {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        elif failure is not None:
            os.close(fd)
            raise IsdaVizError(f"cannot lock {what} {path} ({os.strerror(failure)})")
        try:  # the holder we waited on may have removed the file: lock the one that is there now
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def exclusive(path, what: str = "--out", wait=None):
    """Hold the lock on `path` (a file or folder that may not exist yet) for the body; see the module doc.

    `what` names the path in messages (`--out`, `the audit index`); `wait`: None refuses a lock held by
    another process, a function (e.g. `print`) is told who holds it and the lock is waited for."""
    path = Path(path).expanduser()
    lock = lock_path(path)
    created = [p for p in [lock.parent, *lock.parent.parents] if not p.exists()]
    if created:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IsdaVizError(f"cannot create the folder of {what} {path}: {os.strerror(e.errno)}") from None
    fd = _open_locked(lock, what, path, wait)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # a full disk: the lock holds all the same, only its pid is not written
    try:
        yield lock
    finally:
        try:
            os.unlink(lock)  # while still holding it: a waiter re-checks the inode and retries
        except OSError:
            pass
        os.close(fd)
        for folder in created:  # folders made only to hold the lock, left empty by a failed command
            try:
                folder.rmdir()
            except OSError:
                break
