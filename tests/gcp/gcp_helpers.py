"""Helpers for the VM bootstrap tests (imported by the tests and by conftest.py; a module of its own so that
no test depends on which conftest.py pytest imported last)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcp_servers import free_env

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "gcp" / "scripts"


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
    fh = open(log, "ab")  # noqa: SIM115 (closed by the caller through finish())
    return subprocess.Popen(
        ["bash", str(SCRIPTS / name), *args],
        env=env,
        cwd=cwd,
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


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


# ----------------------------------------------------------------------------------------- test data
def jpeg_bytes(seed: int, size: int = 64) -> bytes:
    """A real JPEG (Pillow), different for every seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def add_file(tf: tarfile.TarFile, name: str, data: bytes, mtime: int = 1_460_000_000) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    tf.addfile(info, io.BytesIO(data))


def make_tar(path: Path, dataset_id: str, n_images: int = 3, extra: bytes | None = None) -> Path:
    """An archive in the upstream layout: ``NNNN/<stem>.jpg`` + ``NNNN/<stem>.txt`` pairs of real JPEGs.
    ``extra`` adds a large incompressible member (so that a download takes long enough to interrupt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(n_images):
            stem = f"{dataset_id}/{i:06d}_{int(dataset_id)}"
            add_file(tf, f"{stem}.jpg", jpeg_bytes(int(dataset_id) * 1000 + i))
            d = f"d {int(dataset_id)} {i + 1} {i} {i} 40.7484 -73.9857 10 1 0 0 40.748 -73.985 2 30 90 0 0\n"
            add_file(tf, f"{stem}.txt", d.encode())
        if extra is not None:
            add_file(tf, f"{dataset_id}/blob.bin", extra)
    return path


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


def loop_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mount, unshare -m)"
    for tool in ("losetup", "unshare", "mkfs.ext4", "blkid", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare -m is not allowed here: {probe.stderr.decode().strip()}"
    return None
