"""cloud_sync: incremental, verified push/pull against a local folder standing in for a bucket and against
a real Cloud Storage emulator (fake-gcs-server) through google-cloud-storage."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gcp_helpers import REPO, Emulator

from building_image_triplet_model.remote import cloud_sync
from building_image_triplet_model.remote.cloud_sync import (
    ChecksumMismatchError,
    CloudSyncError,
    crc32c_of_file,
    locations,
    pull_dir,
    push_dir,
    sync,
)


def make_tree(root: Path) -> None:
    (root / "emb" / "0003").mkdir(parents=True)
    (root / "index").mkdir()
    (root / "emb" / "0003" / "0-100.npz").write_bytes(os.urandom(300_000))
    (root / "emb" / "0003" / "_SUCCESS.json").write_text('{"rows": 100}')
    (root / "index" / "0003.npz").write_bytes(os.urandom(1000))
    (root / "index" / "0003.json").write_text('{"digest": "x"}')
    (root / "progress.json").write_text("{}")
    (root / "events.jsonl").write_text("{}\n")
    # Never sent: temporary, partial, aria2 control and lock files.
    (root / "emb" / "0003" / ".100-200.npz.a1b2.tmp").write_bytes(b"half")
    (root / "out.h5.partial").write_bytes(b"half")
    (root / "x.tar.aria2").write_bytes(b"ctl")
    (root / "lock").write_text("123")


SENT = {
    "emb/0003/0-100.npz",
    "emb/0003/_SUCCESS.json",
    "index/0003.npz",
    "index/0003.json",
    "progress.json",
    "events.jsonl",
}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(params=["local", "gcs"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A folder location: a local folder standing in for a bucket, or gs://<fresh bucket>/run/x."""
    if request.param == "local":
        return str(tmp_path / "bucket" / "run" / "x")
    emu: Emulator = request.getfixturevalue("gcs_emulator")
    return f"gs://{emu.new_bucket()}/run/x"


def test_push_is_incremental_and_markers_go_last(tmp_path: Path, location: str) -> None:
    src = tmp_path / "src"
    make_tree(src)
    first = push_dir(src, location)
    assert set(first.transferred) == SENT
    markers = [r for r in first.transferred if r.endswith(".json")]
    assert first.transferred[-len(markers) :] == markers, "markers must be sent after every data file"
    assert {o.key for o in cloud_sync.list_objects(location)} == SENT

    second = push_dir(src, location)
    assert second.transferred == []
    assert set(second.skipped) == SENT

    # A changed file (new content, new mtime) is sent again; nothing else.
    (src / "progress.json").write_text('{"step": 2}')
    third = push_dir(src, location)
    assert third.transferred == ["progress.json"]


def test_pull_restores_into_an_empty_folder(tmp_path: Path, location: str) -> None:
    src = tmp_path / "src"
    make_tree(src)
    push_dir(src, location)
    dest = tmp_path / "restored"
    res = pull_dir(location, dest, into_empty=True)
    assert set(res.transferred) == SENT
    assert res.transferred[-3:]
    assert all(r.endswith(".json") for r in res.transferred[-3:])
    assert tree(dest) == {k: v for k, v in tree(src).items() if k in SENT}
    # mtimes travel with the objects, so the next pull (and push) sees nothing to do
    assert pull_dir(location, dest).transferred == []
    assert push_dir(dest, location).transferred == []
    with pytest.raises(CloudSyncError, match="not empty"):
        pull_dir(location, dest, into_empty=True)


def test_include_filters_and_prefix_listing(tmp_path: Path, location: str) -> None:
    src = tmp_path / "src"
    make_tree(src)
    (src / "emb" / "0004").mkdir()
    (src / "emb" / "0004" / "0-5.npz").write_bytes(b"z" * 10)
    res = push_dir(src, location, include=["index/0003.npz", "index/0003.json", "emb/0003/*"])
    assert set(res.transferred) == {
        "index/0003.npz",
        "index/0003.json",
        "emb/0003/0-100.npz",
        "emb/0003/_SUCCESS.json",
    }
    res = push_dir(src, location, include=["emb/0004/*"], exclude=["*.npz"])
    assert res.transferred == []
    got = pull_dir(location, tmp_path / "one", include=["emb/*"])
    assert set(got.transferred) == {"emb/0003/0-100.npz", "emb/0003/_SUCCESS.json"}


def test_no_marker_when_a_data_file_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    make_tree(src)
    real = sync._upload_local_file

    def flaky(store, lf, key, if_generation_match=None):  # type: ignore[no-untyped-def]
        if lf.rel == "index/0003.npz":
            raise OSError("network down")
        return real(store, lf, key, if_generation_match)

    monkeypatch.setattr(sync, "_upload_local_file", flaky)
    dest = tmp_path / "bucket"
    with pytest.raises(CloudSyncError, match="no marker sent"):
        push_dir(src, str(dest))
    sent = set(tree(dest))
    assert "index/0003.npz" not in sent
    assert not any(k.endswith(".json") for k in sent), sent


def test_markers_are_read_before_the_data_is_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A marker rewritten (and new data written) while the push runs: the pushed marker is the one that was
    there when the push started, so it never describes data the push did not send."""
    src = tmp_path / "src"
    make_tree(src)
    real = sync._upload_local_file

    def writer_runs_meanwhile(store, lf, key, if_generation_match=None):  # type: ignore[no-untyped-def]
        if lf.rel == "emb/0003/0-100.npz":
            (src / "emb" / "0003" / "100-200.npz").write_bytes(b"new data")
            (src / "emb" / "0003" / "_SUCCESS.json").write_text('{"rows": 200}')
        return real(store, lf, key, if_generation_match)

    monkeypatch.setattr(sync, "_upload_local_file", writer_runs_meanwhile)
    dest = tmp_path / "bucket"
    push_dir(src, str(dest), jobs=1)
    assert json.loads((dest / "emb" / "0003" / "_SUCCESS.json").read_text()) == {"rows": 100}
    monkeypatch.setattr(sync, "_upload_local_file", real)
    assert set(push_dir(src, str(dest)).transferred) == {"emb/0003/100-200.npz", "emb/0003/_SUCCESS.json"}


def test_single_objects_text_and_create_only(tmp_path: Path, location: str) -> None:
    f = tmp_path / "artifact.h5"
    f.write_bytes(os.urandom(70_000))
    info = cloud_sync.upload_file(f, location + "/artifact.h5")
    assert info.size == 70_000
    assert info.crc32c == crc32c_of_file(f)
    got = cloud_sync.download_file(location + "/artifact.h5", tmp_path / "back.h5")
    assert (tmp_path / "back.h5").read_bytes() == f.read_bytes()
    assert got.crc32c == info.crc32c
    assert cloud_sync.exists(location + "/artifact.h5")
    assert cloud_sync.exists(location)
    assert not cloud_sync.exists(location + "/nothing")
    cloud_sync.write_text(location + "/claim.json", '{"owner": 1}', if_generation_match=0)
    with pytest.raises(FileExistsError):
        cloud_sync.write_text(location + "/claim.json", '{"owner": 2}', if_generation_match=0)
    assert json.loads(cloud_sync.read_text(location + "/claim.json")) == {"owner": 1}
    cloud_sync.write_text(location + "/claim.json", '{"owner": 3}')
    assert json.loads(cloud_sync.read_text(location + "/claim.json")) == {"owner": 3}
    with pytest.raises(FileNotFoundError):
        cloud_sync.read_text(location + "/missing.json")
    assert {o.name for o in cloud_sync.list_objects(location)} == {"artifact.h5", "claim.json"}


def test_gcs_objects_carry_size_crc32c_and_mtime(tmp_path: Path, gcs_emulator: Emulator) -> None:
    name = gcs_emulator.new_bucket()
    src = tmp_path / "src"
    make_tree(src)
    push_dir(src, f"gs://{name}/p")
    objs = gcs_emulator.objects(name, "p/")
    blob = objs["p/emb/0003/0-100.npz"]
    local = src / "emb" / "0003" / "0-100.npz"
    assert blob.size == local.stat().st_size
    assert blob.crc32c == crc32c_of_file(local)
    assert int(blob.metadata["triplet-src-mtime-ns"]) == local.stat().st_mtime_ns


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "building_image_triplet_model.remote.cloud_sync", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(tmp_path: Path, gcs_emulator: Emulator) -> None:
    """The command line is what the bash scripts call, and no more: cp, verified (issue 18)."""
    for sub in ("", "cp"):
        r = run_cli(*([sub] if sub else []), "--help")
        assert r.returncode == 0, r.stderr
        assert "usage" in r.stdout
    for gone in ("push", "pull", "ls", "cat", "put", "exists"):  # Python's job (sync.py, objects.py)
        assert run_cli(gone, "x").returncode == 2
    name = gcs_emulator.new_bucket()
    env = gcs_emulator.env()
    src = tmp_path / "src"
    make_tree(src)
    one = src / "index" / "0003.npz"
    r = run_cli("cp", str(one), f"gs://{name}/one/", env=env)
    assert r.returncode == 0, r.stderr
    assert f"crc32c {crc32c_of_file(one)}" in r.stderr
    r = run_cli("cp", f"gs://{name}/one/0003.npz", str(tmp_path / "back.npz"), env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back.npz").read_bytes() == one.read_bytes()
    r = run_cli("cp", f"gs://{name}/one/0003.npz", f"gs://{name}/two/0003.npz", env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("cp", f"gs://{name}/two/0003.npz", str(tmp_path / "again.npz"), env=env)
    assert (tmp_path / "again.npz").read_bytes() == one.read_bytes()
    assert run_cli("cp", str(tmp_path / "nope"), f"gs://{name}/x", env=env).returncode == 3
    assert run_cli("cp", f"gs://{name}/missing", str(tmp_path / "m"), env=env).returncode == 3


def test_import_is_light() -> None:
    """The bash helpers and the status report import cloud_sync: no torch, no google.cloud until gs://."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import building_image_triplet_model.remote.cloud_sync"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "torch" not in imported
    assert not any(m.startswith("google.cloud") for m in imported)


# ------------------------------------------------------------------------------ retries and checksums
class FaultyProxy:
    """An HTTP proxy in front of the emulator that fails or damages requests, as a bad network would."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fail_uploads = 0  # answer this many upload requests with 503 (without forwarding them)
        self.corrupt_chunks = False  # flip the last byte of every resumable-upload chunk on its way
        self.uploads: list[int] = []  # the status of every upload request, in order
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, data = proxy.forward(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list, bytes]:
        upload = path.startswith("/upload/")
        with self._lock:
            fail = upload and self.fail_uploads > 0
            self.fail_uploads -= fail
            if fail:
                self.uploads.append(503)
        if fail:
            return (
                503,
                [("Content-Type", "application/json")],
                b'{"error": {"code": 503, "message": "injected"}}',
            )
        if upload and method == "PUT" and self.corrupt_chunks and body:
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        hop = {"host", "content-length", "connection", "keep-alive", "transfer-encoding"}
        up = urllib.parse.urlsplit(self.upstream)
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=60)
        try:
            conn.request(
                method, path, body=body, headers={k: v for k, v in headers.items() if k.lower() not in hop}
            )
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if upload:
            with self._lock:
                self.uploads.append(resp.status)
        # Resumable uploads continue at the Location the emulator names: keep them coming through here.
        out = [
            (k, v.replace(self.upstream, self.url) if k.lower() == "location" else v)
            for k, v in resp.getheaders()
            if k.lower() not in hop
        ]
        return resp.status, out, data


@pytest.fixture
def faulty(gcs_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FaultyProxy, str]]:
    """A fresh bucket, and gs:// calls going through a FaultyProxy (healthy until a test says otherwise)."""
    bucket = gcs_emulator.new_bucket()  # first: the emulator helper points the environment at the emulator
    proxy = FaultyProxy(gcs_emulator.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    yield proxy, bucket
    proxy.server.shutdown()
    proxy.server.server_close()


def test_transient_upload_failures_are_retried_by_the_library(
    tmp_path: Path, faulty: tuple[FaultyProxy, str]
) -> None:
    proxy, bucket = faulty
    f = tmp_path / "a.bin"
    f.write_bytes(os.urandom(50_000))
    proxy.fail_uploads = 2
    info = cloud_sync.upload_file(f, f"gs://{bucket}/a.bin")
    assert proxy.uploads == [503, 503, 200], "each failure is retried once, by one policy"
    assert info.crc32c == crc32c_of_file(f)
    # A create-only write is idempotent, so DEFAULT_RETRY retries it too; a refused precondition is an answer.
    proxy.uploads.clear()
    proxy.fail_uploads = 1
    cloud_sync.write_text(f"gs://{bucket}/claim.json", '{"owner": 1}', if_generation_match=0)
    assert proxy.uploads == [503, 200]
    proxy.uploads.clear()
    with pytest.raises(FileExistsError):
        cloud_sync.write_text(f"gs://{bucket}/claim.json", '{"owner": 2}', if_generation_match=0)
    assert proxy.uploads == [412]
    assert json.loads(cloud_sync.read_text(f"gs://{bucket}/claim.json")) == {"owner": 1}


def test_an_upload_that_keeps_failing_is_given_up_by_the_library_policy_alone(
    tmp_path: Path, faulty: tuple[FaultyProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the library's policy gives up, nothing retries on top of it: the push fails at once, and no
    marker is sent."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    proxy, bucket = faulty
    policy = DEFAULT_RETRY.with_delay(initial=0.05, maximum=0.1).with_timeout(1.0)
    monkeypatch.setattr(locations, "_retry", lambda: policy)
    src = tmp_path / "src"
    make_tree(src)
    data = sorted(k for k in SENT if not k.endswith(".json"))
    proxy.fail_uploads = 10**9
    start = time.monotonic()
    with pytest.raises(CloudSyncError, match="no marker sent") as err:
        push_dir(src, f"gs://{bucket}/p", jobs=1)
    elapsed = time.monotonic() - start
    assert err.value.result is not None
    assert sorted(r for r, _ in err.value.result.failed) == data
    assert elapsed < len(data) * 1.0 + 3, f"{elapsed:.1f}s: something retried after the policy gave up"
    assert set(proxy.uploads) == {503}
    proxy.fail_uploads = 0
    assert cloud_sync.list_objects(f"gs://{bucket}/p") == []


def test_a_corrupted_download_is_refused(tmp_path: Path, gcs_emulator: Emulator) -> None:
    """The bucket serves bytes that do not match the object's CRC32C: the library's check refuses them, the
    target is never written, and a pull fetches no marker."""
    bucket = gcs_emulator.new_bucket()
    src = tmp_path / "src"
    make_tree(src)
    push_dir(src, f"gs://{bucket}/p")
    stored = gcs_emulator.root / "data" / bucket / "p" / "index" / "0003.npz"  # the emulator's own copy
    with open(stored, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    one = tmp_path / "one"
    with pytest.raises(ChecksumMismatchError):
        cloud_sync.download_file(f"gs://{bucket}/p/index/0003.npz", one / "0003.npz")
    assert tree(one) == {}, "neither the file nor a temporary one is left behind"
    back = tmp_path / "back"
    with pytest.raises(CloudSyncError, match="markers not fetched") as err:
        pull_dir(f"gs://{bucket}/p", back)
    assert err.value.result is not None
    assert [(r, e.split(":")[0]) for r, e in err.value.result.failed] == [
        ("index/0003.npz", "ChecksumMismatchError")
    ]
    assert set(tree(back)) == {"emb/0003/0-100.npz", "events.jsonl"}


def test_a_corrupted_upload_is_refused_and_removed(tmp_path: Path, faulty: tuple[FaultyProxy, str]) -> None:
    """Bytes damaged on their way up: the library compares its CRC32C with the server's, deletes the object
    and raises. (A resumable upload, over 8 MiB: on small uploads the server checks the CRC32C the library
    sends, which real Cloud Storage does and the emulator does not.)"""
    proxy, bucket = faulty
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(9 * 1024 * 1024))
    proxy.corrupt_chunks = True
    with pytest.raises(ChecksumMismatchError):
        cloud_sync.upload_file(f, f"gs://{bucket}/big.bin")
    assert cloud_sync.stat(f"gs://{bucket}/big.bin") is None
    proxy.corrupt_chunks = False
    assert cloud_sync.upload_file(f, f"gs://{bucket}/big.bin").crc32c == crc32c_of_file(f)
