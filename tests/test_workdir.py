"""workdir.py: the run's paths, what is done in the work folder, quarantine, and the run lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import REPO

from building_image_triplet_model import config
from building_image_triplet_model.errors import LockedError, RunError
from building_image_triplet_model.io import durable, workdir
from building_image_triplet_model.io.workdir import Layout


def layout_for(tmp: Path, **extra: str) -> Layout:
    cfg = config.from_mapping(
        {"input_dir": str(tmp / "in"), "hdf5_path": str(tmp / "out" / "set.h5"), **extra}
    )
    return Layout(cfg)


# ------------------------------------------------------------------------------------------------ paths
def test_paths_without_work_dir(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    out = tmp_path / "out"
    work = out / "set.work"
    assert lay.output == out / "set.h5"
    assert lay.work == work
    assert lay.partial == out / "set.h5.partial"
    assert lay.rejects == out / "set.rejects.tsv"
    assert lay.stats == out / "set.stats.json"
    assert lay.log == out / "set.log"
    assert lay.lock == work / "lock"
    assert lay.run_json == work / "run.json"
    assert lay.progress_json == work / "progress.json"
    assert lay.events == work / "events.jsonl"
    assert lay.index_dir == work / "index"
    assert lay.shard("0003") == work / "index" / "0003.npz"
    assert lay.shard_marker("0003") == work / "index" / "0003.json"
    assert lay.shard_rejects("0003") == work / "index" / "0003.rejects.tsv"
    assert lay.cache == work / "metadata_cache_complete.npz"
    assert lay.plan == work / "plan.npz" and lay.plan_json == work / "plan.json"
    assert lay.knn_root == work / "knn"
    assert lay.knn_split("kk", "val") == work / "knn" / "kk" / "val"
    assert lay.emb_root == work / "emb"
    assert lay.model_dir("mk") == work / "emb" / "mk"
    assert lay.model_json("mk") == work / "emb" / "mk" / "model.json"
    assert lay.store_dir("mk", "0003", "ck") == work / "emb" / "mk" / "0003-ck"
    assert lay.assemble_json == work / "assemble.json"
    assert lay.corrupt_dir == work / "corrupt"
    assert not out.exists()  # a Layout creates nothing


def test_paths_with_work_dir_and_an_hdf5_suffix(tmp_path: Path) -> None:
    cfg = config.from_mapping(
        {
            "input_dir": "in",
            "hdf5_path": str(tmp_path / "o" / "d.hdf5"),
            "work_dir": str(tmp_path / "scratch"),
        }
    )
    lay = Layout(cfg)
    assert lay.work == tmp_path / "scratch"
    assert lay.plan == tmp_path / "scratch" / "plan.npz"
    assert lay.lock == tmp_path / "scratch" / "lock"
    # What lies beside the output stays beside the output.
    assert lay.partial == tmp_path / "o" / "d.hdf5.partial"
    assert lay.stats == tmp_path / "o" / "d.stats.json"
    assert lay.rejects == tmp_path / "o" / "d.rejects.tsv"
    assert layout_for(tmp_path).work == tmp_path / "out" / "set.work"
    assert Layout(config.from_mapping({"input_dir": "i", "hdf5_path": str(tmp_path / "d.hdf5")})).work == (
        tmp_path / "d.work"
    )


# ---------------------------------------------------------------------------------------- index marker
SIG = {"name": "0003", "size": 1000, "mtime_ns": 5}


def write_shard(lay: Layout, name: str = "0003", **marker: object) -> dict:
    durable.write_npz(lay.shard(name), {"stem": np.array([b"a"])})
    m = {"version": workdir.INDEX_VERSION, "source": name, "signature": SIG, "digest": "d", **marker}
    durable.write_json(lay.shard_marker(name), m)
    return m


def test_index_marker_is_returned_for_a_complete_current_shard(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    assert lay.index_marker("0003", SIG) is None  # nothing yet
    m = write_shard(lay)
    assert lay.index_marker("0003", SIG) == m
    assert lay.index_marker("0003", None) == m  # a merge: the archive is not here


def test_index_marker_of_another_version_is_none(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    write_shard(lay, version=workdir.INDEX_VERSION - 1)
    assert lay.index_marker("0003", SIG) is None
    assert lay.index_marker("0003", None) is None
    write_shard(lay, version=None)
    assert lay.index_marker("0003", SIG) is None


def test_index_marker_without_its_npz_is_none(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    write_shard(lay)
    lay.shard("0003").unlink()
    assert lay.index_marker("0003", SIG) is None
    assert lay.index_marker("0003", None) is None


def test_a_stale_marker_is_none_even_in_a_merge(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    write_shard(lay, stale="row 4 changed")
    assert lay.index_marker("0003", SIG) is None
    assert lay.index_marker("0003", None) is None


def test_signature_mismatch_is_none_unless_the_signature_is_unknown(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    m = write_shard(lay)
    assert lay.index_marker("0003", {**SIG, "mtime_ns": 6}) is None
    assert lay.index_marker("0003", {**SIG, "size": 1001}) is None
    assert lay.index_marker("0003", None) == m
    assert lay.index_marker("0004", None) is None  # another source's marker is not this one's


def test_a_garbled_marker_is_a_corrupt_file_error_naming_it(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    write_shard(lay)
    lay.shard_marker("0003").write_bytes(b'{"version": 2, "sig')
    with pytest.raises(durable.CorruptFileError) as err:
        lay.index_marker("0003", SIG)
    assert err.value.path == lay.shard_marker("0003")


# ---------------------------------------------------------------------------------------------- ranges
def test_range_name_and_ranges_done(tmp_path: Path) -> None:
    assert workdir.range_name(3, 17) == "0000000003-0000000017.npz"
    folder = tmp_path / "knn" / "train"
    assert workdir.ranges_done(folder) == []  # absent folder
    for a, b in [(32, 40), (0, 16), (16, 32)]:
        durable.write_npz(folder / workdir.range_name(a, b), {"x": np.zeros(1)})
    (folder / "notes-here.npz").write_bytes(b"")  # not digits
    (folder / ".0000000040-0000000048.npz.abc.tmp").write_bytes(b"")  # a write a kill interrupted
    durable.write_json(folder / workdir.SUCCESS, {"rows": 40})
    (folder / "0000000100-0000000108.json").write_text("{}")  # not an npz
    assert workdir.ranges_done(folder) == [(0, 16), (16, 32), (32, 40)]
    # Sorted as numbers, not by file system order.
    durable.write_npz(folder / workdir.range_name(100, 1000), {"x": np.zeros(1)})
    durable.write_npz(folder / "99-100.npz", {"x": np.zeros(1)})
    assert workdir.ranges_done(folder)[-2:] == [(99, 100), (100, 1000)]


def test_knn_rows_done(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    folder = lay.knn_split("k1", "train")
    assert lay.knn_rows_done("k1", "train", 40) == 0
    for a, b in [(0, 16), (32, 40)]:
        durable.write_npz(folder / workdir.range_name(a, b), {"x": np.zeros(1)})
    assert lay.knn_rows_done("k1", "train", 40) == 24
    assert lay.knn_rows_done("k1", "train", 36) == 20  # a chunk past n counts up to n only
    assert lay.knn_rows_done("k2", "train", 40) == 0  # another key's folder
    assert lay.knn_rows_done("k1", "val", 40) == 0
    workdir.commit(folder / workdir.SUCCESS, {"rows": 40})
    assert lay.knn_rows_done("k1", "train", 40) == 40
    assert workdir.committed(folder) == {"rows": 40}
    assert workdir.committed(lay.knn_split("k1", "val")) is None


# ---------------------------------------------------------------------------------- assemble, complete
def test_assemble_progress_belongs_to_its_run_key_and_its_partial_file(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    assert lay.assemble_progress("A") == {}
    marker = {"run_key": "A", "offset": 2048, "next": [1, 0], "rows": 10}
    durable.write_json(lay.assemble_json, marker)
    assert lay.assemble_progress("A") == {}  # the partial file is gone: the copy starts over
    lay.partial.write_bytes(b"hdf5")
    assert lay.assemble_progress("A") == marker
    assert lay.assemble_progress("B") == {}  # another run's progress


def test_is_complete_needs_the_artifact_and_stats_of_this_run(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    lay.output.parent.mkdir(parents=True)
    assert not lay.is_complete("R")
    durable.write_json(lay.stats, {"run_key": "R"})
    assert not lay.is_complete("R")  # stats without the artifact
    lay.output.write_bytes(b"h5")
    assert lay.is_complete("R")
    assert not lay.is_complete("S")  # made for other settings
    durable.write_json(lay.stats, {"images": 3})
    assert not lay.is_complete("R")
    lay.stats.unlink()
    assert not lay.is_complete("R")  # the stats file is written last: no stats, not complete


# ------------------------------------------------------------------------------------------ quarantine
def test_quarantine_moves_a_file_aside_with_a_name_that_shows_where_it_came_from(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    bad = lay.shard("0003")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"damaged shard")
    target = lay.quarantine(bad, "bad CRC")
    assert not bad.exists()
    assert target.parent == lay.corrupt_dir
    assert target.name.startswith("index__0003.npz.")
    assert target.read_bytes() == b"damaged shard"
    stamp = target.name.rsplit(".", 1)[1]
    assert len(stamp) == 15 and stamp[8] == "T" and stamp.replace("T", "").isdigit()

    deep = lay.store_dir("mk", "0003", "ck") / "0000000000-0000000009.npz"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"chunk")
    moved = lay.quarantine(deep, "shape")
    assert moved.name.startswith("emb__mk__0003-ck__0000000000-0000000009.npz.")
    assert moved.read_bytes() == b"chunk"

    lay.stats.write_text("{")  # the engine's file beside the output
    moved = lay.quarantine(lay.stats, "json")
    assert moved.parent == lay.corrupt_dir and moved.name.startswith("set.stats.json.")
    assert not lay.stats.exists()
    # Anything else is not the engine's to move: refused, left where it is.
    for outside in (tmp_path / "elsewhere.json", lay.work / ".." / "mine.json"):
        outside.write_text("{")
        with pytest.raises(RunError, match="not the engine's file"):
            lay.quarantine(outside, "json")
        assert outside.read_text() == "{"

    assert lay.quarantine(lay.plan, "vanished").parent == lay.corrupt_dir  # gone already: no error
    assert sorted(p.read_bytes() for p in lay.corrupt_dir.iterdir()) == [b"chunk", b"damaged shard", b"{"]


def test_quarantining_a_file_of_a_committed_folder_withdraws_its_commit(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    store = lay.store_dir("mk", "0003", "ck")
    chunk = store / "0000000000-0000000009.npz"
    durable.write_npz(chunk, {"rows": np.arange(10)})
    workdir.commit(store / workdir.SUCCESS, {"rows": 10})
    moved = lay.quarantine(chunk, "bad CRC")
    assert moved.read_bytes()[:2] == b"PK"  # the chunk itself is kept aside
    assert workdir.committed(store) is None  # the folder is no longer complete: it is computed again
    # The marker itself, damaged, is moved aside like any other file.
    durable.write_npz(chunk, {"rows": np.arange(10)})
    (store / workdir.SUCCESS).write_text("{")
    moved = lay.quarantine(store / workdir.SUCCESS, "json")
    assert moved.name.startswith("emb__mk__0003-ck___SUCCESS.json.") and moved.read_text() == "{"
    assert chunk.exists() and not (store / workdir.SUCCESS).exists()


def test_quarantine_never_deletes_even_twice_in_one_second(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    bad = lay.plan_json
    bad.parent.mkdir(parents=True)
    time.sleep(1.02 - time.time() % 1)  # start just after a second boundary: both moves fall in it
    bad.write_text("first damaged copy")
    lay.quarantine(bad, "json")
    bad.write_text("second damaged copy")
    lay.quarantine(bad, "json")
    kept = sorted(p.read_text() for p in lay.corrupt_dir.iterdir())
    assert kept == ["first damaged copy", "second damaged copy"]


def test_remove_stale_keys_keeps_the_current_key_and_files(tmp_path: Path) -> None:
    lay = layout_for(tmp_path)
    lay.remove_stale_keys(lay.knn_root, "keep")  # absent: nothing to do
    for key in ("old1", "keep", "old2"):
        durable.write_npz(lay.knn_split(key, "train") / workdir.range_name(0, 4), {"x": np.zeros(1)})
    (lay.knn_root / "note.txt").write_text("a file, not a key")
    lay.remove_stale_keys(lay.knn_root, "keep")
    assert sorted(p.name for p in lay.knn_root.iterdir()) == ["keep", "note.txt"]
    assert workdir.ranges_done(lay.knn_split("keep", "train")) == [(0, 4)]


# ---------------------------------------------------------------------------------------------- locking
HOLDER = """
import os, sys, time
from pathlib import Path
from building_image_triplet_model.io.workdir import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.__enter__()
if sys.argv[2] == "fork":
    child = os.fork()
    if child == 0:  # a decode worker that outlives its parent for a while
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
print("locked", flush=True)
time.sleep(60)
"""

TRY = """
import sys
from pathlib import Path
from building_image_triplet_model.io.workdir import RunLock
from building_image_triplet_model.errors import LockedError, RunError
try:
    with RunLock(Path(sys.argv[1])):
        print("acquired")
except LockedError as exc:
    print("locked:", exc)
    sys.exit(5)
"""


def start_holder(lock: Path, mode: str = "plain") -> tuple[subprocess.Popen, int | None]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock), mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline()) if mode == "fork" else None
    assert proc.stdout.readline().strip() == "locked"
    return proc, grandchild


def test_a_second_lock_in_another_process_fails_naming_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "work" / "lock"
    with workdir.RunLock(lock):
        # (Never read the lock file here: closing any descriptor of it drops this process's POSIX lock.)
        other = subprocess.run(
            [sys.executable, "-c", TRY, str(lock)], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert other.returncode == 5, other.stderr
        assert f"another processor (pid {os.getpid()}) is running on this output" in other.stdout
        assert str(lock) in other.stdout
    assert lock.read_text() == f"{os.getpid()}\n"
    # Released on exit: another process gets it now.
    again = subprocess.run(
        [sys.executable, "-c", TRY, str(lock)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and again.stdout.strip() == "acquired"


def test_the_lock_is_gone_the_moment_its_holder_is_killed(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    proc, _ = start_holder(lock)
    try:
        assert workdir.lock_holder(lock) == proc.pid
        with pytest.raises(LockedError, match=rf"pid {proc.pid}\)"), workdir.RunLock(lock):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert workdir.lock_holder(lock) is None
    with workdir.RunLock(lock):  # no stale lock to clean up first
        pass
    assert lock.read_text() == f"{os.getpid()}\n"


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_dies(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    proc, grandchild = start_holder(lock, "fork")
    assert grandchild is not None
    try:
        assert workdir.lock_holder(lock) == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        os.kill(grandchild, 0)  # still alive, with the lock file's descriptor open
        assert workdir.lock_holder(lock) is None
        with workdir.RunLock(lock):
            pass
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_lock_holder_reports_nothing_and_creates_nothing(tmp_path: Path) -> None:
    lock = tmp_path / "absent" / "lock"
    assert workdir.lock_holder(lock) is None
    assert not lock.parent.exists()
    free = tmp_path / "lock"
    free.write_text("12345\n")  # a pid left behind by a finished run: not a holder
    assert workdir.lock_holder(free) is None
    assert free.read_text() == "12345\n"


def test_looking_at_the_lock_from_its_own_process_keeps_it(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with workdir.RunLock(lock):
        assert workdir.lock_holder(lock) == os.getpid()  # truthful, and without opening (which would drop it)
        other = subprocess.run(
            [sys.executable, "-c", TRY, str(lock)], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert other.returncode == 5, other.stdout
