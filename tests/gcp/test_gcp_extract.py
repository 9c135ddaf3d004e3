"""extract_archives.sh: safe members only, temporary folder + rename + marker, redone when interrupted."""

from __future__ import annotations

import io
import json
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from engine_helpers import REPO, kill_group
from gcp_helpers import (
    SCRIPTS,
    add_member,
    regular_members,
    run_script,
    sample_archives,
    script_env,
    start_script,
    unshare_skip_reason,
    wait_group_gone,
)


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def extract(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_script(
        "extract_archives.sh",
        "--raw-dir",
        str(tmp / "raw"),
        "--extract-dir",
        str(tmp / "x"),
        *extra,
        env=env or script_env(tmp),
    )


def test_extracts_each_archive_once(tmp_path: Path) -> None:
    a, b = sample_archives(tmp_path / "raw" / "dataset_unaligned", archives=2)
    n_files = len(regular_members(a)) + len(regular_members(b))
    summary = tmp_path / "s.json"
    r = extract(tmp_path, "--summary-json", str(summary))
    assert r.returncode == 0, r.stderr
    s = json.loads(summary.read_text())
    assert (s["archives"], s["extracted"], s["skipped"], s["failed"], s["files_written"]) == (
        2,
        2,
        0,
        0,
        n_files,
    )
    got = files_under(tmp_path / "x" / "0003")
    assert got == regular_members(a)
    assert (tmp_path / "x" / ".triplet-extract" / "0003.json").exists()
    assert not list((tmp_path / "x" / ".triplet-extract").glob("*.partial"))
    r = extract(tmp_path, "--summary-json", str(summary))
    assert r.returncode == 0, r.stderr
    assert json.loads(summary.read_text())["skipped"] == 2
    assert extract(tmp_path, "--verify-only").returncode == 0


def test_skip_switch(tmp_path: Path) -> None:
    sample_archives(tmp_path / "raw" / "dataset_unaligned", archives=1)
    r = extract(tmp_path, "--skip")
    assert r.returncode == 0
    assert "reads the archives in place" in r.stderr
    assert not (tmp_path / "x").exists()


def evil_archive(path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        add_member(tf, "0005/ok.txt", b"fine")
        if kind == "absolute":
            add_member(tf, "/tmp/evil-absolute.txt", b"x")
        elif kind == "dotdot":
            add_member(tf, "0005/../../evil-dotdot.txt", b"x")
        elif kind in ("symlink", "symlink-abs", "hardlink"):
            info = tarfile.TarInfo("0005/link")
            info.type = {
                "symlink": tarfile.SYMTYPE,
                "symlink-abs": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
            }[kind]
            info.linkname = {"symlink": "../../outside", "symlink-abs": "/etc", "hardlink": "../etc/passwd"}[
                kind
            ]
            tf.addfile(info)
        elif kind == "through-link":
            info = tarfile.TarInfo("0005/here")
            info.type = tarfile.SYMTYPE
            info.linkname = "."  # inside, on its own...
            tf.addfile(info)
            add_member(tf, "0005/here/x.txt", b"...but a member written through it could be redirected")
        elif kind == "device":
            info = tarfile.TarInfo("0005/dev")
            info.type = tarfile.CHRTYPE
            info.devmajor, info.devminor = 1, 3
            tf.addfile(info)
    return path


@pytest.mark.parametrize(
    "kind", ["absolute", "dotdot", "symlink", "symlink-abs", "hardlink", "through-link", "device"]
)
def test_unsafe_members_refuse_the_archive(tmp_path: Path, kind: str) -> None:
    evil_archive(tmp_path / "raw" / "dataset_unaligned" / "0005.tar", kind)
    sample_archives(tmp_path / "raw" / "dataset_unaligned", archives=1)
    r = extract(tmp_path)
    assert r.returncode == 1
    assert "refused member" in r.stderr
    assert "0005.tar: refused" in r.stderr
    assert not (tmp_path / "x" / "0005").exists(), "nothing of a refused archive is extracted"
    assert not (tmp_path / "x" / ".triplet-extract" / "0005.json").exists()
    assert (tmp_path / "x" / ".triplet-extract" / "0003.json").exists(), "the good archive is extracted"
    assert not (tmp_path / "evil-dotdot.txt").exists()
    assert not Path("/tmp/evil-absolute.txt").exists()


def test_a_symlink_inside_is_allowed(tmp_path: Path) -> None:
    p = tmp_path / "raw" / "0006.tar"
    p.parent.mkdir(parents=True)
    with tarfile.open(p, "w") as tf:
        add_member(tf, "0006/a/real.txt", b"data")
        info = tarfile.TarInfo("0006/b")
        info.type = tarfile.SYMTYPE
        info.linkname = "a/real.txt"
        tf.addfile(info)
    r = extract(tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x" / "0006" / "0006" / "b").read_bytes() == b"data"


def test_an_interrupted_extraction_is_redone(tmp_path: Path) -> None:
    (a,) = sample_archives(tmp_path / "raw", archives=1, targets=2)
    meta = tmp_path / "x" / ".triplet-extract"
    # 1) killed while extracting: a partial folder, no marker
    (meta / "0003.partial" / "0003").mkdir(parents=True)
    (meta / "0003.partial" / "0003" / "half.jpg").write_bytes(b"half")
    # 2) killed between the rename and the marker: a final folder without a marker
    (tmp_path / "x" / "0003" / "0003").mkdir(parents=True)
    (tmp_path / "x" / "0003" / "0003" / "stray.jpg").write_bytes(b"stray")
    r = extract(tmp_path)
    assert r.returncode == 0, r.stderr
    assert files_under(tmp_path / "x" / "0003") == regular_members(a)
    assert not (meta / "0003.partial").exists()
    # 3) an archive that changed after it was extracted is extracted again
    before = regular_members(a)
    sample_archives(tmp_path / "raw", archives=1, targets=4)
    assert set(regular_members(a)) > set(before)
    r = extract(tmp_path)
    assert r.returncode == 0, r.stderr
    assert files_under(tmp_path / "x" / "0003") == regular_members(a)
    # 4) an unfinished download (aria2c control file beside it) is not extracted
    shutil.copy(a, tmp_path / "raw" / "0004.tar")
    Path(f"{tmp_path / 'raw' / '0004.tar'}.aria2").write_bytes(b"ctl")
    r = extract(tmp_path)
    assert r.returncode == 1
    assert "download not finished" in r.stderr
    assert not (tmp_path / "x" / "0004").exists()


def test_killed_at_a_random_moment_then_redone(tmp_path: Path) -> None:
    archives = sample_archives(tmp_path / "raw", archives=3, targets=8)
    env = script_env(tmp_path)
    rng = random.Random(7)
    for attempt in range(3):
        proc = start_script(
            "extract_archives.sh",
            "--raw-dir",
            str(tmp_path / "raw"),
            "--extract-dir",
            str(tmp_path / "x"),
            env=env,
            log=tmp_path / "kill.log",
        )
        time.sleep(rng.uniform(0.2, 1.5))
        kill_group(proc, signal.SIGKILL if attempt % 2 == 0 else signal.SIGTERM)
        proc.wait(30)
        wait_group_gone(proc.pid)
    r = extract(tmp_path)
    assert r.returncode == 0, r.stderr
    for a in archives:
        assert files_under(tmp_path / "x" / a.stem) == regular_members(a), a.name
    assert not list((tmp_path / "x" / ".triplet-extract").glob("*.partial"))


def test_a_full_disk_fails_without_marking(tmp_path: Path) -> None:
    reason = unshare_skip_reason()
    if reason:
        pytest.skip(f"a small tmpfs in a private mount namespace: {reason}")
    (a,) = sample_archives(tmp_path / "raw", archives=1, targets=8, image_size=96)
    assert a.stat().st_size > 2 * 64 * 1024, "larger than the 64 KiB file system"
    (tmp_path / "x").mkdir()
    env = script_env(tmp_path)
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {tmp_path / 'x'} && "
        f"bash {SCRIPTS / 'extract_archives.sh'} --raw-dir {tmp_path / 'raw'} "
        f"--extract-dir {tmp_path / 'x'}; "
        f"rc=$?; ls -A {tmp_path / 'x'}/.triplet-extract; exit $rc"
    )
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", script],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1, r.stderr
    assert "tar failed" in r.stderr
    assert "0003.json" not in r.stdout
    assert "0003.partial" not in r.stdout, "the partial folder is removed to free the space"


def test_validator_counts(tmp_path: Path) -> None:
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w") as tf:
        add_member(tf, "d/x.jpg", b"1")
        add_member(tf, "d/y.txt", b"2")
        tf.addfile(tarfile.TarInfo("d/sub"), io.BytesIO())
    r = subprocess.run(
        [sys.executable, "-m", "building_image_triplet_model.vm.extract_check", "check", str(p)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "3"]  # regular files, members ("d/sub" is an empty regular file)
