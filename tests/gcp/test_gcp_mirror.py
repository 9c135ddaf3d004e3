"""The raw bucket's mirror: real aria2c against the Range-capable server on 127.0.0.1, fake-gcs-server as the
bucket, the mirror killed (SIGKILL, SIGTERM) mid-download and run again, a bad archive refused by name."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_helpers import REPO, kill_group
from gcp_helpers import (
    Emulator,
    sample_archives,
    script_env,
    served_manifest,
    wait_group_gone,
    write_manifest,
)

from building_image_triplet_model.inputs import manifest
from tools.fileserver import RangeServer

pytestmark = pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed (make sys-deps)")
STAGING = Path(".triplet-downloads") / "partial" / "dataset_unaligned"


def mirror_cmd(m: Path, to: str, tmp_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "building_image_triplet_model.remote.mirror",
        "--manifest",
        str(m),
        "--to",
        to,
        "--work",
        str(tmp_path / "work"),
        "--out-manifest",
        str(tmp_path / "mirrored.txt"),
    ]


def env_for(tmp_path: Path, emulator: Emulator) -> dict[str, str]:
    return script_env(
        tmp_path, **emulator.env(), TRIPLET_ARIA2_AUTO_SAVE_INTERVAL="1", TRIPLET_DOWNLOAD_ROUNDS="1"
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_an_interrupted_mirror_resumes_and_ends_equal(
    tmp_path: Path, range_server: RangeServer, gcs_emulator: Emulator, bucket: str, sig: int
) -> None:
    archives = sample_archives(range_server.root, archives=2, targets=8, image_size=96)
    m = served_manifest(tmp_path / "m.txt", range_server, [a.name for a in archives])
    to = f"gs://{bucket}/archives"
    env = env_for(tmp_path, gcs_emulator)
    first = archives[0]
    range_server.rate = first.stat().st_size // 5  # ~5 s for the first archive
    log = tmp_path / "1.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            mirror_cmd(m, to, tmp_path),
            env=env,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    part = tmp_path / "work" / STAGING / first.name
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (
            part.exists()
            and part.stat().st_size > first.stat().st_size // 5
            and Path(f"{part}.aria2").exists()
        ):
            time.sleep(1.2)
            break
        time.sleep(0.05)
    else:
        pytest.fail("download never started: " + log.read_text())
    kill_group(proc, sig)
    rc = proc.wait(60)
    wait_group_gone(proc.pid)
    if sig == signal.SIGTERM:
        assert rc == 75, log.read_text()
        assert "run the same command again" in log.read_text()
    assert Path(f"{part}.aria2").exists(), "aria2c's state is kept for the next run"
    assert gcs_emulator.objects(bucket) == {}, "nothing unverified reaches the bucket"

    range_server.rate = None
    n_before = len(range_server.requests)
    r = subprocess.run(
        mirror_cmd(m, to, tmp_path), env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    objects = gcs_emulator.objects(bucket)
    for a in archives:
        blob = objects[f"archives/dataset_unaligned/{a.name}"]
        assert blob.download_as_bytes() == a.read_bytes()
    resumed = [q for q in range_server.requests[n_before:] if q.path == f"/{first.name}" and q.status == 206]
    assert resumed, "the second run resumes the interrupted download with a Range request"
    # The manifest now reads every archive from the bucket, under the same names.
    entries = manifest.load(tmp_path / "mirrored.txt")
    assert [(e.kind, e.uri, e.out) for e in entries] == [
        ("gs", f"{to}/dataset_unaligned/{a.name}", f"dataset_unaligned/{a.name}") for a in archives
    ]
    assert f"the manifest that reads them from there: {tmp_path / 'mirrored.txt'}" in r.stderr
    assert not list((tmp_path / "work").rglob("*.tar")), "each archive is deleted locally once uploaded"
    # A third run finds everything there and downloads nothing.
    n_before = len(range_server.requests)
    r = subprocess.run(
        mirror_cmd(m, to, tmp_path), env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert len(range_server.requests) == n_before
    assert r.stderr.count("already in") == len(archives)


def test_an_archive_that_does_not_verify_is_refused_by_name(
    tmp_path: Path, range_server: RangeServer, gcs_emulator: Emulator, bucket: str
) -> None:
    good, bad = sample_archives(range_server.root, archives=2, targets=4, image_size=64)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the server has a truncated archive
    m = write_manifest(
        tmp_path / "m.txt",
        [(f"{range_server.url}/{a.name}", f"dataset_unaligned/{a.name}") for a in (good, bad)],
    )
    to = f"gs://{bucket}/archives"
    r = subprocess.run(
        mirror_cmd(m, to, tmp_path),
        env=env_for(tmp_path, gcs_emulator),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 3, r.stderr
    assert (
        f"REFUSED: dataset_unaligned/{bad.name} ({range_server.url}/{bad.name}) did not download whole"
        in r.stderr
    )
    assert set(gcs_emulator.objects(bucket)) == {f"archives/dataset_unaligned/{good.name}"}
    assert not (tmp_path / "mirrored.txt").exists(), "no manifest points at an incomplete mirror"
