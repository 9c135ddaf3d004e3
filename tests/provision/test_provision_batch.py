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
    current_branch,
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
    # Only the startup script comes from the bucket; its stage 0 clones the repository.
    assert 'gcloud storage cp "$TRIPLET_STARTUP_SCRIPT_URI" "$dir/startup_preprocess.sh"' in script
    assert "*" not in script.split("gcloud storage cp", 1)[1].split("\n", 1)[0]
    env = spec["environment"]["variables"]
    assert env["TRIPLET_MODE"] == "worker"
    assert env["TRIPLET_RUN_MODE"] == "direct"  # the task must last as long as the job
    assert env["TRIPLET_ALLOW_REBOOT"] == "0"  # a reboot inside a task is not a retried failure
    assert env["TRIPLET_RUN_ID"] == "run-001"
    assert env["TRIPLET_CHECKPOINT_URI"] == "gs://building-triplets-processed/checkpoints"
    assert (
        env["TRIPLET_STARTUP_SCRIPT_URI"] == "gs://building-triplets-processed/startup/startup_preprocess.sh"
    )
    assert env["TRIPLET_PUSH_INTERVAL_MIN"] == "30"
    assert env["TRIPLET_REPO_REF"] == current_branch()  # an empty REPO_REF: the branch being provisioned
    assert not {"TRIPLET_SCRIPTS_URI", "TRIPLET_CHECKPOINT_INTERVAL_MIN"} & set(env)
    assert env["TRIPLET_PREPROCESS_CONFIG_URI"].endswith("/startup/runs/run-001/preprocess.yaml")
    alloc = job["allocationPolicy"]
    (instance,) = alloc["instances"]
    policy = instance["policy"]
    assert policy["machineType"] == "g2-standard-16"
    assert policy["provisioningModel"] == "SPOT"
    assert policy["accelerators"] == [{"type": "nvidia-l4", "count": "1"}]
    # The baked image of the project (USE_BAKED_IMAGE=true); the dry run shows the placeholder project.
    assert (
        policy["bootDisk"]["image"]
        == "projects/your-project-id/global/images/family/triplet-preproc-debian-12"
    )
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
    instance = job["allocationPolicy"]["instances"][0]
    assert instance["installGpuDrivers"] is False
    policy = instance["policy"]
    assert "accelerators" not in policy
    assert policy["machineType"] == "n2-highmem-8"
    assert policy["provisioningModel"] == "STANDARD"


def test_without_the_baked_image_the_workers_boot_debian(tmp_path: Path) -> None:
    for sub in ("submit", "merge"):
        job = render(tmp_path, "--set", "USE_BAKED_IMAGE=false", sub=sub)
        instance = job["allocationPolicy"]["instances"][0]
        assert (
            instance["policy"]["bootDisk"]["image"] == "projects/debian-cloud/global/images/family/debian-12"
        )
        assert instance["installGpuDrivers"] is False, "the startup script is the one driver path, always"


def test_gpu_drivers_are_never_batchs_to_install() -> None:
    """installGpuDrivers is a literal false in both templates, and no setting can change it."""
    for path in TEMPLATES.glob("*.json"):
        (instance,) = json.loads(path.read_text())["allocationPolicy"]["instances"]
        assert instance["installGpuDrivers"] is False, path
    assert "INSTALL_GPU_DRIVERS" not in (REPO / "gcp" / "provision.conf").read_text()
    assert "INSTALL_GPU_DRIVERS" not in BATCH_SUBMIT.read_text()


def test_the_task_runs_the_startup_script_alone(tmp_path: Path) -> None:
    """The runnable fetches startup_preprocess.sh alone into an empty folder (so that its stage 0 clones the
    repository) and runs it with this task's index."""
    script = render(tmp_path)["taskGroups"][0]["taskSpec"]["runnables"][0]["script"]["text"]
    task = tmp_path / "task.sh"
    task.write_text(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud-calls"
    stand_in = (
        '#!/bin/bash\necho "ran index=$TASK_INDEX count=$TASK_COUNT in $(dirname "$0")"\n'
        'ls -A "$(dirname "$0")"\n'
    )
    (bin_dir / "gcloud").write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n[ "$1 $2" = \'storage cp\' ] || exit 3\n'
        f"cat > \"$4\" <<'EOF'\n{stand_in}EOF\n"
    )
    (bin_dir / "gcloud").chmod(0o755)
    uri = "gs://building-triplets-processed/startup/startup_preprocess.sh"
    proc = subprocess.run(
        [BASH, str(task)],
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "TRIPLET_STARTUP_SCRIPT_URI": uri,
            "BATCH_TASK_INDEX": "3",
            "BATCH_TASK_COUNT": "8",
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=30,  # a failed fetch is retried with sleeps: fail fast instead
    )
    assert proc.returncode == 0, proc.stderr
    first, *listing = proc.stdout.splitlines()
    assert first.startswith("ran index=3 count=8 in ")
    folder = Path(first.rsplit(" in ", 1)[1])
    try:
        assert listing == ["startup_preprocess.sh"], "alone: no lib.sh beside it, so stage 0 runs"
        assert calls.read_text().split() == ["storage", "cp", uri, str(folder / "startup_preprocess.sh")]
    finally:
        (folder / "startup_preprocess.sh").unlink()
        folder.rmdir()


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


# Every variant the settings can render: both jobs, with and without the baked image, zones, retries, sizes.
RENDERINGS: list[tuple[str, tuple[str, ...]]] = [
    ("submit", ()),
    ("merge", ()),
    ("submit", ("--set", "USE_BAKED_IMAGE=false")),
    ("merge", ("--set", "USE_BAKED_IMAGE=false", "--set", "BATCH_MERGE_PROVISIONING_MODEL=SPOT")),
    (
        "submit",
        (
            "--set",
            "BATCH_ALLOWED_LOCATIONS=zones/us-central1-a,zones/us-central1-c",
            "--set",
            "BATCH_RETRY_EXIT_CODES=50001,50002",
            "--set",
            "BATCH_MAX_RETRY_COUNT=0",
            "--set",
            "INSTALL_OPS_AGENT=false",
            "--set",
            "ACCELERATOR_COUNT=2",
        ),
    ),
]

# Each breaks the worker job in one way the API would refuse or misread: (path in the job, new value).
BREAKAGES: list[tuple[str, list[str | int], object]] = [
    ("misspelt key", ["taskGroups", 0, "taskSpec", "maxRetryCounts"], 3),
    ("unknown enum value", ["allocationPolicy", "instances", 0, "policy", "provisioningModel"], "SPOTTY"),
    ("bool as a string", ["allocationPolicy", "instances", 0, "installGpuDrivers"], "false"),
    ("bool for an integer", ["taskGroups", 0, "parallelism"], True),
    ("object for a list", ["taskGroups", 0, "taskSpec", "lifecyclePolicies"], {"action": "RETRY_TASK"}),
    ("string for an object", ["logsPolicy"], "CLOUD_LOGGING"),
    ("number for a string", ["allocationPolicy", "instances", 0, "policy", "machineType"], 16),
    ("word for an integer", ["taskGroups", 0, "taskCount"], "eight"),
    ("null", ["allocationPolicy", "serviceAccount"], None),
]


def _set(doc: Any, path: list[str | int], value: object) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def test_rendered_jobs_match_the_batch_api_schema(gcloud_lib: Path, tmp_path: Path) -> None:
    """Every rendered job decodes with gcloud's own Batch v1 Job message class (apitools, as `gcloud batch
    jobs submit` reads --config) with no unknown field, no invalid enum value and no value of the wrong JSON
    type anywhere; and each kind of mistake is caught."""
    paths = []
    for i, (sub, sets) in enumerate(RENDERINGS):
        path = tmp_path / f"job-{i}.json"
        path.write_text(json.dumps(render(tmp_path, *sets, sub=sub)))
        paths.append(path)
    good = json.loads(paths[0].read_text())
    broken = []
    for i, (_, where, value) in enumerate(BREAKAGES):
        job = json.loads(json.dumps(good))
        _set(job, where, value)
        path = tmp_path / f"broken-{i}.json"
        path.write_text(json.dumps(job))
        broken.append(path)
    results = check_with_gcloud_schema(gcloud_lib, [*paths, *broken], tmp_path)
    assert len(results) == len(paths) + len(broken)
    for (sub, sets), result in zip(RENDERINGS, results, strict=False):
        assert result["problems"] == [], (sub, sets)
    for (what, where, _), result in zip(BREAKAGES, results[len(paths) :], strict=True):
        assert result["problems"], f"not caught: {what}"
        assert any(str(where[-1]) in p for p in result["problems"]), (what, result["problems"])


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
    for sub in ("apis", "buckets", "service-account", "upload-scripts", "image"):
        run_script(PROVISION, [*BASE, *(x for s in sets for x in ("--set", s)), sub], env=fake_cloud.env())
    fake_cloud.reset_log()
    return fake_cloud


def test_submit_refuses_before_the_image_is_baked(fake_cloud: FakeCloud, run_files: dict[str, Path]) -> None:
    sets = ["--set", f"PREPROCESS_CONFIG={run_files['config']}", "--set", "MANIFEST_SOURCE="]
    for sub in ("apis", "buckets"):
        run_script(PROVISION, [*BASE, *sets, sub], env=fake_cloud.env())
    fake_cloud.reset_log()
    proc = batch(fake_cloud, run_files["config"], "submit", check=False)
    assert proc.returncode == 2
    assert "run 'gcp/provision.sh image' first" in proc.stderr
    assert "batch jobs submit" not in [verb_path(c) for c in fake_cloud.calls()]


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
