"""download_archives.sh: real aria2c against a Range-capable server on 127.0.0.1, killed and resumed."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from gcp_helpers import (
    REPO,
    Emulator,
    kill_group,
    make_tar,
    run_script,
    script_env,
    start_script,
    wait_group_gone,
)
from gcp_servers import RangeServer

pytestmark = pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed (make sys-deps)")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(path: Path, entries: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{uri}\n\tout={out}\n" for uri, out in entries))
    return path


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_download_resumes_to_the_right_bytes(
    tmp_path: Path, range_server: RangeServer, sig: int
) -> None:
    big = make_tar(range_server.root / "0088.tar", "0088", n_images=2, extra=os.urandom(3_000_000))
    small = make_tar(range_server.root / "0003.tar", "0003", n_images=2)
    m = manifest(
        tmp_path / "m.txt",
        [(f"{range_server.url}/0088.tar", "dataset_unaligned/0088.tar"),
         (f"{range_server.url}/0003.tar", "dataset_unaligned/0003.tar")],
    )  # fmt: skip
    raw = tmp_path / "raw"
    env = script_env(tmp_path, TRIPLET_ARIA2_AUTO_SAVE_INTERVAL="1")
    range_server.rate = 600_000  # bytes/s: the big archive takes ~5 s
    proc = start_script(
        "download_archives.sh", "--manifest", str(m), "--dir", str(raw), env=env, log=tmp_path / "1.log"
    )
    part = raw / "dataset_unaligned" / "0088.tar"
    deadline = time.monotonic() + 60
    # Wait until aria2c has saved real progress in its control file (auto-save every second).
    while time.monotonic() < deadline:
        if part.exists() and part.stat().st_size > 600_000 and Path(f"{part}.aria2").exists():
            time.sleep(1.2)
            break
        time.sleep(0.05)
    else:
        pytest.fail("download never started: " + (tmp_path / "1.log").read_text())
    kill_group(proc, sig)
    proc.wait(60)
    wait_group_gone(proc.pid)
    assert Path(f"{part}.aria2").exists(), "the partial download and its control file are kept"
    partial_size = part.stat().st_size
    assert partial_size > 0

    range_server.rate = None
    n_before = len(range_server.requests)
    r = run_script("download_archives.sh", "--manifest", str(m), "--dir", str(raw), env=env)
    assert r.returncode == 0, r.stderr
    assert sha256(part) == sha256(big)
    assert sha256(raw / "dataset_unaligned" / "0003.tar") == sha256(small)
    assert not Path(f"{part}.aria2").exists()
    resumed = [q for q in range_server.requests[n_before:] if q.path == "/0088.tar" and q.status == 206]
    assert resumed, "the second run must resume with a Range request"
    assert any(int(q.range.split("=")[1].split("-")[0]) > 0 for q in resumed if q.range), resumed
    assert "downloaded=" in r.stderr


def test_a_404_fails_the_phase_and_names_the_url(tmp_path: Path, range_server: RangeServer) -> None:
    make_tar(range_server.root / "0003.tar", "0003")
    m = manifest(
        tmp_path / "m.txt",
        [(f"{range_server.url}/0003.tar", "dataset_unaligned/0003.tar"),
         (f"{range_server.url}/0004.tar", "dataset_unaligned/0004.tar")],
    )  # fmt: skip
    raw = tmp_path / "raw"
    summary = tmp_path / "summary.json"
    r = run_script(
        "download_archives.sh", "--manifest", str(m), "--dir", str(raw), "--summary-json", str(summary),
        env=script_env(tmp_path),
    )  # fmt: skip
    assert r.returncode == 1
    assert f"{range_server.url}/0004.tar" in r.stderr.splitlines()[-1]
    assert (raw / "dataset_unaligned" / "0003.tar").exists()
    import json

    s = json.loads(summary.read_text())
    assert (s["entries"], s["downloaded"], s["failed"]) == (2, 1, 1)
    assert s["missing"] == [f"{range_server.url}/0004.tar"]

    # Once the server has it, the next attempt fetches only the missing one.
    make_tar(range_server.root / "0004.tar", "0004")
    n_before = len(range_server.requests)
    r = run_script("download_archives.sh", "--manifest", str(m), "--dir", str(raw), env=script_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert {q.path for q in range_server.requests[n_before:]} == {"/0004.tar"}
    assert "already_complete=1" in r.stderr


def test_a_truncated_archive_is_not_counted(tmp_path: Path, range_server: RangeServer) -> None:
    good = make_tar(tmp_path / "good.tar", "0003", n_images=3)
    data = good.read_bytes()
    (range_server.root / "0003.tar").write_bytes(data[: len(data) // 2])  # the server itself has half
    m = manifest(tmp_path / "m.txt", [(f"{range_server.url}/0003.tar", "dataset_unaligned/0003.tar")])
    env = script_env(tmp_path, TRIPLET_DOWNLOAD_ROUNDS="1")
    r = run_script("download_archives.sh", "--manifest", str(m), "--dir", str(tmp_path / "raw"), env=env)
    assert r.returncode == 1
    assert "not a complete tar" in r.stderr
    assert f"{range_server.url}/0003.tar" in r.stderr


def test_file_and_gs_entries_and_a_gs_manifest(tmp_path: Path, gcs_emulator: Emulator) -> None:
    rel_dir = Path("build") / "test-gcp" / tmp_path.name
    (REPO / rel_dir).mkdir(parents=True, exist_ok=True)
    try:
        rel = make_tar(REPO / rel_dir / "0009.tar", "0009")
        absolute = make_tar(tmp_path / "abs" / "0012.tar", "0012")
        in_bucket = make_tar(tmp_path / "gs" / "0014.tar", "0014")
        name = gcs_emulator.new_bucket()
        from building_image_triplet_model import cloud_sync

        cloud_sync.upload_file(in_bucket, f"gs://{name}/archives/0014.tar")
        m = manifest(
            tmp_path / "m.txt",
            [(f"file://{rel_dir.as_posix()}/0009.tar", "dataset_unaligned/0009.tar"),
             (f"file://{absolute}", "dataset_unaligned/0012.tar"),
             (f"gs://{name}/archives/0014.tar", "dataset_unaligned/0014.tar")],
        )  # fmt: skip
        cloud_sync.upload_file(m, f"gs://{name}/manifests/sample.txt")
        env = script_env(tmp_path, **gcs_emulator.env())
        raw = tmp_path / "raw"
        r = run_script(
            "download_archives.sh",
            "--manifest",
            f"gs://{name}/manifests/sample.txt",
            "--dir",
            str(raw),
            env=env,
        )
        assert r.returncode == 0, r.stderr
        for src, n in ((rel, "0009"), (absolute, "0012"), (in_bucket, "0014")):
            assert sha256(raw / "dataset_unaligned" / f"{n}.tar") == sha256(src)
        assert (raw / ".triplet-downloads" / "manifests" / "sample.txt").exists()
        # A second run reads nothing again.
        r = run_script(
            "download_archives.sh",
            "--manifest",
            f"gs://{name}/manifests/sample.txt",
            "--dir",
            str(raw),
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert "3 already complete" in r.stderr
        assert "copying" not in r.stderr
        assert (
            run_script(
                "download_archives.sh", "--manifest", str(m), "--dir", str(raw), "--verify-only", env=env
            ).returncode
            == 0
        )
        (raw / "dataset_unaligned" / "0012.tar").unlink()
        assert (
            run_script(
                "download_archives.sh", "--manifest", str(m), "--dir", str(raw), "--verify-only", env=env
            ).returncode
            == 1
        )
    finally:
        shutil.rmtree(REPO / rel_dir, ignore_errors=True)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("http://127.0.0.1:1/a.tar\n\ton-download-complete=/bin/sh\n", "unsupported option"),
        ("http://127.0.0.1:1/a.tar\n\tout=../../etc/passwd\n", "relative path without '..'"),
        ("http://127.0.0.1:1/$(touch x).tar\n", "not allowed"),
        ("file://../outside.tar\n", "inside the repository"),
        ("ftp2://host/a.tar\n", "unsupported URI"),
    ],
)
def test_a_bad_manifest_is_refused(tmp_path: Path, body: str, message: str) -> None:
    m = tmp_path / "m.txt"
    m.write_text(body)
    r = run_script(
        "download_archives.sh", "--manifest", str(m), "--dir", str(tmp_path / "raw"), env=script_env(tmp_path)
    )
    assert r.returncode == 2
    assert message in r.stderr
    assert not (tmp_path / "x").exists()
