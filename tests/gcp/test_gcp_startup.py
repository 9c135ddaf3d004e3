"""The startup flow in direct mode with a fast stand-in engine: phases and markers, checkpoints to a local
folder and to the Cloud Storage emulator, restore onto a fresh work disk, finalize, on-done, the systemd
path, the repository step and the stage-0 bootstrap from metadata."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from gcp_helpers import REPO, SCRIPTS, Emulator, make_tar, run_script, script_env
from gcp_servers import MetadataServer

from building_image_triplet_model.cloud_sync import crc32c_of_file

FAKE = Path(__file__).resolve().parent / "fake_engine"


def flow_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Archives served by file:// entries, the stand-in engine, checkpoints into a local 'bucket'."""
    for n in ("0003", "0004"):
        if not (tmp / "src" / f"{n}.tar").exists():
            make_tar(tmp / "src" / f"{n}.tar", n, n_images=2)
    (tmp / "manifest.txt").write_text(
        "".join(f"file://{tmp}/src/{n}.tar\n\tout=dataset_unaligned/{n}.tar\n" for n in ("0003", "0004"))
    )
    env = script_env(
        tmp,
        TRIPLET_RUN_ID="run-1",
        TRIPLET_CHECKPOINT_URI=str(tmp / "bucket"),
        TRIPLET_MANIFEST_URI=str(tmp / "manifest.txt"),
        TRIPLET_PREPROCESS_CONFIG_PATH="configs/demo.yaml",
        TRIPLET_PROCESSOR_MODULE="fake_processor",
        TRIPLET_STATUS_MODULE="fake_status",
        TRIPLET_CHECKPOINT_INTERVAL_S="1",
        PYTHONPATH=str(FAKE),
        FAKE_ENGINE_STARTS=str(tmp / "starts.txt"),
    )
    env.update(extra)
    return env


def marker(tmp: Path, phase: str) -> dict:
    return json.loads((tmp / "work" / "state" / f"{phase}.json").read_text())


def test_full_flow_then_every_phase_is_skipped(tmp_path: Path) -> None:
    env = flow_env(
        tmp_path, TRIPLET_EXTRACT_ARCHIVES="true", TRIPLET_METADATA_CACHE_SYNC_URI=str(tmp_path / "mc")
    )
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    for phase in ("download", "extract", "preprocess", "finalize", "done"):
        m = marker(tmp_path, phase)
        assert m["status"] == "done", (phase, m)
    d = marker(tmp_path, "download")
    assert (d["attempts"], d["summary"]["entries"], d["summary"]["downloaded"]) == (1, 2, 2)
    assert d["started_at"].endswith("Z")
    assert d["ended_at"].endswith("Z")
    assert d["run_id"] == "run-1"
    assert marker(tmp_path, "extract")["summary"]["files_written"] == 8
    h5 = tmp_path / "work" / "output" / "dataset.h5"
    bucket = tmp_path / "bucket" / "run-1"
    # The artifact, verified, with its commit marker beside it.
    assert (bucket / "artifact" / "dataset.h5").read_bytes() == h5.read_bytes()
    ok = json.loads((bucket / "artifact" / "_SUCCESS.json").read_text())
    assert ok["size"] == h5.stat().st_size
    assert ok["crc32c"] == crc32c_of_file(h5)
    assert marker(tmp_path, "done")["finalize"]["summary"]["crc32c"] == ok["crc32c"]
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
    for phase in ("download", "extract", "preprocess", "finalize"):
        assert f"phase {phase}: done (attempts 1); skipping" in r.stderr
        assert marker(tmp_path, phase)["attempts"] == 1
    assert len((tmp_path / "starts.txt").read_text().splitlines()) == 1, "the engine did not run again"


def test_engine_exit_codes_are_recorded(tmp_path: Path) -> None:
    env = flow_env(tmp_path, FAKE_ENGINE_EXIT="4")
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 4
    assert "resume refused (exit 4)" in r.stderr
    m = marker(tmp_path, "preprocess")
    assert (m["status"], m["exit_code"], m["attempts"]) == ("failed", 4, 1)
    env["FAKE_ENGINE_EXIT"] = "75"
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 75
    m = marker(tmp_path, "preprocess")
    assert (m["status"], m["exit_code"], m["attempts"]) == ("interrupted", 75, 2)
    assert marker(tmp_path, "download")["attempts"] == 1
    del env["FAKE_ENGINE_EXIT"]
    assert run_script("startup_preprocess.sh", env=env).returncode == 0
    assert marker(tmp_path, "preprocess")["attempts"] == 3


def test_checkpoint_restore_onto_a_fresh_work_disk_through_the_emulator(
    tmp_path: Path, gcs_emulator: Emulator
) -> None:
    name = gcs_emulator.new_bucket()
    env = flow_env(
        tmp_path,
        TRIPLET_CHECKPOINT_URI=f"gs://{name}/checkpoints",
        TRIPLET_CHECKPOINT_INTERVAL_S="1800",
        **gcs_emulator.env(),
    )
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    objs = gcs_emulator.objects(name, "checkpoints/run-1/")
    assert "checkpoints/run-1/artifact/dataset.h5" in objs
    assert "checkpoints/run-1/state/done.json" in objs
    assert "checkpoints/run-1/output/dataset.work/emb/0001/0-10.npz" in objs

    # Incremental: a second checkpoint sends nothing (the logs aside: they grow with every run).
    r = run_script("startup_preprocess.sh", "checkpoint", env=env)
    assert r.returncode == 0, r.stderr
    assert "/run-1/output: 0 transferred" in r.stderr  # engine files
    assert "/run-1/state: 0 transferred" in r.stderr  # markers

    # A new work disk: nothing local. The bucket has state: restore it, then continue.
    old_work = tmp_path / "work"
    before = {p.relative_to(old_work).as_posix(): p.read_bytes()
              for p in (old_work / "output" / "dataset.work").rglob("*")
              if p.is_file() and p.name != "lock" and not p.name.endswith(".tmp")}  # fmt: skip
    shutil.move(old_work, tmp_path / "old-work")
    r = run_script("startup_preprocess.sh", "config", "restore", env=env)
    assert r.returncode == 0, r.stderr
    assert "restoring it" in r.stderr
    after = {p.relative_to(old_work).as_posix(): p.read_bytes()
             for p in (old_work / "output" / "dataset.work").rglob("*") if p.is_file()}  # fmt: skip
    assert after == before
    assert marker(tmp_path, "preprocess")["status"] == "done"
    assert marker(tmp_path, "done")["status"] == "done"
    # The whole flow now skips everything it can (the raw disk still has the archives).
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "nothing to restore" in r.stderr
    assert "phase download: done (attempts 1); skipping" in r.stderr
    assert "phase finalize: done (attempts 1); skipping" in r.stderr
    assert len((tmp_path / "starts.txt").read_text().splitlines()) == 1


def test_a_new_raw_disk_downloads_again(tmp_path: Path) -> None:
    env = flow_env(tmp_path)
    assert run_script("startup_preprocess.sh", env=env).returncode == 0
    shutil.rmtree(tmp_path / "raw")
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "phase download: marked done but its output is not there any more" in r.stderr
    assert marker(tmp_path, "download")["attempts"] == 2
    assert (tmp_path / "raw" / "dataset_unaligned" / "0004.tar").exists()


def test_scale_out_worker_and_merge_modes(tmp_path: Path) -> None:
    """TRIPLET_MODE=worker (Cloud Batch sets TASK_INDEX/TASK_COUNT): only this task's archives are downloaded,
    the engine gets --task-index/--task-count/--run-uri, state goes to RUN/tasks/I-of-N, no artifact.
    TRIPLET_MODE=merge: nothing downloaded, the engine merges, the artifact is uploaded."""
    env = flow_env(tmp_path, TRIPLET_MODE="worker", TASK_INDEX="1", TASK_COUNT="2")
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "raw" / "dataset_unaligned").iterdir()) == ["0004.tar"]
    start = (tmp_path / "starts.txt").read_text().splitlines()[-1]
    assert start.endswith(f"--task-index 1 --task-count 2 --run-uri {tmp_path / 'bucket' / 'run-1'}")
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
    env = flow_env(tmp_path, TRIPLET_METADATA="required", GCE_METADATA_HOST=metadata_server.host,
                   TRIPLET_GCLOUD=str(gcloud))  # fmt: skip
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
    env = flow_env(tmp_path, TRIPLET_METADATA="required", GCE_METADATA_HOST=metadata_server.host,
                   TRIPLET_GCLOUD=str(gcloud))  # fmt: skip
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
        ["compute", "instances", "delete", "vm", "--zone=us-central1-a", "--project=test-project",
         "--keep-disks=data", "--quiet"],
        ["compute", "instance-groups", "managed", "stop-instances", "mig", "--instances=vm",
         "--zone=us-central1-a", "--project=test-project", "--quiet"],
        ["compute", "instance-groups", "managed", "delete-instances", "mig", "--instances=vm",
         "--region=us-central1", "--project=test-project", "--quiet"],
    ):  # fmt: skip
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
    env = flow_env(tmp_path, TRIPLET_RUN_MODE="systemd", TRIPLET_SYSTEMD_RUN=str(systemd_run),
                   TRIPLET_SYSTEMCTL=str(systemctl))  # fmt: skip
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr + (tmp_path / "unit.log").read_text()
    args = calls.read_text().splitlines()
    assert "--unit=triplet-preprocess" in args
    assert "--collect" in args
    assert "--property=KillMode=mixed" in args
    assert f"--setenv=TRIPLET_RUN_DIR={tmp_path / 'run'}" in args
    assert args[-2:] == [str(SCRIPTS / "startup_preprocess.sh"), "job"]
    assert not any(a.startswith("--setenv=TRIPLET_LOCK") for a in args)
    assert marker(tmp_path, "done")["status"] == "done"
    assert list((tmp_path / "work" / "logs").glob("*-job.log"))


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A repository with the bootstrap scripts on branch gcp."""
    src = tmp_path / "origin"
    (src / "gcp").mkdir(parents=True)
    shutil.copytree(SCRIPTS, src / "gcp" / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    git("init", "-q", "-b", "gcp", cwd=src)
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "scripts", cwd=src)
    return src


def test_repo_step_clones_then_fast_forwards(tmp_path: Path, origin: Path) -> None:
    env = script_env(tmp_path, TRIPLET_SKIP_REPO="0", TRIPLET_REPO_URL=f"file://{origin}",
                     TRIPLET_REPO_DIR=str(tmp_path / "work" / "repo"))  # fmt: skip
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
    """As the guest agent runs it: the script alone in a folder; it fetches the repository, runs its copy."""
    lone = tmp_path / "guest-agent" / "startup-script"
    lone.parent.mkdir()
    shutil.copy(SCRIPTS / "startup_preprocess.sh", lone)
    env = script_env(
        tmp_path, TRIPLET_REPO_URL=f"file://{origin}", TRIPLET_BOOTSTRAP_DIR=str(tmp_path / "boot")
    )
    env["GCE_METADATA_HOST"] = "127.0.0.1:9"  # nothing there: repo-ref takes its default at once
    r = subprocess.run(["bash", str(lone), "paths"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"SELF={tmp_path / 'boot' / 'gcp' / 'scripts' / 'startup_preprocess.sh'}" in r.stdout
    env["TRIPLET_REPO_URL"] = "https://example.com/x.git; touch /tmp/never"
    r = subprocess.run(["bash", str(lone), "paths"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "neither triplet-scripts-uri nor a valid triplet-repo-url" in r.stderr


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud not installed")
def test_stage0_copies_the_scripts_from_the_bucket(tmp_path: Path, gcs_emulator: Emulator) -> None:
    """startup-script-url hands the guest agent this one file; triplet-scripts-uri holds the rest (the real
    gcloud storage cp, against the emulator)."""
    from building_image_triplet_model import cloud_sync

    name = gcs_emulator.new_bucket()
    for f in SCRIPTS.iterdir():
        if f.is_file():
            cloud_sync.upload_file(f, f"gs://{name}/startup/{f.name}")
    lone = tmp_path / "guest-agent" / "startup-script"
    lone.parent.mkdir()
    shutil.copy(SCRIPTS / "startup_preprocess.sh", lone)
    env = script_env(
        tmp_path,
        TRIPLET_SCRIPTS_URI=f"gs://{name}/startup/",
        TRIPLET_BOOTSTRAP_DIR=str(tmp_path / "boot"),
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud-config"),
        CLOUDSDK_AUTH_DISABLE_CREDENTIALS="true",
        CLOUDSDK_CORE_PROJECT="test-project",
        CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE=f"{gcs_emulator.url}/storage/v1/",
    )
    r = subprocess.run(["bash", str(lone), "paths"], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"SELF={tmp_path / 'boot' / 'startup_preprocess.sh'}" in r.stdout
    assert (tmp_path / "boot" / "lib.sh").exists()
    assert (tmp_path / "boot" / "bootstrap_helpers.py").exists()


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
    helper = ["python3", str(SCRIPTS / "bootstrap_helpers.py"), "apt-components"]
    r = subprocess.run([*helper, str(deb822), str(legacy)], capture_output=True, text=True)
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
    r = subprocess.run([*helper, str(deb822), str(legacy)], capture_output=True, text=True)
    assert r.stdout.strip() == "0"


def test_help_and_unknown_steps() -> None:
    env = script_env(REPO / "build")
    for script in ("startup_preprocess.sh", "download_archives.sh", "extract_archives.sh"):
        r = run_script(script, "--help", env=env)
        assert r.returncode == 0, (script, r.stderr)
        assert "TRIPLET_" in r.stdout or "--" in r.stdout
    r = run_script("startup_preprocess.sh", "bogus", env=env)
    assert r.returncode == 2
