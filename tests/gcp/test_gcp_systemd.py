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
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from engine_helpers import REPO, TINY, assert_same_arrays, finish, write_config
from gcp_helpers import (
    SCRIPTS,
    Emulator,
    LoopDisks,
    attached_loop_disks,
    sample_archives,
    served_manifest,
)
from gcp_servers import MetadataServer
from nspawn import Booted, skip_reason
from pristine import root as pristine_root
from pristine.root import fresh_root_or_skip, run_in_root
from test_gcp_overlap import start_reference

from tools.fileserver import RangeServer

pytestmark = [pytest.mark.slow]

UNIT = "triplet-preprocess.service"


def by_id_folder(tmp: Path, disks: LoopDisks) -> Path:
    """A folder of /dev/disk/by-id/google-NAME links to the loop devices, bound in as /dev/disk/by-id."""
    by_id = tmp / "by-id"
    if not by_id.is_dir():
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
    manifest = served_manifest(share / "manifest.txt", range_server, [a.name for a in archives])
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
    # The job's unit requires its disks: at shutdown systemd unmounts them only once the job has stopped.
    after = box.run(["systemctl", "show", "-p", "After", "-p", "Requires", "--value", UNIT]).stdout.split()
    assert {"mnt-raw.mount", "mnt-work.mount"} <= set(after), after

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


# ------------------------------------------------------------------------ the whole boot, as GCE runs it
# Stand-in for the guest agent's script runner (google_metadata_script_runner): the KEY-script attribute,
# alone in a fresh /tmp/metadata-scriptsXXXX folder, run as /bin/bash -c FILE, as root, cwd /, stdin
# /dev/null, with the unit's environment only (systemd's PATH, no HOME).
AGENT_RUN = """#!/bin/bash
set -u
dir="$(mktemp -d /tmp/metadata-scriptsXXXXXXXX)"
file="$dir/$1-script"
curl -sSf --retry 10 --retry-connrefused -H 'Metadata-Flavor: Google' -o "$file" \\
  "http://$GCE_METADATA_HOST/computeMetadata/v1/instance/attributes/$1-script" || exit 0
chmod 0755 "$file"
cd /
exec /bin/bash -c "$file" </dev/null
"""
# The guest agent's two units (GoogleCloudPlatform/guest-agent), with the stand-ins' endpoints added to
# their environment: on GCE these are metadata.google.internal and storage.googleapis.com, and PyPI's
# certificate verifies without this machine's interception CA.
AGENT_UNIT = """[Unit]
Description=Google Compute Engine {what} Scripts (test stand-in)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
{service}
KillMode=process
{env}

[Install]
WantedBy=multi-user.target
"""
# Stand-in detail, for speed only: this machine's uv cache appears as the work disk's uv cache as soon as
# the work disk is mounted (systemd starts a mount unit's Wants= when the mount appears), and uv links the
# environment's files to it instead of copying 7 GB of wheels onto a loop device.
UV_CACHE_UNIT = """[Unit]
Description=This machine's uv cache as the work disk's (test stand-in)
Before=triplet-preprocess.service google-shutdown-scripts.service

[Mount]
What=/srv/host-uv-cache
Where=/mnt/work/cache/uv
Type=none
Options=bind
"""


def install_agent(root: Path, env: dict[str, str]) -> None:
    lib = root / "usr/local/lib/triplet-test"
    lib.mkdir(parents=True)
    (lib / "agent-run").write_text(AGENT_RUN)
    (lib / "agent-run").chmod(0o755)
    units = root / "etc/systemd/system"
    wants = units / "multi-user.target.wants"
    environment = "\n".join(f"Environment={k}={v}" for k, v in env.items())
    for what, service in (
        ("Startup", "ExecStart=/usr/local/lib/triplet-test/agent-run startup\nTimeoutStartSec=0"),
        (
            "Shutdown",
            "ExecStart=/bin/true\nRemainAfterExit=true\n"
            "ExecStop=/usr/local/lib/triplet-test/agent-run shutdown\nTimeoutStopSec=0",
        ),
    ):
        name = f"google-{what.lower()}-scripts.service"
        (units / name).write_text(AGENT_UNIT.format(what=what, service=service, env=environment))
        (wants / name).symlink_to(f"../{name}")
    (units / "mnt-work-cache-uv.mount").write_text(UV_CACHE_UNIT)
    (units / "mnt-work.mount.wants").mkdir()
    (units / "mnt-work.mount.wants" / "mnt-work-cache-uv.mount").symlink_to("../mnt-work-cache-uv.mount")
    (root / "etc/uv").mkdir()
    (root / "etc/uv/uv.toml").write_text('link-mode = "symlink"\n')


def origin_repository(dest: Path) -> Path:
    """This checkout's files as they are (tracked and new, not ignored), committed on branch gcp (the
    default triplet-repo-ref) in a repository of their own."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    ident = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
    }
    for args in (["init", "-q", "-b", "gcp"], ["add", "-A"], ["commit", "-q", "-m", "checkout"]):
        subprocess.run(["git", *args], cwd=dest, env={**os.environ, **ident}, check=True, capture_output=True)
    return dest


def journal(box: Booted, unit: str) -> str:
    r = box.run(["journalctl", "--no-pager", "-b", "0", "-u", unit])
    return r.stdout if r else ""


def boot_and_wait(box: Booted, booted: list[Booted]) -> str:
    """Boot, wait until the startup unit is over, and return its journal (asserting it succeeded)."""
    booted.append(box)
    box.boot(wait_running=False)
    box.run(["systemctl", "is-system-running", "--wait"], timeout=900)
    startup = journal(box, "google-startup-scripts.service")
    result = box.run(["systemctl", "show", "-p", "Result", "--value", "google-startup-scripts.service"])
    assert result.stdout.strip() == "success", startup[-6000:]
    return startup


def test_a_pristine_debian_12_boots_the_bootstrap_is_preempted_and_resumes(
    tmp_path: Path,
    booted: list[Booted],
    range_server: RangeServer,
    metadata_server: MetadataServer,
    gcs_emulator: Emulator,
) -> None:
    """The startup script as the guest agent runs it on a pristine Debian 12 (stage 0 installs git and
    clones, the system step installs aria2, python3-venv and uv, the disks are formatted, uv sync, the job
    as its own unit); preempted while aria2c downloads and the engine embeds (metadata preempted=TRUE,
    then ACPI soft-off: the job's unit stopped, the shutdown script run by its unit's ExecStop); the next
    boot resumes both and the artifact in the bucket equals the engine's own uninterrupted run's; a boot
    after that installs, formats and downloads nothing."""
    root = fresh_root_or_skip(tmp_path / "root")
    uv = os.environ.get("UV", "uv")  # `uv run` names itself
    uv_cache = subprocess.run([uv, "cache", "dir"], capture_output=True, text=True, check=True).stdout.strip()
    archives = sample_archives(range_server.root, archives=3, targets=8, image_size=96, bad=True)
    reference = start_reference(tmp_path, archives)
    bucket = gcs_emulator.new_bucket()
    manifest = served_manifest(tmp_path / "manifest.txt", range_server, [a.name for a in archives])
    gcs_emulator.client().bucket(bucket).blob("manifest.txt").upload_from_filename(str(manifest))
    origin = origin_repository(tmp_path / "origin")
    metadata_server.attributes.update(
        {
            "startup-script": (SCRIPTS / "startup_preprocess.sh").read_text(),
            "shutdown-script": (SCRIPTS / "shutdown_preprocess.sh").read_text(),
            "triplet-repo-url": "file:///srv/origin",
            "triplet-run-id": "pristine",
            "triplet-checkpoint-uri": f"gs://{bucket}/ckpt",
            "triplet-manifest-uri": f"gs://{bucket}/manifest.txt",
            "triplet-preprocess-config": yaml.safe_dump(
                {"data": {"input_dir": "x", "hdf5_path": "out/dataset.h5", **TINY}}
            ),
        }
    )
    install_agent(
        root, {"GCE_METADATA_HOST": metadata_server.host, **gcs_emulator.env(), **pristine_root.HOST_CA_ENV}
    )
    with attached_loop_disks(tmp_path, {"raw-data-1tb": 256 << 20, "work-scratch-512gb": 2 << 30}) as disks:

        def box() -> Booted:
            return Booted(
                root,
                tmp_path / "boot.log",
                binds=[(uv_cache, "/srv/host-uv-cache")],
                binds_ro=[
                    (str(origin), "/srv/origin"),
                    (str(by_id_folder(tmp_path, disks)), "/dev/disk/by-id"),
                ],
                devices=list(disks.devices.values()),
            )

        # First boot: everything installed and formatted; preempted while both phases run.
        range_server.rate = archives[0].stat().st_size // 4  # ~4 s per archive, one at a time
        first = box()
        startup = boot_and_wait(first, booted)
        for line in (
            "system: installing",
            "has no filesystem: formatting ext4",
            "start: starting triplet-preprocess",
        ):
            assert line in startup, startup[-6000:]
        wait_for(
            "the first archive downloaded while the engine runs",
            lambda: (
                first.path(f"/mnt/raw/dataset_unaligned/{archives[0].name}").exists()
                and first.path("/run/triplet/engine.pid").exists()
            ),
            first,
        )
        metadata_server.values["instance/preempted"] = "TRUE"
        assert first.poweroff() == 0
        console = first.log.read_text()
        objects = gcs_emulator.objects(bucket, "ckpt/pristine/state/")
        pre = json.loads(objects["ckpt/pristine/state/preemptions.json"].download_as_bytes())
        assert pre["count"] == 1, console[-6000:]
        assert pre["events"][-1]["phase"] == "preprocess"
        for phase in ("download", "preprocess"):
            m = json.loads(objects[f"ckpt/pristine/state/{phase}.json"].download_as_bytes())
            assert m["status"] == "interrupted", (phase, m, console[-6000:])

        # Second boot: nothing installed again; the download and the engine resume and finish.
        metadata_server.values["instance/preempted"] = "FALSE"
        n_before = len(range_server.requests)
        second = box()
        startup = boot_and_wait(second, booted)
        assert "system: installing" not in startup
        wait_for(
            "the run to finish", lambda: state(second, "done").get("status") == "done", second, timeout=600
        )
        assert (state(second, "download")["attempts"], state(second, "preprocess")["attempts"]) == (2, 2)
        assert f"/{archives[0].name}" not in {q.path for q in range_server.requests[n_before:]}
        venv = second.path("/mnt/work/repo/.venv/pyvenv.cfg").stat().st_mtime_ns
        assert second.poweroff() == 0
        code, out = finish(reference, timeout=600)
        assert code == 0, out[-3000:]
        artifact = tmp_path / "artifact.h5"
        gcs_emulator.client().bucket(bucket).blob("ckpt/pristine/artifact/dataset.h5").download_to_filename(
            str(artifact)
        )
        assert_same_arrays(artifact, tmp_path / "reference" / "out" / "dataset.h5")

        # Third boot: nothing installed, formatted or downloaded; the job says in one line that the run is
        # complete and runs no phase (issue 19: a second run of anything complete prints one line).
        n_before = len(range_server.requests)
        third = box()
        startup = boot_and_wait(third, booted)
        assert "system: installing" not in startup
        assert "formatting" not in startup.replace("not formatting", "")
        assert startup.count("holds ext4: not formatting") == 2
        assert third.path("/mnt/work/repo/.venv/pyvenv.cfg").stat().st_mtime_ns == venv
        # The shutdown script's unit, too, stops before the disks are unmounted (the disks step's drop-in).
        after = third.run(["systemctl", "show", "-p", "After", "--value", "google-shutdown-scripts.service"])
        assert {"mnt-raw.mount", "mnt-work.mount"} <= set(after.stdout.split()), after.stdout
        wait_for(
            "the job to finish",
            lambda: third.run(["systemctl", "is-active", UNIT]).stdout.strip() in ("inactive", "failed"),
            third,
        )
        job = journal(third, UNIT)
        assert "pristine is complete (" in job and "): nothing to do" in job, job[-4000:]
        for phase in ("download", "extract", "preprocess", "finalize"):
            assert f"phase {phase}" not in job, job[-4000:]
        assert range_server.requests[n_before:] == []
        assert third.poweroff() == 0
