"""gcp/batch_submit.sh and the Cloud Batch job templates: structure, the real API schema, idempotency."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from provision_helpers import (
    BASH,
    BATCH_SUBMIT,
    PARSER_HARNESS,
    PROVISION,
    REPO,
    FakeCloud,
    mutations,
    run_script,
    verb_path,
)

TEMPLATES = REPO / "gcp" / "batch"
BASE = ["--set", "PROJECT_ID=test-project", "--set", "REPO_URL=https://example.invalid/triplets.git"]


def render(tmp_path: Path, *sets: str, sub: str = "submit") -> dict[str, Any]:
    """Renders a job with a dry run (which writes build/batch/<job>.json) and returns it."""
    config = tmp_path / "preprocess.yaml"
    config.write_text("model: {}\n")
    name = f"test-{sub}-{abs(hash(sets)) % 10**8}"
    option = "--job-name" if sub == "submit" else "--merge-job-name"
    run_script(BATCH_SUBMIT, ["--dry-run", "--set", f"PREPROCESS_CONFIG={config}", *sets, sub, option, name])
    path = REPO / "build" / "batch" / f"{name}.json"
    job = json.loads(path.read_text())
    path.unlink()
    return job


def test_templates_are_json_with_whole_value_placeholders() -> None:
    for path in TEMPLATES.glob("*.json"):
        text = path.read_text()
        json.loads(text)
        for m in re.finditer(r"@@[A-Z_]+@@", text):
            assert text[m.start() - 1] + text[m.end()] == '""', (path, m.group())


def test_worker_job_structure(tmp_path: Path) -> None:
    job = render(tmp_path, "--set", "BATCH_TASK_COUNT=12", "--set", "BATCH_PARALLELISM=6")
    (group,) = job["taskGroups"]
    assert group["taskCount"] == 12
    assert group["parallelism"] == 6
    assert group["taskCountPerNode"] == 1
    spec = group["taskSpec"]
    # Retries on preemption only: one RETRY_TASK policy on Batch's Spot-preemption exit code. Batch fails a
    # task whose exit code matches no RETRY_TASK policy, so every other failure is final.
    assert spec["lifecyclePolicies"] == [{"action": "RETRY_TASK", "actionCondition": {"exitCodes": [50001]}}]
    assert 1 <= spec["maxRetryCount"] <= 10
    (runnable,) = spec["runnables"]
    script = runnable["script"]["text"]
    assert script.startswith("#!/bin/bash\n")
    assert 'TASK_INDEX="${BATCH_TASK_INDEX:-0}"' in script
    assert 'TASK_COUNT="${BATCH_TASK_COUNT:-1}"' in script
    assert "startup_preprocess.sh" in script
    env = spec["environment"]["variables"]
    assert env["TRIPLET_MODE"] == "worker"
    assert env["TRIPLET_RUN_MODE"] == "direct"  # the task must last as long as the job
    assert env["TRIPLET_ALLOW_REBOOT"] == "0"  # a reboot inside a task is not a retried failure
    assert env["TRIPLET_RUN_ID"] == "run-001"
    assert env["TRIPLET_CHECKPOINT_URI"] == "gs://building-triplets-processed/checkpoints"
    assert env["TRIPLET_SCRIPTS_URI"] == "gs://building-triplets-processed/startup/"
    assert env["TRIPLET_PREPROCESS_CONFIG_URI"].endswith("/startup/runs/run-001/preprocess.yaml")
    alloc = job["allocationPolicy"]
    (instance,) = alloc["instances"]
    policy = instance["policy"]
    assert policy["machineType"] == "g2-standard-16"
    assert policy["provisioningModel"] == "SPOT"
    assert policy["accelerators"] == [{"type": "nvidia-l4", "count": "1"}]
    assert policy["bootDisk"]["image"] == "projects/debian-cloud/global/images/family/debian-12"
    assert [d["deviceName"] for d in policy["disks"]] == ["raw-data-1tb", "work-scratch-512gb"]
    assert all(d["newDisk"]["type"] == "pd-balanced" for d in policy["disks"])
    assert instance["installGpuDrivers"] is False
    assert instance["installOpsAgent"] is True
    assert alloc["serviceAccount"]["email"] == "triplet-preproc@your-project-id.iam.gserviceaccount.com"
    assert alloc["location"]["allowedLocations"] == ["regions/us-central1"]
    assert job["logsPolicy"] == {"destination": "CLOUD_LOGGING"}


def test_task_script_is_valid_bash(tmp_path: Path) -> None:
    for sub in ("submit", "merge"):
        script = render(tmp_path, sub=sub)["taskGroups"][0]["taskSpec"]["runnables"][0]["script"]["text"]
        path = tmp_path / f"{sub}.sh"
        path.write_text(script)
        assert subprocess.run([BASH, "-n", str(path)], check=False).returncode == 0


def test_merge_job_structure(tmp_path: Path) -> None:
    job = render(tmp_path, sub="merge")
    (group,) = job["taskGroups"]
    assert group["taskCount"] == 1
    assert group["parallelism"] == 1
    assert group["taskSpec"]["environment"]["variables"]["TRIPLET_MODE"] == "merge"
    policy = job["allocationPolicy"]["instances"][0]["policy"]
    assert "accelerators" not in policy
    assert policy["machineType"] == "n2-highmem-8"
    assert policy["provisioningModel"] == "STANDARD"


def test_zone_list_and_retry_settings_are_rendered(tmp_path: Path) -> None:
    job = render(
        tmp_path,
        "--set",
        "BATCH_ALLOWED_LOCATIONS=zones/us-central1-a,zones/us-central1-c",
        "--set",
        "BATCH_RETRY_EXIT_CODES=50001,50002",
        "--set",
        "BATCH_MAX_RETRY_COUNT=3",
    )
    assert job["allocationPolicy"]["location"]["allowedLocations"] == [
        "zones/us-central1-a",
        "zones/us-central1-c",
    ]
    spec = job["taskGroups"][0]["taskSpec"]
    assert spec["lifecyclePolicies"][0]["actionCondition"]["exitCodes"] == [50001, 50002]
    assert spec["maxRetryCount"] == 3


def test_invalid_batch_settings_are_refused() -> None:
    for sets in (
        ["--set", "BATCH_PARALLELISM=9"],  # more than BATCH_TASK_COUNT=8
        ["--set", "BATCH_MAX_RETRY_COUNT=11"],  # Batch allows 0..10
        ["--set", "BATCH_ALLOWED_LOCATIONS=us-central1"],
    ):
        proc = run_script(BATCH_SUBMIT, ["--dry-run", *sets, "submit"], check=False)
        assert proc.returncode == 2, sets
    proc = run_script(BATCH_SUBMIT, ["--dry-run", "submit", "--job-name", "Bad_Name"], check=False)
    assert proc.returncode == 2
    assert "invalid job name" in proc.stderr


def check_with_gcloud_schema(lib: Path, paths: list[Path], tmp_path: Path) -> list[dict[str, Any]]:
    out = tmp_path / "schema.json"
    subprocess.run(
        [sys.executable, "-S", str(PARSER_HARNESS), str(lib), str(out), "--batch-job", *map(str, paths)],
        check=True,
        timeout=300,
    )
    return json.loads(out.read_text())


def test_rendered_jobs_match_the_batch_api_schema(gcloud_lib: Path, tmp_path: Path) -> None:
    """Decoded with gcloud's own Batch v1 Job message class: no unknown field, no invalid enum value."""
    paths = []
    for sub in ("submit", "merge"):
        job = render(tmp_path, sub=sub)
        path = tmp_path / f"{sub}.json"
        path.write_text(json.dumps(job))
        paths.append(path)
    broken = json.loads(paths[0].read_text())
    broken["taskGroups"][0]["taskSpec"]["maxRetryCounts"] = 3
    broken["allocationPolicy"]["instances"][0]["policy"]["provisioningModel"] = "SPOTTY"
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(broken))
    results = check_with_gcloud_schema(gcloud_lib, [*paths, bad], tmp_path)
    assert results[0]["unrecognized"] == []
    assert results[1]["unrecognized"] == []
    assert any("maxRetryCounts" in p for p in results[2]["unrecognized"])
    assert any("provisioningModel" in p for p in results[2]["unrecognized"])


def batch(fake: FakeCloud, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_script(
        BATCH_SUBMIT, [*BASE, "--set", f"PREPROCESS_CONFIG={config}", *args], env=fake.env(), check=check
    )


@pytest.fixture
def provisioned(fake_cloud: FakeCloud, run_files: dict[str, Path]) -> FakeCloud:
    sets = [
        f"PREPROCESS_CONFIG={run_files['config']}",
        f"SCRIPTS_DIR={run_files['scripts']}",
        "MANIFEST_SOURCE=",
    ]
    for sub in ("apis", "buckets", "service-account", "upload-scripts"):
        run_script(PROVISION, [*BASE, *(x for s in sets for x in ("--set", s)), sub], env=fake_cloud.env())
    fake_cloud.reset_log()
    return fake_cloud


def test_submit_merge_flow_against_the_stand_in(provisioned: FakeCloud, run_files: dict[str, Path]) -> None:
    fake, config = provisioned, run_files["config"]
    batch(fake, config, "setup")
    assert [verb_path(c) for c in mutations(fake.calls())] == [
        "services enable",
        "projects add-iam-policy-binding",
    ]
    fake.reset_log()
    batch(fake, config, "setup")
    assert mutations(fake.calls()) == []

    batch(fake, config, "submit")
    state = fake.read_state()
    assert state["jobs"]["triplet-run-001-workers"]["config"]["taskGroups"][0]["taskCount"] == 8
    assert "gs://building-triplets-processed/startup/runs/run-001/preprocess.yaml" in state["objects"]
    fake.reset_log()
    batch(fake, config, "submit")
    assert mutations(fake.calls()) == []

    proc = batch(fake, config, "merge", check=False)
    assert proc.returncode == 2
    assert "not SUCCEEDED" in proc.stderr
    state = fake.read_state()
    state["jobs"]["triplet-run-001-workers"]["state"] = "SUCCEEDED"
    fake.write_state(state)
    batch(fake, config, "merge", "--wait")
    assert fake.read_state()["jobs"]["triplet-run-001-merge"]["config"]["taskGroups"][0]["taskCount"] == 1

    out = batch(fake, config, "status").stdout
    assert "job triplet-run-001-workers: SUCCEEDED" in out
    assert "job triplet-run-001-merge: QUEUED" in out
    assert out.count("\tSUCCEEDED") == 8

    batch(fake, config, "delete")
    assert fake.read_state()["jobs"] == {}
