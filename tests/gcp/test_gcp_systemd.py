"""The bootstrap under a real systemd: a pristine Debian 12 root (tests/pristine) booted with
``systemd-nspawn -b``, so that Debian's own systemd 252 is PID 1 and the job runs as the transient unit
``startup_preprocess.sh start`` makes with ``systemd-run`` (KillMode=mixed: a stop sends SIGTERM to the
unit's main process alone, then SIGKILL to everything left once it has exited).

Disks are loop devices bound in, named ``/dev/disk/by-id/google-NAME``; the archives come from the package's
Range-capable server on 127.0.0.1, buckets from fake-gcs-server, instance metadata from the stand-in server
(the container shares this machine's network). No GPU here: the system step takes its no-device path.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from engine_helpers import REPO, TINY, write_config
from gcp_helpers import SCRIPTS, Emulator, LoopDisks, sample_archives, write_manifest
from gcp_servers import MetadataServer
from nspawn import Booted, skip_reason
from pristine.root import fresh_root_or_skip, run_in_root

from building_image_triplet_model.vm.fileserver import RangeServer

pytestmark = [pytest.mark.slow]

UNIT = "triplet-preprocess.service"


def by_id_folder(tmp: Path, disks: LoopDisks) -> Path:
    """A folder of /dev/disk/by-id/google-NAME links to the loop devices, bound in as /dev/disk/by-id."""
    by_id = tmp / "by-id"
    by_id.mkdir()
    for name, dev in disks.devices.items():
        (by_id / f"google-{name}").symlink_to(dev)
    return by_id


def state(box: Booted, name: str) -> dict:
    path = box.path(f"/mnt/work/state/{name}.json")
    return json.loads(path.read_text()) if path.exists() else {}


def wait_for(what: str, check: Callable[[], bool], box: Booted, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            journal = box.run(["journalctl", "--no-pager", "-n", "150"])
            raise AssertionError(f"timed out waiting for {what}:\n{journal.stdout if journal else ''}")
        time.sleep(0.1)


@pytest.fixture
def booted(tmp_path: Path) -> Iterator[list[Booted]]:
    """Containers a test boots are powered off, or killed, at its end."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    boxes: list[Booted] = []
    yield boxes
    for box in boxes:
        box.kill()


def test_a_stop_sends_sigterm_to_the_units_main_process_and_the_job_records_it(
    tmp_path: Path,
    booted: list[Booted],
    loop_disks: LoopDisks,
    range_server: RangeServer,
    metadata_server: MetadataServer,
    gcs_emulator: Emulator,
) -> None:
    """Under Debian 12's systemd: `systemctl stop` of the job's unit (SIGTERM to its main process alone, as
    at a preemption) reaches the job while aria2c downloads and the engine embeds; the job stops both, the
    phases are recorded "interrupted", and the stop ends within GCE's 30 s notice. The root is the pristine
    one with aria2 installed (what the system step installs) and this checkout and its environment bound in
    read-only (the full boot with every step is the next test)."""
    root = fresh_root_or_skip(tmp_path / "root")
    r = run_in_root(
        root, ["bash", "-c", "apt-get update -q && apt-get install -y -q --no-install-recommends aria2"]
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    share = tmp_path / "share"
    share.mkdir()
    archives = sample_archives(range_server.root, archives=2, targets=8, image_size=96)
    range_server.rate = archives[0].stat().st_size // 6  # ~6 s per archive, one at a time
    manifest = write_manifest(
        share / "manifest.txt",
        [(f"{range_server.url}/{a.name}", f"dataset_unaligned/{a.name}") for a in archives],
    )
    config = write_config(share / "tiny.yaml", input_dir="x", hdf5_path="out/dataset.h5", **TINY)
    bucket = gcs_emulator.new_bucket()
    python = Path(sys.base_prefix).resolve()  # the interpreter of this checkout's .venv
    box = Booted(
        root,
        tmp_path / "boot.log",
        binds_ro=[
            (str(REPO), str(REPO)),
            (str(share), str(share)),
            (str(python), str(python)),
            (str(by_id_folder(tmp_path, loop_disks)), "/dev/disk/by-id"),
        ],
        devices=list(loop_disks.devices.values()),
    )
    booted.append(box)
    box.boot()
    env = {
        "TRIPLET_SKIP_SYSTEM": "1",
        "TRIPLET_SKIP_REPO": "1",
        "TRIPLET_SKIP_UV_SYNC": "1",
        "TRIPLET_REPO_DIR": str(REPO),
        "TRIPLET_PYTHON": str(REPO / ".venv" / "bin" / "python"),
        "GCE_METADATA_HOST": metadata_server.host,
        "TRIPLET_RUN_ID": "sd",
        "TRIPLET_CHECKPOINT_URI": f"gs://{bucket}/ckpt",
        "TRIPLET_MANIFEST_URI": str(manifest),
        "TRIPLET_PREPROCESS_CONFIG_FILE": str(config),
        "TRIPLET_ARIA2_JOBS": "1",
        **gcs_emulator.env(),
    }
    r = box.run(["bash", str(SCRIPTS / "startup_preprocess.sh")], env=env, timeout=300)
    assert r is not None and r.returncode == 0, r.stderr[-4000:] if r else "no container"
    assert "start: starting triplet-preprocess.service (systemd-run)" in r.stderr
    assert box.run(["findmnt", "-n", "-o", "SOURCE", "/mnt/work"]).stdout.strip().startswith("/dev/loop")

    def both_running() -> bool:
        return (
            state(box, "download").get("status") == state(box, "preprocess").get("status") == "running"
            and box.path("/run/triplet/engine.pid").exists()
            and box.run(["pgrep", "-x", "aria2c"]).returncode == 0
        )

    wait_for("the download and the engine", both_running, box)
    time.sleep(3)  # the engine past its imports
    # GCE powers the VM off 30 s after the soft-off: the stop must be over by then.
    stop = box.run(["timeout", "30", "systemctl", "stop", UNIT], timeout=60)
    assert stop.returncode == 0, stop.stderr
    log = box.run(["journalctl", "--no-pager", "-u", UNIT]).stdout
    assert (state(box, "download").get("status"), state(box, "preprocess").get("status")) == (
        "interrupted",
        "interrupted",
    ), log[-4000:]
    assert "SIGTERM: stopping" in log
    assert box.run(["pgrep", "-x", "aria2c"]).returncode == 1
    # aria2c saved its control file: the next run resumes the partial archive.
    assert list(box.path("/mnt/raw/.triplet-downloads").rglob("*.aria2")), log[-4000:]
    assert box.poweroff() == 0
