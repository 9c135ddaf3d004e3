"""download_archives.sh: real aria2c against the package's Range-capable server on 127.0.0.1, killed and
resumed; files are staged under <raw>/.triplet-downloads/partial/ and appear in the archive folder only
whole and verified."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from pathlib import Path

import pytest
from engine_helpers import REPO, kill_group
from gcp_helpers import (
    Emulator,
    run_script,
    sample_archives,
    script_env,
    start_script,
    wait_group_gone,
    write_manifest,
)

from tools.fileserver import RangeServer

pytestmark = pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed (make sys-deps)")

STAGING = Path(".triplet-downloads") / "partial"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_download_resumes_to_the_right_bytes(
    tmp_path: Path, range_server: RangeServer, sig: int
) -> None:
    big, small = sample_archives(range_server.root, archives=2, targets=8, image_size=96)
    m = write_manifest(
        tmp_path / "m.txt",
        [
            (f"{range_server.url}/{big.name}", f"dataset_unaligned/{big.name}"),
            (f"{range_server.url}/{small.name}", f"dataset_unaligned/{small.name}"),
        ],
    )
    raw = tmp_path / "raw"
    env = script_env(tmp_path, TRIPLET_ARIA2_AUTO_SAVE_INTERVAL="1", TRIPLET_ARIA2_JOBS="1")
    range_server.rate = big.stat().st_size // 5  # bytes/s: the first archive takes ~5 s
    proc = start_script(
        "download_archives.sh", "--manifest", str(m), "--dir", str(raw), env=env, log=tmp_path / "1.log"
    )
    part = raw / STAGING / "dataset_unaligned" / big.name
    final = raw / "dataset_unaligned" / big.name
    deadline = time.monotonic() + 60
    # Wait until aria2c has saved real progress in its control file (auto-save every second).
    while time.monotonic() < deadline:
        if part.exists() and part.stat().st_size > big.stat().st_size // 5 and Path(f"{part}.aria2").exists():
            time.sleep(1.2)
            break
        time.sleep(0.05)
    else:
        pytest.fail("download never started: " + (tmp_path / "1.log").read_text())
    kill_group(proc, sig)
    proc.wait(60)
    wait_group_gone(proc.pid)
    assert Path(f"{part}.aria2").exists(), "the partial download and its control file are kept"
    assert 0 < part.stat().st_size < big.stat().st_size
    assert not final.exists(), "a partial download never appears in the archive folder"

    range_server.rate = None
    n_before = len(range_server.requests)
    r = run_script("download_archives.sh", "--manifest", str(m), "--dir", str(raw), env=env)
    assert r.returncode == 0, r.stderr
    assert sha256(final) == sha256(big)
    assert sha256(raw / "dataset_unaligned" / small.name) == sha256(small)
    assert not part.exists()
    assert not Path(f"{part}.aria2").exists()
    # --remote-time survives the move into place: a re-downloaded archive looks the same to the engine.
    assert final.stat().st_mtime == int(big.stat().st_mtime)
    resumed = [q for q in range_server.requests[n_before:] if q.path == f"/{big.name}" and q.status == 206]
    assert resumed, "the second run must resume with a Range request"
    assert any(int(q.range.split("=")[1].split("-")[0]) > 0 for q in resumed if q.range), resumed
    assert "downloaded=" in r.stderr


def test_a_404_fails_the_phase_and_names_the_url(tmp_path: Path, range_server: RangeServer) -> None:
    www = tmp_path / "archives"
    first, second = sample_archives(www, archives=2)
    shutil.copy(first, range_server.root)
    m = write_manifest(
        tmp_path / "m.txt",
        [
            (f"{range_server.url}/{first.name}", f"dataset_unaligned/{first.name}"),
            (f"{range_server.url}/{second.name}", f"dataset_unaligned/{second.name}"),
        ],
    )
    raw = tmp_path / "raw"
    summary = tmp_path / "summary.json"
    r = run_script(
        "download_archives.sh",
        "--manifest",
        str(m),
        "--dir",
        str(raw),
        "--summary-json",
        str(summary),
        env=script_env(tmp_path),
    )
    assert r.returncode == 1
    assert f"{range_server.url}/{second.name}" in r.stderr.splitlines()[-1]
    assert (raw / "dataset_unaligned" / first.name).exists()
    s = json.loads(summary.read_text())
    assert (s["entries"], s["downloaded"], s["failed"]) == (2, 1, 1)
    assert s["missing"] == [f"{range_server.url}/{second.name}"]

    # Once the server has it, the next attempt fetches only the missing one.
    shutil.copy(second, range_server.root)
    n_before = len(range_server.requests)
    r = run_script("download_archives.sh", "--manifest", str(m), "--dir", str(raw), env=script_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert {q.path for q in range_server.requests[n_before:]} == {f"/{second.name}"}
    assert "already_complete=1" in r.stderr


def test_a_truncated_archive_never_reaches_the_archive_folder(
    tmp_path: Path, range_server: RangeServer
) -> None:
    (good,) = sample_archives(tmp_path / "archives", archives=1, targets=3)
    data = good.read_bytes()
    (range_server.root / good.name).write_bytes(data[: len(data) // 2])  # the server itself has half
    url = f"{range_server.url}/{good.name}"
    m = write_manifest(tmp_path / "m.txt", [(url, f"dataset_unaligned/{good.name}")])
    env = script_env(tmp_path, TRIPLET_DOWNLOAD_ROUNDS="1")
    raw = tmp_path / "raw"
    r = run_script("download_archives.sh", "--manifest", str(m), "--dir", str(raw), env=env)
    assert r.returncode == 1
    assert "not a complete tar" in r.stderr
    assert url in r.stderr.splitlines()[-1]
    assert not (raw / "dataset_unaligned" / good.name).exists()
    assert not (raw / ".triplet-downloads" / "dataset_unaligned" / f"{good.name}.json").exists()
    assert (raw / STAGING / "dataset_unaligned" / f"{good.name}.corrupt").exists(), "set aside, refetched"


def test_file_and_gs_entries_and_a_gs_manifest(tmp_path: Path, gcs_emulator: Emulator) -> None:
    rel_dir = Path("build") / "test-gcp" / tmp_path.name
    try:
        rel, absolute, in_bucket = sample_archives(REPO / rel_dir, archives=3)
        absolute = Path(shutil.move(absolute, tmp_path / absolute.name))
        in_bucket = Path(shutil.move(in_bucket, tmp_path / in_bucket.name))
        name = gcs_emulator.new_bucket()
        from building_image_triplet_model.remote import cloud_sync

        cloud_sync.upload_file(in_bucket, f"gs://{name}/archives/{in_bucket.name}")
        m = write_manifest(
            tmp_path / "m.txt",
            [
                (f"file://{rel_dir.as_posix()}/{rel.name}", f"dataset_unaligned/{rel.name}"),
                (f"file://{absolute}", f"dataset_unaligned/{absolute.name}"),
                (f"gs://{name}/archives/{in_bucket.name}", f"dataset_unaligned/{in_bucket.name}"),
            ],
        )
        cloud_sync.upload_file(m, f"gs://{name}/manifests/sample.txt")
        env = script_env(tmp_path, **gcs_emulator.env())
        raw = tmp_path / "raw"
        args = ("--manifest", f"gs://{name}/manifests/sample.txt", "--dir", str(raw))
        r = run_script("download_archives.sh", *args, env=env)
        assert r.returncode == 0, r.stderr
        for src in (rel, absolute, in_bucket):
            assert sha256(raw / "dataset_unaligned" / src.name) == sha256(src)
        assert (raw / ".triplet-downloads" / "manifests" / "sample.txt").exists()
        assert not [p for p in (raw / STAGING).rglob("*") if p.is_file()], "the staging folder is empty"
        # A second run reads nothing again.
        r = run_script("download_archives.sh", *args, env=env)
        assert r.returncode == 0, r.stderr
        assert "3 already complete" in r.stderr
        assert "complete: " not in r.stderr
        verify = ("--manifest", str(m), "--dir", str(raw), "--verify-only")
        assert run_script("download_archives.sh", *verify, env=env).returncode == 0
        (raw / "dataset_unaligned" / absolute.name).unlink()
        assert run_script("download_archives.sh", *verify, env=env).returncode == 1
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
