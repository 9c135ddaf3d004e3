"""Helpers for the VM bootstrap tests (imported by the tests and by conftest.py; a module of its own so that
no test depends on which conftest.py pytest imported last). Engine helpers (REPO, kill_group, TINY, artifact
readers) live once, in tests/engine_helpers.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_helpers import REPO, kill_group
from gcp_servers import MetadataServer, free_env

from building_image_triplet_model import sample_data

SCRIPTS = REPO / "gcp" / "scripts"
FAKE_ENGINE = Path(__file__).resolve().parent / "fake_engine"


# ---------------------------------------------------------------------------------------------- scripts
def script_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for running the bootstrap scripts on this machine: no system/disk/repo steps, direct mode,
    folders under ``tmp``, no metadata server unless a test adds one."""
    env = free_env()
    env.update(
        {
            "TRIPLET_SKIP_SYSTEM": "1",
            "TRIPLET_SKIP_DISKS": "1",
            "TRIPLET_SKIP_REPO": "1",
            "TRIPLET_SKIP_UV_SYNC": "1",
            "TRIPLET_METADATA": "off",
            "TRIPLET_RUN_MODE": "direct",
            "TRIPLET_REPO_DIR": str(REPO),
            "TRIPLET_PYTHON": sys.executable,
            "TRIPLET_MOUNT_RAW": str(tmp / "raw"),
            "TRIPLET_MOUNT_WORK": str(tmp / "work"),
            "TRIPLET_RUN_DIR": str(tmp / "run"),
            "TRIPLET_RETRY_BASE_S": "0",
            "TRIPLET_DOWNLOAD_ROUNDS": "2",
            "TRIPLET_ARIA2_RETRY_WAIT": "1",
            "TRIPLET_ARIA2_MAX_TRIES": "3",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def run_script(
    name: str, *args: str, env: dict[str, str], timeout: float = 300, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def start_script(
    name: str, *args: str, env: dict[str, str], log: Path, cwd: Path = REPO
) -> subprocess.Popen[bytes]:
    """Start a script in the background, in its own process group, its output in ``log``."""
    with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            ["bash", str(SCRIPTS / name), *args],
            env=env,
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_group_gone(pgid: int, timeout: float = 60) -> None:
    """Wait until no process of the group is left (children may outlive the leader for a moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)


def preempt(proc: subprocess.Popen[bytes], env: dict[str, str], metadata: MetadataServer) -> None:
    """What a preemption does to a running startup flow under systemd (KillMode=mixed, TimeoutStopSec=25):
    SIGTERM to the main process alone (ACPI soft-off stops the unit), the shutdown script with
    instance/preempted=TRUE at the same time, and SIGKILL to everything left in the unit once its main
    process has exited (or 25 s have passed; the power goes 30 s after the soft-off)."""
    metadata.values["instance/preempted"] = "TRUE"
    os.kill(proc.pid, signal.SIGTERM)
    log = Path(env["TRIPLET_MOUNT_WORK"]).parent / f"shutdown-{time.monotonic_ns()}.log"
    sd = start_script("shutdown_preprocess.sh", env=env, log=log)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(25)
    kill_group(proc, signal.SIGKILL)
    try:
        assert sd.wait(30) == 0, log.read_text()
    finally:
        kill_group(sd, signal.SIGKILL)
        metadata.values["instance/preempted"] = "FALSE"


def marker(work: Path, name: str) -> dict[str, Any]:
    """A state marker of the work disk (``state/<name>.json``)."""
    return json.loads((work / "state" / f"{name}.json").read_text())


def write_manifest(path: Path, entries: list[tuple[str, str]]) -> Path:
    """An aria2c manifest: (URI, out) pairs."""
    path.write_text("".join(f"{uri}\n\tout={out}\n" for uri, out in entries))
    return path


# ----------------------------------------------------------------------------------------- test data
def sample_archives(
    out: Path, archives: int = 2, targets: int = 3, image_size: int = 64, seed: int = 0, bad: bool = False
) -> list[Path]:
    """Real archives in the upstream layout from the package's sample_data (0003.tar, 0004.tar, 0009.tar,
    ... in that order), small images so that they are quick to make; without sample_data's planted.json."""
    summary = sample_data.generate(
        sample_data.Options(
            out=out, archives=archives, targets_per_archive=targets, image_size=image_size, seed=seed, bad=bad
        )
    )
    (out / "planted.json").unlink()
    return [out / a["archive"] for a in summary["archives"]]


def regular_members(archive: Path) -> dict[str, bytes]:
    """The regular files of a tar, by member name."""
    with tarfile.open(archive) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}  # type: ignore[union-attr]


def add_member(tf: tarfile.TarFile, name: str, data: bytes, mtime: int = 1_460_000_000) -> None:
    """One regular member. For the hand-made hostile archives that sample_data (upstream layout only)
    cannot make: absolute names, '..', links, devices."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    tf.addfile(info, io.BytesIO(data))


@dataclass
class Emulator:
    url: str
    root: Path

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "GOOGLE_CLOUD_PROJECT": "test-project"}

    def client(self) -> Any:
        os.environ["STORAGE_EMULATOR_HOST"] = self.url
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test-project", credentials=AnonymousCredentials())

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, Any]:
        return {b.name: b for b in self.client().list_blobs(bucket, prefix=prefix or None)}


@dataclass
class LoopDisks:
    tmp: Path
    devices: dict[str, str]  # disk name -> /dev/loopN

    def run(self, script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run bash ``script`` in a private mount namespace where /dev is an overlay (nothing leaks to the
        host's /dev) with /dev/disk/by-id/google-NAME -> the loop devices."""
        links = "\n".join(f"ln -s {dev} /dev/disk/by-id/google-{name}" for name, dev in self.devices.items())
        up, wk = self.tmp / "dev-up", self.tmp / "dev-wk"
        up.mkdir(exist_ok=True)
        wk.mkdir(exist_ok=True)
        wrapper = f"""set -e
mount -t overlay overlay -o lowerdir=/dev,upperdir={up},workdir={wk} /dev
mkdir -p /dev/disk
mount -t tmpfs tmpfs /dev/disk
mkdir -p /dev/disk/by-id
{links}
set +e
{script}
"""
        return subprocess.run(
            ["unshare", "-m", "--propagation", "private", "bash", "-c", wrapper],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def unshare_skip_reason(*tools: str) -> str | None:
    """Why this machine cannot run a test in a private mount namespace (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (mount, unshare -m)"
    for tool in ("unshare", "mount", *tools):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare -m is not allowed here: {probe.stderr.decode().strip()}"
    return None


def loop_skip_reason() -> str | None:
    return unshare_skip_reason("losetup", "mkfs.ext4", "blkid")


@contextlib.contextmanager
def attached_loop_disks(tmp: Path, sizes: dict[str, int]) -> Iterator[LoopDisks]:
    """Blank loop devices (sparse images of ``sizes`` bytes, by disk name) for a test; skips it, with the
    reason, where loop devices cannot be used; detached at the end."""
    import pytest

    reason = loop_skip_reason()
    if reason:
        pytest.skip(f"loop-device disks unavailable: {reason}")
    devices: dict[str, str] = {}
    try:
        for name, size in sizes.items():
            img = tmp / f"{name}.img"
            with open(img, "wb") as f:
                f.truncate(size)
            out = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
            if out.returncode != 0:
                pytest.skip(f"losetup is not allowed here: {out.stderr.strip()}")
            devices[name] = out.stdout.strip()
        yield LoopDisks(tmp, devices)
    finally:
        for dev in devices.values():
            subprocess.run(["umount", "-l", dev], capture_output=True)
            subprocess.run(["losetup", "-d", dev], capture_output=True)
