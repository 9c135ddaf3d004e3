"""Download and engine at once, with the real engine: the whole startup flow in direct mode (archives read in
place, the default), aria2c fetching one archive at a time from the package's rate-limited RangeServer. The
engine (``--follow``) indexes and embeds each archive as aria2c's completion hook moves it into the archive
folder, so the first archive is embedded while the last one is still downloading; the artifact equals the
one the engine makes alone from the same archives. A preemption and a power loss while both run resume both.
"""

from __future__ import annotations

import shutil
import signal
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
from gcp_helpers import (
    marker,
    preempt,
    run_script,
    sample_archives,
    script_env,
    start_script,
    wait_group_gone,
    write_manifest,
)
from gcp_servers import MetadataServer

from building_image_triplet_model.vm.fileserver import RangeServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed (make sys-deps)"),
]

SLOW_RATE = 4096  # bytes/s: an archive of ~250 kB then takes a minute


def store_marker(engine_work: Path, stem: str) -> Path | None:
    """The commit marker of an archive's embedding store, once there is one."""
    return next(iter(sorted((engine_work / "emb").glob(f"*/{stem}-*/_SUCCESS.json"))), None)


def steer(server: RangeServer, first: Path, engine_work: Path, done: threading.Event) -> None:
    """Once the first archive is in the archive folder, slow the server down until the engine has indexed
    and embedded it (however long the engine takes to start), then let the rest through at full speed. If
    the engine never embeds it while the download runs (no overlap), the download is let through after
    120 s and the test's order check fails."""
    while not first.exists() and not done.wait(0.05):
        pass
    server.rate = SLOW_RATE
    deadline = time.monotonic() + 120
    while (
        store_marker(engine_work, first.stem) is None and time.monotonic() < deadline and not done.wait(0.05)
    ):
        pass
    server.rate = None


def start_reference(tmp_path: Path, archives: list[Path]) -> subprocess.Popen[str]:
    """The engine alone on copies of the archives, at the same time as the flow (which mostly waits for the
    network); its few log lines fit in the pipe until finish() reads them."""
    ref_in = tmp_path / "reference" / "in"
    ref_in.mkdir(parents=True)
    for a in archives:
        shutil.copy2(a, ref_in / a.name)
    return start_processor(tiny_config(tmp_path / "reference", ref_in))


def vm_env(tmp_path: Path, range_server: RangeServer, names: list[str], **extra: str) -> dict[str, str]:
    """The startup flow's settings: the archives from ``range_server`` one at a time, the tiny model."""
    vm = tmp_path / "vm"
    manifest = write_manifest(
        tmp_path / "manifest.txt", [(f"{range_server.url}/{n}", f"dataset_unaligned/{n}") for n in names]
    )
    config = write_config(tmp_path / "tiny.yaml", input_dir="x", hdf5_path="out/dataset.h5", **TINY)
    return script_env(
        vm,
        TRIPLET_CHECKPOINT_URI=str(vm / "bucket"),
        TRIPLET_MANIFEST_URI=str(manifest),
        TRIPLET_PREPROCESS_CONFIG_FILE=str(config),
        TRIPLET_ARIA2_JOBS="1",
        **extra,
    )


def test_the_engine_embeds_each_archive_while_the_next_downloads(
    tmp_path: Path, range_server: RangeServer
) -> None:
    archives = sample_archives(range_server.root, archives=3, targets=8, image_size=96, bad=True)
    reference = start_reference(tmp_path, archives)
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
    env = vm_env(tmp_path, range_server, names, TRIPLET_RUN_ID="overlap", TRIPLET_PUSH_INTERVAL_S="5")
    raw, work = vm / "raw", vm / "work"
    archive_dir = raw / "dataset_unaligned"
    engine_work = work / "output" / "dataset.work"
    range_server.rate = 200_000
    done = threading.Event()
    steering = threading.Thread(
        target=steer,
        args=(range_server, archive_dir / names[0], engine_work, done),
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

    # The proof of the overlap, from the files themselves: the engine's index marker and embedding store of
    # the first archive were committed before the download committed the last one.
    first_indexed = (engine_work / "index" / f"{archives[0].stem}.json").stat().st_mtime_ns
    first_embedded = store_marker(engine_work, archives[0].stem).stat().st_mtime_ns
    committed = {
        n: (raw / ".triplet-downloads" / "dataset_unaligned" / f"{n}.json").stat().st_mtime_ns for n in names
    }
    assert committed[names[0]] < first_indexed < first_embedded < committed[names[-1]], (
        committed,
        first_indexed,
        first_embedded,
    )
    assert marker(work, "download")["started_at"] <= marker(work, "preprocess")["started_at"]
    assert "--follow" in r.stderr

    code, out = finish(reference, timeout=600)
    assert code == 0, out[-3000:]
    assert_same_arrays(work / "output" / "dataset.h5", tmp_path / "reference" / "out" / "dataset.h5")
    assert (vm / "bucket" / "overlap" / "artifact" / "dataset.h5").read_bytes() == (
        work / "output" / "dataset.h5"
    ).read_bytes()


def test_a_preemption_and_a_power_loss_while_both_run_resume_both(
    tmp_path: Path, range_server: RangeServer, metadata_server: MetadataServer
) -> None:
    """The default flow (archives read in place) stopped while aria2c downloads and the real engine embeds:
    first as a preemption (SIGTERM to the main process as systemd sends it, the shutdown script with
    instance/preempted=TRUE, then SIGKILL to what is left), then as a power loss (SIGKILL). Each run
    continues both; the end equals the engine's own run."""
    archives = sample_archives(range_server.root, archives=3, targets=8, image_size=96, bad=True)
    reference = start_reference(tmp_path, archives)
    env = vm_env(
        tmp_path,
        range_server,
        [a.name for a in archives],
        TRIPLET_METADATA="required",
        GCE_METADATA_HOST=metadata_server.host,
        TRIPLET_RUN_ID="overlap-drill",
        TRIPLET_PUSH_INTERVAL_S="2",
        TRIPLET_ARIA2_AUTO_SAVE_INTERVAL="1",
        TRIPLET_SHUTDOWN_GRACE_S="15",
    )
    work = tmp_path / "vm" / "work"
    engine_work = work / "output" / "dataset.work"
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        for n, how in enumerate(("preempt", "power")):
            # Slow enough that the next archive is still on its way when the engine has embedded one more.
            range_server.rate = 20_000
            proc = start_script("startup_preprocess.sh", env=env, log=logs / f"{n}.log")
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                stored = [s for s in (store_marker(engine_work, a.stem) for a in archives) if s]
                if len(stored) > n:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, (logs / f"{n}.log").read_text()[-3000:]
            states = {p: marker(work, p)["status"] for p in ("download", "preprocess")}
            assert states == {"download": "running", "preprocess": "running"}, states
            if how == "preempt":
                preempt(proc, env, metadata_server)
            kill_group(proc, signal.SIGKILL)
            proc.wait(60)
            wait_group_gone(proc.pid)
            assert marker(work, "download")["status"] != "done"
        range_server.rate = None
        r = run_script("startup_preprocess.sh", env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-5000:]
        for phase in ("download", "preprocess", "finalize", "done"):
            assert marker(work, phase)["status"] == "done", phase
        assert marker(work, "download")["attempts"] == 3 and marker(work, "preemptions")["count"] == 1
        code, out = finish(reference, timeout=600)
        assert code == 0, out[-3000:]
    finally:
        kill_group(reference)
        reference.wait(60)
    assert_same_arrays(work / "output" / "dataset.h5", tmp_path / "reference" / "out" / "dataset.h5")
