"""shutdown_preprocess.sh: harmless on a live VM; on preemption: stop the job, count, push small files."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from gcp_helpers import SCRIPTS, run_script, script_env
from gcp_servers import MetadataServer


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def vm(tmp_path: Path, metadata_server: MetadataServer) -> dict[str, object]:
    """A work disk with state and the settings the config step stored, a running stand-in job, a systemctl
    that says the system runs."""
    work = tmp_path / "work"
    config = run_script(
        "startup_preprocess.sh",
        "config",
        env=script_env(
            tmp_path,
            TRIPLET_RUN_ID="run-1",
            TRIPLET_CHECKPOINT_URI=str(tmp_path / "bucket"),
            TRIPLET_PREPROCESS_CONFIG_PATH="configs/demo.yaml",
        ),
    )
    assert config.returncode == 0, config.stderr
    (work / "state").mkdir(parents=True)
    (work / "state" / "preprocess.json").write_text(json.dumps({"status": "running", "attempts": 1}))
    job_script = tmp_path / "startup_preprocess_standin.sh"
    job_script.write_text(
        f"trap 'echo \"$(date +%s)\" > {tmp_path}/got-term; exit 143' TERM\nwhile :; do sleep 0.1; done\n"
    )
    job = subprocess.Popen(["bash", str(job_script)], start_new_session=True)
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "job.pid").write_text(f"{job.pid}\n")
    state = tmp_path / "system-state"
    state.write_text("running")
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f'#!/usr/bin/env bash\n[[ "$1" == is-system-running ]] && cat {state}\nexit 0\n')
    systemctl.chmod(0o755)
    env = script_env(
        tmp_path,
        TRIPLET_METADATA="required",
        GCE_METADATA_HOST=metadata_server.host,
        TRIPLET_SYSTEMCTL=str(systemctl),
        TRIPLET_SHUTDOWN_GRACE_S="10",
    )
    yield {"env": env, "job": job, "work": work, "state": state, "md": metadata_server}
    if job.poll() is None:
        job.kill()
        job.wait()


def test_on_a_live_vm_nothing_changes(tmp_path: Path, vm: dict) -> None:
    before = snapshot(tmp_path / "work")
    r = run_script("shutdown_preprocess.sh", env=vm["env"])
    assert r.returncode == 0, r.stderr
    assert "no shutdown under way (preempted=FALSE, system running): nothing to do" in r.stderr
    time.sleep(0.3)
    assert vm["job"].poll() is None, "the job keeps running"
    assert not (tmp_path / "got-term").exists()
    assert snapshot(tmp_path / "work") == before, "not even a log file is written"
    assert not (tmp_path / "bucket").exists()


def test_preemption_stops_the_job_counts_and_pushes(tmp_path: Path, vm: dict) -> None:
    vm["md"].values["instance/preempted"] = "TRUE"
    # The shutdown reads the settings the config step stored, not the metadata server's current values.
    vm["md"].attributes["triplet-checkpoint-uri"] = "gs://elsewhere-bucket/checkpoints"
    r = run_script("shutdown_preprocess.sh", env=vm["env"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "got-term").exists()
    assert vm["job"].wait(10) == 143
    pre = json.loads((tmp_path / "work" / "state" / "preemptions.json").read_text())
    assert pre["count"] == 1
    assert pre["events"][0]["phase"] == "preprocess"
    bucket = tmp_path / "bucket" / "run-1"
    assert json.loads((bucket / "state" / "preemptions.json").read_text())["count"] == 1
    assert (bucket / "state" / "preprocess.json").exists()
    assert list((bucket / "logs").glob("*-shutdown.log"))
    # The next preemption counts again (no job this time).
    r = run_script("shutdown_preprocess.sh", env=vm["env"])
    assert r.returncode == 0, r.stderr
    assert "no preprocessing job running" in r.stderr
    assert json.loads((bucket / "state" / "preemptions.json").read_text())["count"] == 2


def test_a_plain_stop_stops_the_job_without_counting_a_preemption(tmp_path: Path, vm: dict) -> None:
    vm["state"].write_text("stopping")
    r = run_script("shutdown_preprocess.sh", env=vm["env"])
    assert r.returncode == 0, r.stderr
    assert "shutdown under way (shutdown" in r.stderr
    assert vm["job"].wait(10) == 143
    pre = json.loads((tmp_path / "work" / "state" / "preemptions.json").read_text())
    assert "count" not in pre
    assert pre["stops"] == 1


def test_no_work_disk_no_trouble(tmp_path: Path, metadata_server: MetadataServer) -> None:
    metadata_server.values["instance/preempted"] = "TRUE"
    env = script_env(tmp_path, TRIPLET_METADATA="required", GCE_METADATA_HOST=metadata_server.host)
    r = run_script("shutdown_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "no work disk or environment here: nothing to push" in r.stderr
    # A work disk on which the config step never ran: counted, nothing to push.
    (tmp_path / "work" / "state").mkdir(parents=True)
    r = run_script("shutdown_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "no checkpoint location configured: nothing to push" in r.stderr
    assert json.loads((tmp_path / "work" / "state" / "preemptions.json").read_text())["count"] == 1


def test_run_alone_from_metadata(tmp_path: Path, vm: dict) -> None:
    """shutdown-script-url hands the guest agent this one file: it runs the checkout's copy, or, before the
    bootstrap ever ran, does nothing."""
    lone = tmp_path / "guest-agent" / "shutdown-script"
    lone.parent.mkdir()
    shutil.copy(SCRIPTS / "shutdown_preprocess.sh", lone)
    vm["md"].values["instance/preempted"] = "TRUE"
    r = subprocess.run(["bash", str(lone)], env=vm["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert vm["job"].wait(10) == 143
    assert json.loads((tmp_path / "work" / "state" / "preemptions.json").read_text())["count"] == 1
    env = {
        **vm["env"],
        "TRIPLET_REPO_DIR": str(tmp_path / "nothing"),
        "TRIPLET_BOOTSTRAP_DIR": str(tmp_path / "no"),
    }
    r = subprocess.run(["bash", str(lone)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert "the bootstrap never ran on this VM" in r.stderr
