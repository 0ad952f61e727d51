"""One writer per output: an exclusive lock on an `--out` (or a cache entry), held for one command.

`exclusive(path)` takes an advisory `flock` on `.<name>.lock` beside `path` (so the lock
never sits inside the output it guards, and an output assembled aside and renamed into
place keeps its lock). A second process asking for the same path is refused at once with
one `IsdaVizError` naming the holder's pid. The kernel drops an `flock` when its process
dies however it dies, so a lock file left by a killed process is taken over by the next
run (removed and made anew); the holder removes the file when it is done.

A lock path is only ever a lock file of ours: it is opened with `O_NOFOLLOW` (a planted
symbolic link is refused, never followed), must be a regular file with one name that holds
nothing but a pid, and the pid is written only into a file this process created
(`O_CREAT | O_EXCL`). So no lock can be turned into a write, truncation or removal elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path

from isda_viz.errors import IsdaVizError

_PID_TEXT = re.compile(rb"\d{0,20}\n?")   # all a lock file of ours ever holds (empty: a full disk)


def lock_path(path) -> Path:
    """The lock file guarding `path`: `.<name>.lock` in the same folder."""
    path = Path(path).expanduser().absolute()
    return path.parent / f".{path.name}.lock"


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _open_lock_file(lock: Path, what: str, path: Path) -> tuple[int, bool]:
    """A descriptor of the lock file at `lock` and whether this call created it. An existing one is opened
    read-only without following links and must look like a lock of ours; anything else is an `IsdaVizError`."""
    refuse = f"cannot lock {what} {path}: its lock file {lock}"
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), True
    except FileExistsError:
        pass
    except OSError as e:
        raise IsdaVizError(f"{refuse} cannot be created ({os.strerror(e.errno)})") from None
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1, False  # removed meanwhile by its holder: try again
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IsdaVizError(f"{refuse} is a symbolic link, which isda-viz never makes or follows; remove the "
                               "link") from None
        raise IsdaVizError(f"{refuse} cannot be opened ({os.strerror(e.errno)})") from None
    info = os.fstat(fd)
    why = None
    if not stat.S_ISREG(info.st_mode):
        why = f"is {_kind(info.st_mode)}, not a lock file"
    elif info.st_nlink != 1:
        why = "has other names (hard links), so it is not a lock file of isda-viz"
    elif info.st_size > 32 or not _PID_TEXT.fullmatch(os.pread(fd, 64, 0)):
        why = "holds something other than a process id, so it is not a lock file of isda-viz"
    if why is not None:
        os.close(fd)
        raise IsdaVizError(f"{refuse} {why}; move it away or choose another {what}")
    return fd, False


def _same_file(fd: int, lock: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(lock, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _open_locked(lock: Path, what: str, path: Path, wait) -> int:
    """A descriptor of `lock`, created by this call and holding its exclusive flock; the file is the one at
    `lock` now. `wait`: None refuses a held lock; a function is told the holder and the lock is then waited
    for. A lock file left by a process that died is removed (holding its lock) and made anew."""
    while True:
        fd, created = _open_lock_file(lock, what, path)
        if fd < 0:
            continue
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
        if _same_file(fd, lock):  # the holder we waited on may have removed the file: lock the one there now
            if created:
                return fd
            os.unlink(lock)  # left by a dead process (we hold its lock): make our own, which we may write
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
        os.write(fd, f"{os.getpid()}\n".encode())  # into the file this process created, and only that
    except OSError:
        pass  # a full disk: the lock holds all the same, only its pid is not written
    try:
        yield lock
    finally:
        try:
            if _same_file(fd, lock):
                os.unlink(lock)  # while still holding it: a waiter re-checks the inode and retries
        except OSError:
            pass
        os.close(fd)
        for folder in created:  # folders made only to hold the lock, left empty by a failed command
            try:
                folder.rmdir()
            except OSError:
                break
