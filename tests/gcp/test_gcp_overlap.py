"""Download and engine at once, with the real engine: the whole startup flow in direct mode (archives read in
place, the default), aria2c fetching one archive at a time from the package's rate-limited RangeServer. The
engine (``--follow``) indexes each archive as aria2c's completion hook moves it into the archive folder, so
the first archive is indexed while the last one is still downloading; the artifact equals the one the engine
makes alone from the same archives."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from engine_helpers import (
    TINY,
    assert_same_arrays,
    finish,
    kill_group,
    start_processor,
    tiny_config,
    write_config,
)
from gcp_helpers import marker, run_script, sample_archives, script_env, write_manifest

from building_image_triplet_model.vm.fileserver import RangeServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed (make sys-deps)"),
]

SLOW_RATE = 4096  # bytes/s: an archive of ~250 kB then takes a minute


def steer(server: RangeServer, first: Path, first_index: Path, done: threading.Event) -> None:
    """Once the first archive is in the archive folder, slow the server down until the engine has indexed
    it (however long the engine takes to start), then let the rest through at full speed. If the engine
    never indexes it while the download runs (no overlap), the download is let through after 120 s and the
    test's order check fails."""
    while not first.exists() and not done.wait(0.05):
        pass
    server.rate = SLOW_RATE
    deadline = time.monotonic() + 120
    while not first_index.exists() and time.monotonic() < deadline and not done.wait(0.05):
        pass
    server.rate = None


def test_the_engine_indexes_each_archive_while_the_next_downloads(
    tmp_path: Path, range_server: RangeServer
) -> None:
    archives = sample_archives(range_server.root, archives=3, targets=8, image_size=96, bad=True)
    ref_in = tmp_path / "reference" / "in"
    ref_in.mkdir(parents=True)
    for a in archives:
        shutil.copy2(a, ref_in / a.name)
    # The engine alone, at the same time (the flow below mostly waits for the network).
    ref_cfg = tiny_config(tmp_path / "reference", ref_in)
    reference = start_processor(ref_cfg)  # its few log lines fit in the pipe until finish() reads them

    try:
        run_flow(tmp_path, range_server, archives, reference)
    finally:
        kill_group(reference)
        reference.wait(60)


def run_flow(
    tmp_path: Path, range_server: RangeServer, archives: list[Path], reference: subprocess.Popen[str]
) -> None:
    names = [a.name for a in archives]
    vm = tmp_path / "vm"
    manifest = write_manifest(
        tmp_path / "manifest.txt", [(f"{range_server.url}/{n}", f"dataset_unaligned/{n}") for n in names]
    )
    config = write_config(tmp_path / "tiny.yaml", input_dir="x", hdf5_path="out/dataset.h5", **TINY)
    env = script_env(
        vm,
        TRIPLET_RUN_ID="overlap",
        TRIPLET_CHECKPOINT_URI=str(vm / "bucket"),
        TRIPLET_MANIFEST_URI=str(manifest),
        TRIPLET_PREPROCESS_CONFIG_FILE=str(config),
        TRIPLET_PUSH_INTERVAL_S="5",
        TRIPLET_ARIA2_JOBS="1",
    )
    raw, work = vm / "raw", vm / "work"
    archive_dir = raw / "dataset_unaligned"
    engine_work = work / "output" / "dataset.work"
    range_server.rate = 200_000
    done = threading.Event()
    steering = threading.Thread(
        target=steer,
        args=(range_server, archive_dir / names[0], engine_work / "index" / f"{archives[0].stem}.json", done),
        daemon=True,
    )
    steering.start()
    try:
        r = run_script("startup_preprocess.sh", env=env, timeout=600)
    finally:
        done.set()
        steering.join()
    assert r.returncode == 0, r.stderr[-5000:]
    for phase in ("download", "preprocess", "finalize", "done"):
        assert marker(work, phase)["status"] == "done", phase

    # The proof of the overlap, from the files themselves: the engine's index marker of the first archive
    # was written before the download committed the last one.
    first_indexed = (engine_work / "index" / f"{archives[0].stem}.json").stat().st_mtime_ns
    committed = {
        n: (raw / ".triplet-downloads" / "dataset_unaligned" / f"{n}.json").stat().st_mtime_ns for n in names
    }
    assert committed[names[0]] < first_indexed < committed[names[-1]], (committed, first_indexed)
    assert marker(work, "download")["started_at"] <= marker(work, "preprocess")["started_at"]
    assert "--follow" in r.stderr

    code, out = finish(reference, timeout=600)
    assert code == 0, out[-3000:]
    assert_same_arrays(work / "output" / "dataset.h5", tmp_path / "reference" / "out" / "dataset.h5")
    assert (vm / "bucket" / "overlap" / "artifact" / "dataset.h5").read_bytes() == (
        work / "output" / "dataset.h5"
    ).read_bytes()
