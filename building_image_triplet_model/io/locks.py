"""The one lock idiom: a POSIX record lock (``lockf``) on a file. Standard library only.

POSIX locks belong to the process and are not inherited across fork, so a child that outlives a killed
parent for a moment never keeps the next holder out; the kernel drops the lock the instant the holder dies,
however it dies. One caveat, the reason each lock file is opened in one place only: a POSIX lock also dies
when any descriptor of that file closes in the holding process.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

_BUSY = (errno.EACCES, errno.EAGAIN)


def acquire(path: Path, *, wait: bool = False) -> int | None:
    """An exclusive lock on ``path`` (created): its descriptor, to be closed to release it; None when
    another process holds it (``wait=False``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as exc:
        os.close(fd)
        if exc.errno in _BUSY:
            return None
        raise
    return fd


def held_by_other(path: Path) -> bool | None:
    """Whether another process holds the lock on ``path`` (None: no such file). Creates nothing; never
    call it on a lock this process holds (closing the probe would release it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _BUSY:
            return True
        raise
    finally:
        os.close(fd)
    return False
