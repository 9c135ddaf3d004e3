"""The startup flow in direct mode with a fast stand-in engine: phases and markers, the download and the
engine at the same time (the stand-in follows the archive folder as the real engine does), pushes to a local
folder and to the Cloud Storage emulator, restore onto a fresh work disk, finalize, on-done, the systemd
path, the repository step and the stage-0 bootstrap from a lone copy of the script."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from engine_helpers import REPO, kill_group
from gcp_helpers import (
    FAKE_ENGINE,
    SCRIPTS,
    Emulator,
    marker,
    regular_members,
    run_script,
    sample_archives,
    script_env,
    start_script,
    unshare_skip_reason,
    write_manifest,
)
from gcp_servers import MetadataServer

from building_image_triplet_model.cloud_sync import crc32c_of_file
from building_image_triplet_model.vm.fileserver import RangeServer


def flow_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Archives served by file:// entries, the stand-in engine, pushes into a local 'bucket'."""
    src = tmp / "src"
    if not src.is_dir():
        sample_archives(src, archives=2)  # 0003.tar, 0004.tar
    write_manifest(
        tmp / "manifest.txt",
        [(f"file://{p}", f"dataset_unaligned/{p.name}") for p in sorted(src.glob("*.tar"))],
    )
    env = script_env(
        tmp,
        TRIPLET_RUN_ID="run-1",
        TRIPLET_CHECKPOINT_URI=str(tmp / "bucket"),
        TRIPLET_MANIFEST_URI=str(tmp / "manifest.txt"),
        TRIPLET_PREPROCESS_CONFIG_PATH="configs/demo.yaml",
        TRIPLET_PROCESSOR_MODULE="fake_processor",
        TRIPLET_STATUS_MODULE="fake_status",
        TRIPLET_PUSH_INTERVAL_S="1",
        PYTHONPATH=str(FAKE_ENGINE),
        FAKE_ENGINE_STARTS=str(tmp / "starts.txt"),
    )
    env.update(extra)
    return env


def test_full_flow_then_every_phase_is_skipped(tmp_path: Path) -> None:
    env = flow_env(
        tmp_path, TRIPLET_EXTRACT_ARCHIVES="true", TRIPLET_METADATA_CACHE_SYNC_URI=str(tmp_path / "mc")
    )
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    for phase in ("download", "extract", "preprocess", "finalize", "done"):
        m = marker(tmp_path / "work", phase)
        assert m["status"] == "done", (phase, m)
    d = marker(tmp_path / "work", "download")
    assert (d["attempts"], d["summary"]["entries"], d["summary"]["downloaded"]) == (1, 2, 2)
    assert d["started_at"].endswith("Z")
    assert d["ended_at"].endswith("Z")
    assert d["run_id"] == "run-1"
    n_files = sum(len(regular_members(p)) for p in (tmp_path / "src").glob("*.tar"))
    assert marker(tmp_path / "work", "extract")["summary"]["files_written"] == n_files
    h5 = tmp_path / "work" / "output" / "dataset.h5"
    bucket = tmp_path / "bucket" / "run-1"
    # The artifact, verified, with its commit marker beside it.
    assert (bucket / "artifact" / "dataset.h5").read_bytes() == h5.read_bytes()
    ok = json.loads((bucket / "artifact" / "_SUCCESS.json").read_text())
    assert ok["size"] == h5.stat().st_size
    assert ok["crc32c"] == crc32c_of_file(h5)
    assert marker(tmp_path / "work", "done")["finalize"]["summary"]["crc32c"] == ok["crc32c"]
    # The checkpoint: engine work folder (no temporary or lock files), logs, state.
    assert (bucket / "output" / "dataset.work" / "emb" / "0001" / "_SUCCESS.json").exists()
    assert not (bucket / "output" / "dataset.work" / "lock").exists()
    assert not list((bucket / "output").rglob("*.tmp"))
    assert not (bucket / "output" / "dataset.h5").exists()
    assert {p.name for p in (bucket / "state").iterdir()} >= {"download.json", "preprocess.json", "done.json"}
    assert list((bucket / "logs").glob("*-startup.log"))
    # The engine saw the extracted input and the cache sync URI.
    assert f" {tmp_path / 'mc'}" in (tmp_path / "starts.txt").read_text()
    log_lines = next((tmp_path / "work" / "logs").glob("*-startup.log")).read_text().splitlines()
    assert all(line[:4].isdigit() and line[19] == "Z" for line in log_lines), (
        "every line starts with UTC time"
    )

    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    # complete: one line says so, nothing runs, nothing is pushed
    job_lines = [line for line in r.stderr.splitlines() if " job[" in line]
    assert len(job_lines) == 1 and job_lines[0].endswith("): nothing to do"), job_lines
    assert "job[" in job_lines[0] and ": run-1 is complete (20" in job_lines[0]
    assert "pushed" not in r.stderr
    for phase in ("download", "extract", "preprocess", "finalize"):
        assert marker(tmp_path / "work", phase)["attempts"] == 1
    assert len((tmp_path / "starts.txt").read_text().splitlines()) == 1, "the engine did not run again"


def test_a_rerun_after_the_download_says_so_once_and_runs_no_phase_the_first_run_had_not(
    tmp_path: Path,
) -> None:
    # Reading the archives in place (the default): no extract phase, on the first run or any later one.
    env = flow_env(tmp_path)
    assert run_script("startup_preprocess.sh", env=env).returncode == 0
    state = tmp_path / "work" / "state"
    for name in ("preprocess", "finalize", "done"):  # the download stays done; the rest is to do again
        (state / f"{name}.json").unlink()
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("phase download: done (attempts 1); skipping") == 1
    assert "phase extract" not in r.stderr and not (state / "extract.json").exists()
    assert marker(tmp_path / "work", "preprocess")["status"] == "done"


def test_engine_exit_codes_are_recorded(tmp_path: Path) -> None:
    # With extraction the phases run one after the other: the download is done before the engine starts.
    env = flow_env(tmp_path, FAKE_ENGINE_EXIT="4", TRIPLET_EXTRACT_ARCHIVES="true")
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 4
    assert "preprocess: refused (exit 4)" in r.stderr
    m = marker(tmp_path / "work", "preprocess")
    assert (m["status"], m["exit_code"], m["attempts"]) == ("failed", 4, 1)
    env["FAKE_ENGINE_EXIT"] = "75"
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 75
    m = marker(tmp_path / "work", "preprocess")
    assert (m["status"], m["exit_code"], m["attempts"]) == ("interrupted", 75, 2)
    assert marker(tmp_path / "work", "download")["attempts"] == 1
    del env["FAKE_ENGINE_EXIT"]
    assert run_script("startup_preprocess.sh", env=env).returncode == 0
    assert marker(tmp_path / "work", "preprocess")["attempts"] == 3


def test_checkpoint_restore_onto_a_fresh_work_disk_through_the_emulator(
    tmp_path: Path, gcs_emulator: Emulator
) -> None:
    name = gcs_emulator.new_bucket()
    env = flow_env(
        tmp_path,
        TRIPLET_CHECKPOINT_URI=f"gs://{name}/checkpoints",
        TRIPLET_PUSH_INTERVAL_S="1800",
        **gcs_emulator.env(),
    )
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    objs = gcs_emulator.objects(name, "checkpoints/run-1/")
    assert "checkpoints/run-1/artifact/dataset.h5" in objs
    assert "checkpoints/run-1/state/done.json" in objs
    assert "checkpoints/run-1/output/dataset.work/emb/0001/0-10.npz" in objs

    # Incremental: a second push sends only logs (its own, and the end of the last run's, written after that
    # run's final push), and says so in one line.
    before = {n: b.generation for n, b in gcs_emulator.objects(name, "checkpoints/run-1/").items()}
    r = run_script("startup_preprocess.sh", "checkpoint", env=env)
    assert r.returncode == 0, r.stderr
    after = {n: b.generation for n, b in gcs_emulator.objects(name, "checkpoints/run-1/").items()}
    sent = sorted(n for n in after if before.get(n) != after[n])
    assert sent, "this step's own log is new"
    assert all(n.startswith("checkpoints/run-1/logs/") for n in sent), sent
    pushed = [line for line in r.stderr.splitlines() if " pushed " in line]
    assert len(pushed) == 1, pushed
    assert f"pushed {len(sent)} files (0.0 MB) to gs://{name}/checkpoints/run-1" in pushed[0]
    # Nothing new at all: no line. (A push run without a log file of its own: the step's own "pushed" line
    # above went into its log after that push, so the first of these still sends that log.)
    for _ in range(2):
        direct = subprocess.run(
            [sys.executable, "-m", "building_image_triplet_model.vm", "checkpoint"],
            cwd=REPO,
            env={k: v for k, v in env.items() if k != "TRIPLET_LOG_FILE"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert direct.returncode == 0, direct.stderr
    assert " pushed " not in direct.stderr

    # A new work disk: nothing local. The bucket has state: restore it, then continue.
    old_work = tmp_path / "work"
    before = {
        p.relative_to(old_work).as_posix(): p.read_bytes()
        for p in (old_work / "output" / "dataset.work").rglob("*")
        if p.is_file() and p.name != "lock" and not p.name.endswith(".tmp")
    }
    shutil.move(old_work, tmp_path / "old-work")
    r = run_script("startup_preprocess.sh", "config", "restore", env=env)
    assert r.returncode == 0, r.stderr
    assert "restoring it" in r.stderr
    after = {
        p.relative_to(old_work).as_posix(): p.read_bytes()
        for p in (old_work / "output" / "dataset.work").rglob("*")
        if p.is_file()
    }
    assert after == before
    assert marker(tmp_path / "work", "preprocess")["status"] == "done"
    assert marker(tmp_path / "work", "done")["status"] == "done"
    # The whole flow now skips everything it can (the raw disk still has the archives).
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "nothing to restore" in r.stderr
    assert "run-1 is complete (" in r.stderr and "skipping" not in r.stderr
    assert len((tmp_path / "starts.txt").read_text().splitlines()) == 1

    # A whole boot onto another new work disk: the preflight writes state/preflight.json before the restore
    # step, and that must not pass for "this disk has state".
    shutil.rmtree(old_work)
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "restoring it" in r.stderr
    assert "run-1 is complete (" in r.stderr
    assert len((tmp_path / "starts.txt").read_text().splitlines()) == 1, "the engine did not start over"


def test_a_new_raw_disk_downloads_again(tmp_path: Path) -> None:
    env = flow_env(tmp_path)
    assert run_script("startup_preprocess.sh", env=env).returncode == 0
    shutil.rmtree(tmp_path / "raw")
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "phase download: marked done but its output is not there any more" in r.stderr
    assert marker(tmp_path / "work", "download")["attempts"] == 2
    assert (tmp_path / "raw" / "dataset_unaligned" / "0004.tar").exists()
    r = run_script("startup_preprocess.sh", "status", env=env)
    assert r.returncode == 0, r.stderr
    assert "state: download: done after 2 attempts" in r.stderr
    assert "state: extract: not used (the engine reads the archives in place)" in r.stderr
    assert "state: preprocess: done after 1 attempt" in r.stderr
    assert "state: done: complete" in r.stderr
    assert "complete: True" in r.stdout  # the engine's report (here its stand-in's)


def test_scale_out_worker_and_merge_modes(tmp_path: Path) -> None:
    """TRIPLET_MODE=worker (Cloud Batch sets TASK_INDEX/TASK_COUNT): only this task's archives are downloaded,
    the engine gets --task-index/--task-count/--run-uri, state goes to RUN/tasks/I-of-N, no artifact.
    TRIPLET_MODE=merge: nothing downloaded, the engine merges, the artifact is uploaded."""
    env = flow_env(tmp_path, TRIPLET_MODE="worker", TASK_INDEX="1", TASK_COUNT="2")
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "raw" / "dataset_unaligned").iterdir()) == ["0004.tar"]
    assert "0003.tar" not in (tmp_path / "work" / "config" / "manifest.task.txt").read_text()
    start = (tmp_path / "starts.txt").read_text().splitlines()[-1]
    # The engine follows the archive folder while the download runs (no extraction).
    assert start.endswith(f"--task-index 1 --task-count 2 --run-uri {tmp_path / 'bucket' / 'run-1'} --follow")
    task_dir = tmp_path / "bucket" / "run-1" / "tasks" / "1-of-2"
    assert json.loads((task_dir / "state" / "done.json").read_text())["mode"] == "worker"
    assert not (tmp_path / "work" / "state" / "finalize.json").exists()
    assert not (tmp_path / "bucket" / "run-1" / "artifact").exists()
    cfg = (tmp_path / "work" / "config" / "preprocess.yaml").read_text()
    assert f"manifest: {tmp_path / 'work' / 'config' / 'manifest.txt'}" in cfg

    merge_tmp = tmp_path / "merge"
    env = flow_env(merge_tmp, TRIPLET_MODE="merge", TRIPLET_CHECKPOINT_URI=str(tmp_path / "bucket"))
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert not (merge_tmp / "raw" / "dataset_unaligned").exists()
    start = (merge_tmp / "starts.txt").read_text().splitlines()[-1]
    assert start.endswith(f"--merge --run-uri {tmp_path / 'bucket' / 'run-1'} --wait-timeout-s 3600")
    assert (tmp_path / "bucket" / "run-1" / "artifact" / "dataset.h5").exists()
    assert (tmp_path / "bucket" / "run-1" / "merge" / "state" / "done.json").exists()
    env = flow_env(tmp_path / "bad", TRIPLET_MODE="worker", TASK_INDEX="2", TASK_COUNT="2")
    r = run_script("startup_preprocess.sh", "config", env=env)
    assert r.returncode != 0
    assert "TASK_INDEX < TASK_COUNT" in r.stderr


def fake_tool(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def test_when_done_stop_uses_gcloud_with_the_instance_identity(
    tmp_path: Path, metadata_server: MetadataServer
) -> None:
    calls = tmp_path / "gcloud-calls.txt"
    gcloud = fake_tool(tmp_path / "gcloud", f'printf "%s\\n" "$*" >> {calls}\n')
    env = flow_env(
        tmp_path,
        TRIPLET_METADATA="required",
        GCE_METADATA_HOST=metadata_server.host,
        TRIPLET_GCLOUD=str(gcloud),
    )
    del env["TRIPLET_RUN_ID"]
    metadata_server.attributes["triplet-on-done"] = "stop"
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert calls.read_text().splitlines() == [
        "compute instances stop preprocess-vm --zone=us-central1-a --project=test-project --quiet"
    ]
    assert (tmp_path / "bucket" / "preprocess-vm" / "artifact" / "dataset.h5").exists()
    metadata_server.attributes["triplet-on-done"] = "delete"
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert calls.read_text().splitlines()[-1] == (
        "compute instances delete preprocess-vm --zone=us-central1-a --keep-disks=data "
        "--project=test-project --quiet"
    )


def test_on_done_in_a_managed_group_goes_through_the_group(
    tmp_path: Path, metadata_server: MetadataServer
) -> None:
    calls = tmp_path / "gcloud-calls.txt"
    gcloud = fake_tool(tmp_path / "gcloud", f'printf "%s\\n" "$*" >> {calls}\n')
    env = flow_env(
        tmp_path,
        TRIPLET_METADATA="required",
        GCE_METADATA_HOST=metadata_server.host,
        TRIPLET_GCLOUD=str(gcloud),
    )
    metadata_server.attributes.update(
        {
            "triplet-on-done": "delete",
            "triplet-deploy-mode": "mig",
            "created-by": "projects/123456/zones/us-central1-a/instanceGroupManagers/triplet-preproc-mig",
        }
    )
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert calls.read_text().splitlines() == [
        "compute instance-groups managed delete-instances triplet-preproc-mig --instances=preprocess-vm "
        "--zone=us-central1-a --project=test-project --quiet"
    ]
    metadata_server.attributes["created-by"] = "projects/1/zones/us-central1-a/instances/$(touch x)"
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode != 0
    assert "created-by is not an instance group manager" in r.stderr


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud not installed")
def test_the_gcloud_commands_parse(tmp_path: Path) -> None:
    """The real CLI, offline: valid flags stop at 'no active account' (exit 1); a bad flag exits 2."""
    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    }
    for args in (
        ["compute", "instances", "stop", "vm", "--zone=us-central1-a", "--project=test-project", "--quiet"],
        [
            "compute",
            "instances",
            "delete",
            "vm",
            "--zone=us-central1-a",
            "--project=test-project",
            "--keep-disks=data",
            "--quiet",
        ],
        [
            "compute",
            "instance-groups",
            "managed",
            "stop-instances",
            "mig",
            "--instances=vm",
            "--zone=us-central1-a",
            "--project=test-project",
            "--quiet",
        ],
        [
            "compute",
            "instance-groups",
            "managed",
            "delete-instances",
            "mig",
            "--instances=vm",
            "--region=us-central1",
            "--project=test-project",
            "--quiet",
        ],
    ):
        r = subprocess.run(["gcloud", *args], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stderr
        assert "active account" in r.stderr


def test_systemd_mode_starts_the_job_as_its_own_unit(tmp_path: Path) -> None:
    calls = tmp_path / "systemd-run-args.txt"
    systemd_run = fake_tool(
        tmp_path / "systemd-run",
        f"""
        printf '%s\\n' "$@" > {calls}
        envs=()
        while [[ $1 == --* ]]; do
          case "$1" in --setenv=*) envs+=("${{1#--setenv=}}") ;; esac
          shift
        done
        # A unit starts with a clean environment: only what --setenv passes (and the test's stand-in engine).
        env -i PATH="$PATH" PYTHONPATH="$PYTHONPATH" FAKE_ENGINE_STARTS="$FAKE_ENGINE_STARTS" \
          "${{envs[@]}}" "$@" > {tmp_path}/unit.log 2>&1
        """,
    )
    systemctl = fake_tool(tmp_path / "systemctl", "exit 3\n")  # is-active: inactive
    env = flow_env(
        tmp_path,
        TRIPLET_RUN_MODE="systemd",
        TRIPLET_SYSTEMD_RUN=str(systemd_run),
        TRIPLET_SYSTEMCTL=str(systemctl),
    )
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr + (tmp_path / "unit.log").read_text()
    args = calls.read_text().splitlines()
    assert "--unit=triplet-preprocess" in args
    assert "--collect" in args
    assert "--property=KillMode=mixed" in args
    assert f"--property=RequiresMountsFor={tmp_path / 'raw'} {tmp_path / 'work'}" in args
    assert f"--setenv=TRIPLET_RUN_DIR={tmp_path / 'run'}" in args
    assert args[-2:] == [str(SCRIPTS / "startup_preprocess.sh"), "job"]
    assert not any(a.startswith("--setenv=TRIPLET_LOCK") for a in args)
    assert marker(tmp_path / "work", "done")["status"] == "done"
    assert list((tmp_path / "work" / "logs").glob("*-job.log"))


def git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A repository with the bootstrap (its scripts and the package they call) on branch gcp."""
    src = tmp_path / "origin"
    (src / "gcp").mkdir(parents=True)
    shutil.copytree(SCRIPTS, src / "gcp" / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO / "building_image_triplet_model",
        src / "building_image_triplet_model",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    git("init", "-q", "-b", "gcp", cwd=src)
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "scripts", cwd=src)
    return src


def test_repo_step_clones_then_fast_forwards(tmp_path: Path, origin: Path) -> None:
    env = script_env(
        tmp_path,
        TRIPLET_SKIP_REPO="0",
        TRIPLET_REPO_URL=f"file://{origin}",
        TRIPLET_REPO_DIR=str(tmp_path / "work" / "repo"),
    )
    r = run_script("startup_preprocess.sh", "repo", env=env)
    assert r.returncode == 0, r.stderr
    repo = tmp_path / "work" / "repo"
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=repo).strip() == "gcp"
    (origin / "NEW").write_text("x")
    git("add", "NEW", cwd=origin)
    git("commit", "-q", "-m", "new", cwd=origin)
    r = run_script("startup_preprocess.sh", "repo", env=env)
    assert r.returncode == 0, r.stderr
    assert (repo / "NEW").exists()
    assert git("rev-parse", "HEAD", cwd=repo) == git("rev-parse", "HEAD", cwd=origin)
    # A checkout that diverged is never force-moved.
    (repo / "NEW").write_text("local change")
    git("commit", "-q", "-am", "local", cwd=repo)
    (origin / "NEW2").write_text("y")
    git("add", "NEW2", cwd=origin)
    git("commit", "-q", "-m", "new2", cwd=origin)
    r = run_script("startup_preprocess.sh", "repo", env=env)
    assert r.returncode != 0
    assert "cannot fast-forward" in r.stderr


def test_stage0_runs_from_a_lone_copy_of_the_script(tmp_path: Path, origin: Path) -> None:
    """As the guest agent runs it: the script alone in a folder; it clones the repository onto the boot disk
    and runs that copy; at the next boot it updates the copy first."""
    lone = tmp_path / "guest-agent" / "startup-script"
    lone.parent.mkdir()
    shutil.copy(SCRIPTS / "startup_preprocess.sh", lone)
    boot = tmp_path / "boot"
    env = script_env(tmp_path, TRIPLET_REPO_URL=f"file://{origin}", TRIPLET_BOOTSTRAP_DIR=str(boot))
    env["GCE_METADATA_HOST"] = "127.0.0.1:9"  # nothing there: repo-ref takes its default at once
    r = subprocess.run(["bash", str(lone), "paths"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"SELF={boot / 'gcp' / 'scripts' / 'startup_preprocess.sh'}" in r.stdout
    assert git("rev-parse", "HEAD", cwd=boot) == git("rev-parse", "HEAD", cwd=origin)
    (origin / "NEW").write_text("x")
    git("add", "NEW", cwd=origin)
    git("commit", "-q", "-m", "new", cwd=origin)
    r = subprocess.run(["bash", str(lone), "paths"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert git("rev-parse", "HEAD", cwd=boot) == git("rev-parse", "HEAD", cwd=origin)
    for bad in ("https://example.com/x.git; touch /tmp/never", "--upload-pack=touch /tmp/never", ""):
        env["TRIPLET_REPO_URL"] = bad
        r = subprocess.run(["bash", str(lone), "paths"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, bad
        assert "no valid triplet-repo-url" in r.stderr
    assert not Path("/tmp/never").exists()


def test_apt_components_enable_non_free(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb deb-src\nURIs: https://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: https://deb.debian.org/debian-security\nSuites: bookworm-security\n"
        "Components: main contrib\n\n"
        "Types: deb\nURIs: https://packages.cloud.google.com/apt\nSuites: cloud-sdk-bookworm\n"
        "Components: main\n"
    )
    legacy = tmp_path / "sources.list"
    legacy.write_text(
        "deb http://deb.debian.org/debian bookworm main\n"
        "# deb http://deb.debian.org/debian bookworm-backports main\n"
        "deb [arch=amd64] https://packages.cloud.google.com/apt google-compute-engine-bookworm-stable main\n"
    )
    # As system.sh runs it: Debian's python3, before the project's environment exists.
    helper = ["python3", "-m", "building_image_triplet_model.vm.apt_sources"]
    r = subprocess.run([*helper, str(deb822), str(legacy)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = deb822.read_text()
    assert text.count("Components: main contrib non-free non-free-firmware") == 2
    assert "cloud-sdk-bookworm\nComponents: main\n" in text
    lines = legacy.read_text().splitlines()
    assert lines[0] == "deb http://deb.debian.org/debian bookworm main contrib non-free non-free-firmware"
    assert lines[1].startswith("# deb")
    assert lines[1].endswith("backports main")
    assert lines[2].endswith("stable main")
    # Idempotent.
    r = subprocess.run([*helper, str(deb822), str(legacy)], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.strip() == "0"


def test_help_and_unknown_steps() -> None:
    env = script_env(REPO / "build")
    for script in ("startup_preprocess.sh", "download_archives.sh", "extract_archives.sh"):
        r = run_script(script, "--help", env=env)
        assert r.returncode == 0, (script, r.stderr)
        assert "TRIPLET_" in r.stdout or "--" in r.stdout
    r = run_script("startup_preprocess.sh", "bogus", env=env)
    assert r.returncode == 2 and "unknown step 'bogus'" in r.stderr
    # The help describes the steps of `all` in the order ALL_STEPS runs them.
    text = (SCRIPTS / "startup_preprocess.sh").read_text()
    all_steps = re.search(r"^ALL_STEPS=\((.*)\)$", text, re.M).group(1).split()
    helped = run_script("startup_preprocess.sh", "--help", env=env).stdout
    assert re.findall(r"^  ([a-z-]+) {2,}", helped, re.M) == all_steps


# ------------------------------------------------------------------------- download and engine at once
def http_flow_env(tmp: Path, server: RangeServer, names: list[str], **extra: str) -> dict[str, str]:
    """flow_env, the archives downloaded by aria2c from ``server``, one at a time."""
    m = write_manifest(tmp / "http.txt", [(f"{server.url}/{n}", f"dataset_unaligned/{n}") for n in names])
    return flow_env(tmp, TRIPLET_ARIA2_JOBS="1", TRIPLET_MANIFEST_URI=str(m), **extra)


def test_an_engine_that_fails_at_once_is_not_hidden_by_the_download(
    tmp_path: Path, range_server: RangeServer
) -> None:
    """The engine fails while the archives still download: the job stops the download and exits with the
    engine's code (a download it stopped itself exits 143, which is not the reason)."""
    archives = sample_archives(range_server.root, archives=2, targets=8, image_size=96)
    range_server.rate = archives[0].stat().st_size // 4  # ~8 s for both: still running when the engine fails
    env = http_flow_env(tmp_path, range_server, [a.name for a in archives], FAKE_ENGINE_EXIT="4")
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 4, r.stderr[-3000:]
    work = tmp_path / "work"
    assert (marker(work, "preprocess")["status"], marker(work, "preprocess")["exit_code"]) == ("failed", 4)
    assert (marker(work, "download")["status"], marker(work, "download")["exit_code"]) == ("interrupted", 143)
    assert "--follow" in (tmp_path / "starts.txt").read_text()
    assert not (tmp_path / "work" / "state" / "done.json").exists()


def test_a_truncated_download_fails_the_phase_and_never_reaches_the_engine(
    tmp_path: Path, range_server: RangeServer
) -> None:
    """The server holds half of one tar: aria2c calls it finished, the strict tar reader does not. It never
    appears in the archive folder (so the engine, following that folder, never sees it), the download phase
    fails naming the URL, and the engine is stopped with its progress kept."""
    good, cut = sample_archives(tmp_path / "archives", archives=2)
    shutil.copy(good, range_server.root)
    data = cut.read_bytes()
    (range_server.root / cut.name).write_bytes(data[: len(data) // 2])
    env = http_flow_env(tmp_path, range_server, [good.name, cut.name])
    r = run_script("startup_preprocess.sh", env=env)
    url = f"{range_server.url}/{cut.name}"
    assert r.returncode == 1, r.stderr[-3000:]
    work, archive_dir = tmp_path / "work", tmp_path / "raw" / "dataset_unaligned"
    d = marker(work, "download")
    assert (d["status"], d["exit_code"]) == ("failed", 1)
    assert d["summary"]["missing"] == [url]
    assert f"download failed: 1 of 2 entries missing: {url}" in r.stderr
    assert "not a complete tar" in r.stderr
    assert sorted(p.name for p in archive_dir.iterdir()) == [good.name]
    p = marker(work, "preprocess")
    assert (p["status"], p["exit_code"]) == ("interrupted", 75), "the engine was stopped, not failed"
    assert "download failed (exit 1): stopping the engine" in r.stderr


def test_a_preemption_while_both_run_resumes_both(
    tmp_path: Path, range_server: RangeServer, metadata_server: MetadataServer
) -> None:
    """SIGTERM to the job's main process (systemd stopping the unit) and the shutdown script while the
    download and the engine both run: both phases are marked interrupted, the preemption is counted with
    its phase, and the next boot resumes the partial download with a Range request and completes both."""
    archives = sample_archives(range_server.root, archives=2, targets=8, image_size=96)
    range_server.rate = archives[0].stat().st_size // 2  # ~2 s per archive, one at a time
    env = http_flow_env(
        tmp_path,
        range_server,
        [a.name for a in archives],
        TRIPLET_METADATA="required",
        GCE_METADATA_HOST=metadata_server.host,
    )
    work, archive_dir = tmp_path / "work", tmp_path / "raw" / "dataset_unaligned"
    part = tmp_path / "raw" / ".triplet-downloads" / "partial" / "dataset_unaligned" / archives[1].name
    proc = start_script("startup_preprocess.sh", env=env, log=tmp_path / "first-boot.log")
    try:
        deadline = time.monotonic() + 120
        while not ((archive_dir / archives[0].name).exists() and part.exists() and part.stat().st_size > 0):
            running = time.monotonic() < deadline and proc.poll() is None
            assert running, (tmp_path / "first-boot.log").read_text()
            time.sleep(0.05)
        # The rest of the second archive slowly: the stop goes from the main process to the job, then to
        # the download script and aria2c, which must still be downloading when it arrives (a busy machine).
        range_server.rate = archives[1].stat().st_size // 30
        time.sleep(1.2)  # aria2c saves its control file every second
        assert marker(work, "download")["status"] == marker(work, "preprocess")["status"] == "running"
        os.kill(proc.pid, signal.SIGTERM)  # the main process alone, as systemd does (KillMode=mixed)
        metadata_server.values["instance/preempted"] = "TRUE"
        sd = run_script("shutdown_preprocess.sh", env=env)
        assert sd.returncode == 0, sd.stderr
        assert proc.wait(30) == 143
    finally:
        kill_group(proc, signal.SIGKILL)
        proc.wait(30)
    assert (marker(work, "download")["status"], marker(work, "preprocess")["status"]) == (
        "interrupted",
        "interrupted",
    )
    events = marker(work, "preemptions")["events"]
    assert (marker(work, "preemptions")["count"], events[-1]["phase"]) == (1, "preprocess")
    assert not (archive_dir / archives[1].name).exists()

    metadata_server.values["instance/preempted"] = "FALSE"
    range_server.rate = None
    n_before = len(range_server.requests)
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (marker(work, "download")["attempts"], marker(work, "preprocess")["attempts"]) == (2, 2)
    assert marker(work, "done")["status"] == "done"
    resumed = [q for q in range_server.requests[n_before:] if q.path == f"/{archives[1].name}" and q.range]
    assert resumed, "the partial archive was resumed, not fetched again"
    assert int(resumed[0].range.split("=")[1].split("-")[0]) > 0
    assert {q.path for q in range_server.requests[n_before:]} == {f"/{archives[1].name}"}
    for a in archives:
        assert (archive_dir / a.name).read_bytes() == a.read_bytes()


def test_sigterm_to_the_units_main_pid_alone_stops_the_job_and_records_it(
    tmp_path: Path, range_server: RangeServer
) -> None:
    """A stop as systemd makes it with KillMode=mixed: SIGTERM to the unit's main process alone (what
    systemd-run started, `startup_preprocess.sh job`), then SIGKILL to everything left once it has exited.
    The job must get the signal, stop the download and the engine, and record the interruption."""
    archives = sample_archives(range_server.root, archives=2, targets=8, image_size=96)
    range_server.rate = archives[0].stat().st_size // 2  # ~2 s per archive: both phases still run
    env = http_flow_env(tmp_path, range_server, [a.name for a in archives])
    r = run_script("startup_preprocess.sh", "config", env=env)
    assert r.returncode == 0, r.stderr
    log = tmp_path / "unit.log"
    proc = start_script("startup_preprocess.sh", "job", env=env, log=log)
    work = tmp_path / "work"
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "starts.txt").exists() and range_server.requests):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        assert marker(work, "download")["status"] == marker(work, "preprocess")["status"] == "running"
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(30)
    finally:
        kill_group(proc, signal.SIGKILL)  # KillMode=mixed: what is left after the main process is killed
        proc.wait(30)
    assert code == 143, log.read_text()
    assert (marker(work, "download")["status"], marker(work, "preprocess")["status"]) == (
        "interrupted",
        "interrupted",
    ), log.read_text()
    assert "SIGTERM: stopping" in log.read_text()


def test_a_failed_optional_step_warns_and_the_boot_goes_on_to_the_job(tmp_path: Path) -> None:
    """The Ops Agent's repository unreachable (no network at all here: a network namespace of its own, so
    nothing can be installed on this machine): the ops-agent step fails, the boot goes on to restore and
    start, and the job runs to the end."""
    reason = unshare_skip_reason()
    if reason:
        pytest.skip(reason)
    env = flow_env(tmp_path, TRIPLET_SKIP_SYSTEM="0", TRIPLET_INSTALL_OPS_AGENT="true")
    steps = ("config", "ops-agent", "restore", "start")
    r = subprocess.run(
        ["unshare", "-n", "bash", str(SCRIPTS / "startup_preprocess.sh"), *steps],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ops-agent: failed (exit" in r.stderr
    assert "it is optional: going on without it" in r.stderr
    assert marker(tmp_path / "work", "done")["status"] == "done"
