"""The preemption drill: the whole startup flow on sample archives (served over HTTP to aria2c, extracted,
preprocessed by the real engine with a tiny CPU model), killed at random moments of every phase, either as a
preemption (SIGTERM to the main process as systemd sends it, the shutdown script with
instance/preempted=TRUE, then SIGKILL to what is left) or as a power loss (SIGKILL), and run again until
done. The final artifact equals the engine's own uninterrupted run's, no completed phase runs again, and the
preemption count is right."""

from __future__ import annotations

import json
import random
import shutil
import signal
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
from building_image_triplet_model.vm.phases import PHASES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed (make sys-deps)"),
]


def markers(work: Path) -> dict[str, dict]:
    out = {}
    for p in PHASES:
        f = work / "state" / f"{p}.json"
        if f.exists():
            out[p] = json.loads(f.read_text())
    return out


@pytest.fixture
def drill_env(tmp_path: Path, range_server: RangeServer, metadata_server: MetadataServer) -> dict[str, str]:
    archives = sample_archives(range_server.root, archives=2, targets=8, image_size=96, bad=True)
    manifest = write_manifest(
        tmp_path / "manifest.txt",
        [(f"{range_server.url}/{a.name}", f"dataset_unaligned/{a.name}") for a in archives],
    )
    config = write_config(tmp_path / "tiny.yaml", input_dir="x", hdf5_path="out/dataset.h5", **TINY)
    # A slower tar, so that the extract phase lasts long enough to be interrupted.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tar").write_text(f'#!/usr/bin/env bash\nsleep 1\nexec {shutil.which("tar")} "$@"\n')
    (bin_dir / "tar").chmod(0o755)
    env = script_env(
        tmp_path / "vm",
        TRIPLET_METADATA="required",
        GCE_METADATA_HOST=metadata_server.host,
        TRIPLET_RUN_ID="drill",
        TRIPLET_CHECKPOINT_URI=str(tmp_path / "vm" / "bucket"),
        TRIPLET_MANIFEST_URI=str(manifest),
        TRIPLET_EXTRACT_ARCHIVES="true",
        TRIPLET_PREPROCESS_CONFIG_FILE=str(config),
        TRIPLET_PUSH_INTERVAL_S="2",
        TRIPLET_ARIA2_AUTO_SAVE_INTERVAL="1",
        TRIPLET_SHUTDOWN_GRACE_S="15",
    )
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def test_preemption_drill(
    tmp_path: Path, drill_env: dict[str, str], range_server: RangeServer, metadata_server: MetadataServer
) -> None:
    vm = tmp_path / "vm"
    work = vm / "work"
    h5 = work / "output" / "dataset.h5"

    # The uninterrupted reference: the engine alone on the same archives, while the drill runs (it reads
    # them in place; the drill's engine reads the extracted files: only images/offset differs).
    ref_in = tmp_path / "reference" / "in"
    ref_in.mkdir(parents=True)
    for a in range_server.root.glob("*.tar"):
        shutil.copy2(a, ref_in / a.name)
    reference = start_processor(tiny_config(tmp_path / "reference", ref_in))
    try:
        drill(tmp_path, drill_env, range_server, metadata_server)
        code, out = finish(reference, timeout=600)
        assert code == 0, out[-3000:]
    finally:
        kill_group(reference)
    assert_same_arrays(h5, tmp_path / "reference" / "out" / "dataset.h5", skip=("images/offset",))
    assert (vm / "bucket" / "drill" / "artifact" / "dataset.h5").read_bytes() == h5.read_bytes()


def drill(
    tmp_path: Path, drill_env: dict[str, str], range_server: RangeServer, metadata_server: MetadataServer
) -> None:
    vm = tmp_path / "vm"
    work = vm / "work"

    range_server.rate = 40_000  # bytes/s per archive: the download phase takes a few seconds
    rng = random.Random(20261129)
    # Each phase once by each kind of stop (every stop of the engine costs a restart of torch: the random
    # moments inside the engine's own steps are the crash tests' subject, tests/test_crash_safety.py).
    schedule = [
        ("download", "preempt"), ("download", "power"), ("extract", "preempt"), ("extract", "power"),
        ("preprocess", "preempt"), ("preprocess", "power"),
    ]  # fmt: skip
    preemptions = 0
    hits: list[tuple[str, str]] = []
    logs = tmp_path / "drill-logs"
    logs.mkdir()
    for n, (phase, how) in enumerate(schedule):
        before = markers(work)
        if before.get(phase, {}).get("status") == "done":
            continue  # that phase finished in an earlier run
        proc = start_script("startup_preprocess.sh", env=drill_env, log=logs / f"{n}.log")
        deadline = time.monotonic() + 300
        hit = None
        while time.monotonic() < deadline and proc.poll() is None:
            m = markers(work).get(phase, {})
            ready = m.get("status") == "running"
            if phase == "preprocess":
                ready = ready and (work / "output" / "dataset.work" / "run.json").exists()
            if ready:
                time.sleep(rng.uniform(0.1, 3.0 if phase == "preprocess" else 1.0))
                hit = next((p for p, mk in markers(work).items() if mk.get("status") == "running"), "none")
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            continue  # the flow went past that phase, or finished
        if how == "preempt":
            preempt(proc, drill_env, metadata_server)
            preemptions += 1
        else:
            kill_group(proc, signal.SIGKILL)
        proc.wait(60)
        wait_group_gone(proc.pid)
        hits.append((hit or "none", how))
        after = markers(work)
        for p, m in before.items():
            if m.get("status") == "done":
                assert after[p]["attempts"] == m["attempts"], f"completed phase {p} ran again ({hits})"

    range_server.rate = None
    for _ in range(3):
        before = markers(work)
        r = run_script("startup_preprocess.sh", env=drill_env, timeout=600)
        after = markers(work)
        for p, m in before.items():
            if m.get("status") == "done":
                assert after[p]["attempts"] == m["attempts"], f"completed phase {p} ran again"
        if r.returncode == 0:
            break
    assert r.returncode == 0, r.stderr[-4000:]

    assert {p: m["status"] for p, m in markers(work).items()} == dict.fromkeys(PHASES, "done")
    counted = (
        json.loads((work / "state" / "preemptions.json").read_text()).get("count", 0) if preemptions else 0
    )
    assert counted == preemptions, hits
    assert (
        json.loads((vm / "bucket" / "drill" / "state" / "preemptions.json").read_text()).get("count", 0)
        == preemptions
        or preemptions == 0
    )
    # Every phase was interrupted at least once (the schedule waits for each to be running).
    print("drill: interrupted", hits, "preemptions", preemptions)
    assert {h for h, _ in hits} >= {"download", "extract", "preprocess"}, hits
