"""Ctrl-C on a terminal: the real processor under a real pseudo-terminal, its decode workers running.

The terminal's line discipline turns the ^C byte into SIGINT for the whole foreground process group: the
processor and every worker it forked. One line must come of it, the exit code 75, nothing from a worker.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios
import time
from pathlib import Path

from engine_helpers import REPO, make_archives, tiny_config

from building_image_triplet_model.exit_codes import Exit


def _read_until(fd: int, buf: bytearray, done, limit_s: float) -> bool:
    """Read the terminal until done(buf) or EOF; False at EOF or after limit_s."""
    end = time.monotonic() + limit_s
    while not done(buf):
        if time.monotonic() > end:
            return False
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every process holding the terminal has gone
            return False
        if not chunk:
            return False
        buf += chunk
    return True


def test_one_ctrl_c_gives_one_line_and_exit_75_and_nothing_from_the_workers(tmp_path: Path) -> None:
    make_archives(tmp_path / "raw", archives=3, targets=40, bad=False)
    cfg = tiny_config(
        tmp_path, tmp_path / "raw", num_workers=2, feature_model="resnet18", image_size=64, batch_size=4
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRIPLET_FAILPOINT", None)
    argv = [sys.executable, "-m", "building_image_triplet_model.dataset_processor", "--config", str(cfg)]
    pid, fd = pty.fork()  # the child leads a new session whose controlling terminal is this pty
    if pid == 0:  # pragma: no cover - the child
        os.chdir(REPO)
        os.execvpe(argv[0], argv, env)  # noqa: S606 - the argv is ours
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # bars as on a terminal
        buf = bytearray()
        # embedding has started: the bar has counted images (decode workers are running)
        started = _read_until(fd, buf, lambda b: re.search(rb"embed: +\d+%\|[^\r]*\| [1-9]\d*/", b), 300)
        assert started, buf.decode(errors="replace")[-3000:]
        before = len(buf)
        os.write(fd, b"\x03")  # Ctrl-C, as typed
        _read_until(fd, buf, lambda b: False, 120)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    out = buf.decode(errors="replace")
    after = buf[before:].decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == Exit.INTERRUPTED, out[-3000:]
    lines = [ln for ln in re.split(r"[\r\n]+", after) if re.search(r"\w+\[\d+\]: ", ln)]
    said = [ln for ln in lines if "SIGINT" in ln]
    assert len(said) == 1, lines
    assert "run the same command again" in said[0]
    # nothing from a worker: every log line is the processor's own, no worker error, no bar from zero
    pids = {m for m in re.findall(r"\w+\[(\d+)\]: ", out)}
    assert pids == {str(pid)}, lines
    for word in ("DataLoader", "exited unexpectedly", "still busy", "Traceback", "Error"):
        assert word not in after, after
    assert not re.search(r"embed: +0%", after), after
    assert lines == said, lines  # and nothing else is said
