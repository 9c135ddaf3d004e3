"""Failpoints: named moments where the crash-safety tests kill the processor with a real signal.

Inactive (one dict lookup) unless TRIPLET_FAILPOINT is set, e.g. ``embed.chunk@2`` (SIGKILL the
processor's whole process group at the 2nd chunk) or ``write:*.npz@1:TERM``. A pattern is matched with
fnmatch against the point's name; ``write:<file name>`` points sit between a file's fsync and its rename.
The action STALL sleeps for an hour instead (to test the stop watchdog); FILL fills the disk that holds the
file TRIPLET_FILL names (a real full disk at that moment, for the full-disk tests) and goes on. For tests
only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import threading
import time

_SPEC = os.environ.get("TRIPLET_FAILPOINT", "")
_lock = threading.Lock()
_count = 0


def _parse(spec: str) -> tuple[str, int, str]:
    pattern, _, rest = spec.partition("@")
    nth, _, action = rest.partition(":")
    return pattern, int(nth or 1), (action or "KILL").upper()


def point(name: str) -> None:
    if not _SPEC:
        return
    _hit(name)


def _hit(name: str) -> None:
    global _count
    pattern, nth, action = _parse(_SPEC)
    if not fnmatch.fnmatchcase(name, pattern):
        return
    with _lock:
        _count += 1
        if _count != nth:
            return
    if action == "STALL":
        time.sleep(3600)
        return
    if action == "FILL":
        fill(os.environ["TRIPLET_FILL"])
        return
    sig = getattr(signal, f"SIG{action}")
    try:
        os.killpg(os.getpgid(0), sig)  # the whole job, as systemd or a power cut would
    except PermissionError:
        os.kill(os.getpid(), sig)
    if sig == signal.SIGKILL:
        time.sleep(60)  # never returns


def fill(path: str) -> None:
    """Write ``path`` until its disk has no byte left (each write size until ENOSPC, then a smaller one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 4096, 1):
            block = bytes(size)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)
