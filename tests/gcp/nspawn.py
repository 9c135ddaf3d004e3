"""A pristine Debian 12 root booted with ``systemd-nspawn -b``: Debian's own systemd 252 as PID 1, so that
transient units (``systemd-run``), ``KillMode``, mount units and a real poweroff behave as on the VM.

    box = Booted(root, tmp / "boot.log", binds=[...], devices=["/dev/loop3"]).boot()
    box.run(["systemctl", "is-system-running"])     # nsenter into every namespace of the container
    box.path("/mnt/work/state")                     # the container's view of a path (its mounts included)
    box.poweroff()                                  # SIGRTMIN+4 to its PID 1: what ACPI soft-off starts

It shares this machine's network (servers on 127.0.0.1 are reachable) and has no machined registration (no
systemd runs here). Nothing it mounts leaks out: it has its own mount namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# The PATH systemd gives its services (and so the guest agent's scripts).
UNIT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def skip_reason() -> str | None:
    """Why no container can be booted here (None when one can)."""
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (make sys-deps: systemd-container)"
    if shutil.which("nsenter") is None:
        return "nsenter is not installed"
    return None


@dataclass
class Booted:
    root: Path
    log: Path
    binds: list[tuple[str, str]] = field(default_factory=list)  # (host path, path inside), read-write
    binds_ro: list[tuple[str, str]] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  # device nodes bound in (loop devices)
    name: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:12]}")
    proc: subprocess.Popen[bytes] | None = None

    def boot(self, timeout: float = 120, wait_running: bool = True) -> Booted:
        """Start the container; return once its systemd answers (and, with ``wait_running``, once the boot
        is over: `systemctl is-system-running --wait`)."""
        args = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", f"--machine={self.name}"]
        args += [f"--bind={h}:{c}" for h, c in self.binds]
        args += [f"--bind-ro={h}:{c}" for h, c in self.binds_ro]
        args += [f"--bind={d}" for d in self.devices]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [*args, "-b", "-D", str(self.root)],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        wanted = ("running", "degraded") if wait_running else ("starting", "running", "degraded")
        wait = ["--wait"] if wait_running else []
        while True:
            r = self.run(["systemctl", "is-system-running", *wait], timeout=timeout, check_leader=False)
            if r is not None and r.stdout.strip() in wanted:
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the container did not boot:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)

    def leader(self) -> int | None:
        """The container's PID 1 (nspawn's child), once it runs systemd."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        pids = out.stdout.split()
        if not pids:
            return None
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pids[0]}/comm").read_text().strip() == "systemd":
                return int(pids[0])
        return None

    def run(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        timeout: float = 120,
        check_leader: bool = True,
    ) -> subprocess.CompletedProcess[str] | None:
        """``argv`` inside the container (all its namespaces, its root), with only ``env`` and PATH."""
        pid = self.leader()
        if pid is None:
            assert not check_leader, "the container is not running"
            return None
        full = {"PATH": UNIT_PATH, **(env or {})}
        return subprocess.run(
            [
                "nsenter",
                "-t",
                str(pid),
                "-a",
                "/usr/bin/env",
                "-i",
                *(f"{k}={v}" for k, v in full.items()),
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def path(self, inside: str) -> Path:
        """A path as the container sees it (its own mounts included), read from here."""
        pid = self.leader()
        assert pid is not None, "the container is not running"
        return Path(f"/proc/{pid}/root") / inside.lstrip("/")

    def poweroff(self, timeout: float = 120) -> int:
        """What GCE's ACPI soft-off makes systemd do (SIGRTMIN+4 to PID 1: poweroff.target, as
        `machinectl poweroff`); waits until the container is gone and returns nspawn's exit status."""
        assert self.proc is not None
        pid = self.leader()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGRTMIN + 4)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Pull the plug (test cleanup)."""
        if self.proc is not None and self.proc.poll() is None:
            pid = self.leader()
            for target in (pid, -self.proc.pid):  # PID 1 takes its whole PID namespace with it
                if target is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(target, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
