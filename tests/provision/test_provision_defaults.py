"""The committed gcp/provision.conf works as it is, for real: `provision.sh all` and `batch_submit.sh submit`,
not dry runs, with no --set at all, against the stand-in gcloud.

The scripts run from a copy of this checkout's working tree (the files they read, exactly as they are here)
whose `origin` remote is a test URL; the stand-in's current project stands in for `gcloud config set project`.
"""

from __future__ import annotations

import json
from pathlib import Path

from provision_helpers import REPO, FakeCloud, checkout_copy, mutations, run_script, verb_path

ORIGIN = "https://example.invalid/org/building-image-triplet-model.git"
PROJECT = "operator-project-1"
FAMILY = "triplet-preproc-debian-12"


def test_the_committed_defaults_provision_and_submit_for_real(tmp_path: Path, fake_cloud: FakeCloud) -> None:
    repo = checkout_copy(tmp_path / "repo", origin=ORIGIN)
    assert (repo / "gcp" / "provision.conf").read_text() == (REPO / "gcp" / "provision.conf").read_text()
    env = fake_cloud.env(FAKE_GCLOUD_PROJECT=PROJECT)

    run_script(repo / "gcp" / "provision.sh", ["all"], env=env)
    run_script(repo / "gcp" / "batch_submit.sh", ["submit"], env=env)

    calls = fake_cloud.calls()
    for call in mutations(calls):
        if call[:2] != ["storage", "cp"]:
            assert PROJECT in " ".join(call), call
    state = fake_cloud.read_state()
    # Everything the defaults name was found and used.
    assert sorted(state["objects"]) == [
        "gs://building-triplets-processed/manifests/raw_archives.txt",
        "gs://building-triplets-processed/startup/ops-agent-config.yaml",
        "gs://building-triplets-processed/startup/runs/run-001/preprocess.yaml",
        "gs://building-triplets-processed/startup/shutdown_preprocess.sh",
        "gs://building-triplets-processed/startup/startup_preprocess.sh",
    ]
    objects = state["objects"]
    vm_yaml = (REPO / "configs" / "vm.yaml").read_text()
    assert objects["gs://building-triplets-processed/startup/runs/run-001/preprocess.yaml"]["text"] == vm_yaml
    assert (
        objects["gs://building-triplets-processed/startup/startup_preprocess.sh"]["text"]
        == (REPO / "gcp" / "scripts" / "startup_preprocess.sh").read_text()
    )
    (template,) = state["templates"].values()
    assert template["metadata-from-file"] == f"triplet-preprocess-config={repo / 'configs' / 'vm.yaml'}"
    assert template["project"] == PROJECT
    assert (template["image-family"], template["image-project"]) == (FAMILY, PROJECT)
    metadata = dict(item.split("=", 1) for item in template["metadata"].split(","))
    assert metadata["triplet-repo-url"] == ORIGIN
    assert len(state["images"]) == 1
    assert state["migs"]

    (job,) = state["jobs"].values()
    config = job["config"]
    policy = config["allocationPolicy"]["instances"][0]
    assert policy["installGpuDrivers"] is False
    assert policy["policy"]["bootDisk"]["image"] == f"projects/{PROJECT}/global/images/family/{FAMILY}"
    assert config["allocationPolicy"]["serviceAccount"]["email"] == (
        f"triplet-preproc@{PROJECT}.iam.gserviceaccount.com"
    )
    variables = config["taskGroups"][0]["taskSpec"]["environment"]["variables"]
    assert variables["TRIPLET_REPO_URL"] == ORIGIN
    rendered = repo / "build" / "batch" / "triplet-run-001-workers.json"
    assert json.loads(rendered.read_text()) == config
    assert ["config", "get-value", "project"] in calls

    # Watching from a laptop: everything from the bucket and the API, nothing created.
    fake_cloud.reset_log()
    status = run_script(repo / "gcp" / "provision.sh", ["status"], env=env).stdout
    assert "latest progress (pushed every 30 min): none yet" in status
    assert mutations(fake_cloud.calls()) == []

    # And a second run changes nothing.
    fake_cloud.reset_log()
    run_script(repo / "gcp" / "provision.sh", ["all"], env=env)
    run_script(repo / "gcp" / "batch_submit.sh", ["submit"], env=env)
    assert [verb_path(c) for c in mutations(fake_cloud.calls())] == []
