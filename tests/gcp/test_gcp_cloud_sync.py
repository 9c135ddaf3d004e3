"""cloud_sync: incremental, verified push/pull against a local folder standing in for a bucket and against
a real Cloud Storage emulator (fake-gcs-server) through google-cloud-storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gcp_helpers import REPO, Emulator

from building_image_triplet_model import cloud_sync
from building_image_triplet_model.cloud_sync import CloudSyncError, crc32c_of_file, pull_dir, push_dir


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
    real = cloud_sync._upload_local_file

    def flaky(store, lf, key, if_generation_match=None):  # type: ignore[no-untyped-def]
        if lf.rel == "index/0003.npz":
            raise OSError("network down")
        return real(store, lf, key, if_generation_match)

    monkeypatch.setattr(cloud_sync, "_upload_local_file", flaky)
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
    real = cloud_sync._upload_local_file

    def writer_runs_meanwhile(store, lf, key, if_generation_match=None):  # type: ignore[no-untyped-def]
        if lf.rel == "emb/0003/0-100.npz":
            (src / "emb" / "0003" / "100-200.npz").write_bytes(b"new data")
            (src / "emb" / "0003" / "_SUCCESS.json").write_text('{"rows": 200}')
        return real(store, lf, key, if_generation_match)

    monkeypatch.setattr(cloud_sync, "_upload_local_file", writer_runs_meanwhile)
    dest = tmp_path / "bucket"
    push_dir(src, str(dest), jobs=1)
    assert json.loads((dest / "emb" / "0003" / "_SUCCESS.json").read_text()) == {"rows": 100}
    monkeypatch.setattr(cloud_sync, "_upload_local_file", real)
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
        [sys.executable, "-m", "building_image_triplet_model.cloud_sync", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(tmp_path: Path, gcs_emulator: Emulator) -> None:
    for sub in ("", "push", "pull", "cp", "ls", "cat", "put", "exists"):
        r = run_cli(*([sub] if sub else []), "--help")
        assert r.returncode == 0, r.stderr
        assert "usage" in r.stdout
    name = gcs_emulator.new_bucket()
    env = gcs_emulator.env()
    src = tmp_path / "src"
    make_tree(src)
    r = run_cli("push", str(src), f"gs://{name}/ckpt", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["transferred"]) == SENT
    r = run_cli("push", str(src), f"gs://{name}/ckpt", "--json", env=env)
    assert json.loads(r.stdout)["transferred"] == []
    assert "0 transferred" in r.stderr
    r = run_cli("ls", f"gs://{name}/ckpt", env=env)
    assert set(r.stdout.split()) == SENT
    r = run_cli("pull", f"gs://{name}/ckpt", str(tmp_path / "back"), "--into-empty", env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("cp", str(src / "index" / "0003.npz"), f"gs://{name}/one/", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["crc32c"] == crc32c_of_file(src / "index" / "0003.npz")
    assert run_cli("exists", f"gs://{name}/one/0003.npz", env=env).returncode == 0
    assert run_cli("exists", f"gs://{name}/nope", env=env).returncode == 1
    assert run_cli("put", f"gs://{name}/lock", "--if-absent", env=env, stdin="a").returncode == 0
    assert run_cli("put", f"gs://{name}/lock", "--if-absent", env=env, stdin="b").returncode == 4
    assert run_cli("cat", f"gs://{name}/lock", env=env).stdout == "a"
    assert run_cli("cat", f"gs://{name}/missing", env=env).returncode == 3
    assert run_cli("cp", str(tmp_path / "nope"), f"gs://{name}/x", env=env).returncode == 3


def test_import_is_light() -> None:
    """The bash helpers and the status report import cloud_sync: no torch, no google.cloud until gs://."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import building_image_triplet_model.cloud_sync"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "torch" not in imported
    assert not any(m.startswith("google.cloud") for m in imported)
