"""gcp/provision.sh against a stand-in gcloud on PATH: order of creation, look-before-create, idempotency.

The stand-in (fake_gcloud.py) keeps a model of the project and answers describe/list like the real CLI
(found: exit 0; missing: exit 1 with the real "not found" wording), so the script's own decisions are tested.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from provision_helpers import (
    PROVISION,
    FakeCloud,
    current_branch,
    file_sets,
    mutations,
    run_script,
    verb_path,
)

BASE = ["--set", "PROJECT_ID=test-project", "--set", "REPO_URL=https://example.invalid/triplets.git"]
SA = "serviceAccount:triplet-preproc@test-project.iam.gserviceaccount.com"
FAMILY = "triplet-preproc-debian-12"
BUILDER = f"us-central1-a/{FAMILY}-builder"
RAW_ROLES = [["roles/storage.objectViewer", SA], ["roles/storage.objectCreator", SA]]
PROCESSED_ROLES = [["roles/storage.objectUser", SA]]


def provision(
    fake: FakeCloud, files: dict[str, Path], *args: str, check: bool = True, **env: str
) -> tuple[int, str, str]:
    proc = run_script(PROVISION, [*BASE, *file_sets(files), *args], env=fake.env(**env), check=check)
    return proc.returncode, proc.stdout, proc.stderr


def first_index(verbs: Sequence[str], verb: str) -> int:
    assert verb in verbs, f"{verb!r} was never run; mutations: {verbs}"
    return verbs.index(verb)


def test_first_all_creates_everything_in_order(fake_cloud: FakeCloud, run_files: dict[str, Path]) -> None:
    provision(fake_cloud, run_files, "all")
    calls = fake_cloud.calls()
    verbs = [verb_path(c) for c in mutations(calls)]
    order = [
        "services enable",
        "compute project-info add-metadata",
        "storage buckets create",
        "storage buckets update",
        "iam service-accounts create",
        "storage buckets add-iam-policy-binding",
        "projects add-iam-policy-binding",
        "compute disks create",
        "storage cp",
        "compute instances create",  # the image builder
        "compute images create",
        "compute instances delete",
        "compute instance-templates create",
        "compute instance-groups managed create",
    ]
    positions = [first_index(verbs, v) for v in order]
    assert positions == sorted(positions), list(zip(order, positions, strict=True))

    # Look before create: every create was preceded by a describe of the same resource (an image: its family).
    for i, call in enumerate(calls):
        if verb_path(call).endswith(" create") and verb_path(call) != "iam service-accounts create":
            target = call[len(verb_path(call).split()) :][0]
            if verb_path(call) == "compute images create":
                target = next(a for a in call if a.startswith("--family=")).removeprefix("--family=")
            looked = [c for c in calls[:i] if verb_path(c).split()[-1].startswith("describe") and target in c]
            assert looked, f"created without looking first: {call}"

    state = fake_cloud.read_state()
    assert state["disks"] == {
        "us-central1-a/raw-data-1tb": {"size": "1024", "type": "pd-balanced", "source": ""},
        "us-central1-a/work-scratch-512gb": {"size": "512", "type": "pd-balanced", "source": ""},
    }
    raw, processed = (
        state["buckets"]["building-triplets-raw"],
        state["buckets"]["building-triplets-processed"],
    )
    assert raw["versioning"] is False
    assert processed["versioning"] is True
    assert raw["lifecycle"]["rule"]
    assert processed["lifecycle"]["rule"]
    # Least privilege: read and add on the raw mirror (never delete); read and overwrite on the processed one.
    assert raw["iam"] == RAW_ROLES
    assert processed["iam"] == PROCESSED_ROLES
    assert sorted(state["project_iam"]) == [
        ["roles/logging.logWriter", SA, ""],
        ["roles/monitoring.metricWriter", SA, ""],
    ]
    assert state["roles"] == {}, "no compute permission when ON_DONE=none"
    # Only what the metadata names: stage 0 clones the repository for everything else.
    assert sorted(state["objects"]) == [
        "gs://building-triplets-processed/manifests/raw_archives.txt",
        "gs://building-triplets-processed/startup/ops-agent-config.yaml",
        "gs://building-triplets-processed/startup/shutdown_preprocess.sh",
        "gs://building-triplets-processed/startup/startup_preprocess.sh",
    ]
    # The baked image: one image of the family, from a builder that ran the bake and is gone.
    (image,) = state["images"].values()
    assert image["family"] == FAMILY
    assert image["source_disk"] == BUILDER
    assert image["source_metadata"]["triplet-bake"] == "true"
    assert image["source_metadata"]["triplet-repo-url"] == "https://example.invalid/triplets.git"
    assert image["source_metadata"]["triplet-repo-ref"] == current_branch()
    assert image["source_metadata"]["startup-script-url"].endswith("/startup/startup_preprocess.sh")
    builder = next(c for c in calls if verb_path(c) == "compute instances create")
    assert "--provisioning-model=STANDARD" in builder
    assert "--machine-type=g2-standard-16" in builder
    assert "--accelerator=type=nvidia-l4,count=1" in builder
    assert "--image-family=debian-12" in builder
    assert "--image-project=debian-cloud" in builder
    assert BUILDER not in state["instances"]
    (template_name,) = state["templates"]
    template = state["templates"][template_name]
    assert template["provisioning-model"] == "SPOT"
    assert template["instance-termination-action"] == "STOP"
    assert "restart-on-failure" not in template
    assert "no-shielded-secure-boot" in template
    assert "shielded-vtpm" in template
    assert (template["image-family"], template["image-project"]) == (FAMILY, "test-project")
    metadata = dict(item.split("=", 1) for item in template["metadata"].split(","))
    assert metadata["startup-script-url"] == "gs://building-triplets-processed/startup/startup_preprocess.sh"
    assert metadata["enable-oslogin"] == "TRUE"
    assert metadata["triplet-run-id"] == "run-001"
    assert metadata["triplet-push-interval-min"] == "30"
    assert not any(k in metadata for k in ("triplet-checkpoint-interval-min", "triplet-scripts-uri"))
    mig = state["migs"]["us-central1-a/triplet-preproc-mig"]
    assert mig["template"] == template_name
    assert mig["stateful"].splitlines() == [
        "device-name=raw-data-1tb,auto-delete=never",
        "device-name=work-scratch-512gb,auto-delete=never",
    ]


def test_second_all_creates_nothing(fake_cloud: FakeCloud, run_files: dict[str, Path]) -> None:
    provision(fake_cloud, run_files, "all")
    before = fake_cloud.read_state()
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "all")
    assert mutations(fake_cloud.calls()) == []
    assert fake_cloud.read_state() == before


def test_single_vm_mode_is_idempotent_and_restarts_a_stopped_vm(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "--set", "DEPLOY_MODE=vm", "all")
    state = fake_cloud.read_state()
    assert state["migs"] == {}
    assert state["instances"]["us-central1-a/triplet-preproc-vm"]["status"] == "RUNNING"
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "--set", "DEPLOY_MODE=vm", "all")
    assert mutations(fake_cloud.calls()) == []

    state["instances"]["us-central1-a/triplet-preproc-vm"]["status"] = "TERMINATED"  # preempted, STOP action
    fake_cloud.write_state(state)
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "--set", "DEPLOY_MODE=vm", "vm")
    assert [verb_path(c) for c in mutations(fake_cloud.calls())] == ["compute instances start"]


def test_group_and_single_vm_never_compete_for_the_disks(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "all")
    code, _, err = provision(fake_cloud, run_files, "--set", "DEPLOY_MODE=vm", "vm", check=False)
    assert code == 2
    assert "uses the disks" in err


def test_self_stop_grants_a_conditional_custom_role_once(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "--set", "ON_DONE=stop", "all")
    state = fake_cloud.read_state()
    role = state["roles"]["tripletPreprocSelfStop"]
    assert set(role["permissions"]) == {
        "compute.instances.get",
        "compute.instances.stop",
        "compute.instances.delete",
        "compute.instanceGroupManagers.get",
        "compute.instanceGroupManagers.update",
        "compute.zoneOperations.get",
    }
    assert [
        "projects/test-project/roles/tripletPreprocSelfStop",
        SA,
        "triplet-self-stop-us-central1-a",
    ] in state["project_iam"]
    assert not any("compute.instanceAdmin" in r[0] or r[0] == "roles/editor" for r in state["project_iam"])
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "--set", "ON_DONE=stop", "all")
    assert mutations(fake_cloud.calls()) == []


def test_a_deleted_custom_role_is_undeleted_not_recreated(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    code, _, err = provision(fake_cloud, run_files, "service-account", check=False)
    assert code == 2
    assert "run 'provision.sh buckets' first" in err
    provision(fake_cloud, run_files, "buckets")
    provision(fake_cloud, run_files, "--set", "ON_DONE=delete", "service-account")
    state = fake_cloud.read_state()
    state["roles"]["tripletPreprocSelfStop"]["deleted"] = True
    fake_cloud.write_state(state)
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "--set", "ON_DONE=delete", "service-account")
    assert [verb_path(c) for c in mutations(fake_cloud.calls())] == ["iam roles undelete"]


def test_a_changed_setting_makes_a_new_template_and_repoints_the_group(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "all")
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "--set", "RUN_ID=run-002", "all")
    verbs = [verb_path(c) for c in mutations(fake_cloud.calls())]
    assert verbs == [
        "compute instance-templates create",
        "compute instance-groups managed set-instance-template",
    ]
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "--set", "RUN_ID=run-002", "mig", "--apply-now")
    assert [verb_path(c) for c in mutations(fake_cloud.calls())] == [
        "compute instance-groups managed update-instances"
    ]


def test_a_changed_preprocess_config_changes_the_template(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "template")
    run_files["config"].write_text("model:\n  name: resnet18\n")
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "template")
    assert [verb_path(c) for c in mutations(fake_cloud.calls())] == ["compute instance-templates create"]


def test_changed_lifecycle_rules_are_applied_again(
    fake_cloud: FakeCloud, run_files: dict[str, Path], tmp_path: Path
) -> None:
    provision(fake_cloud, run_files, "buckets")
    rules = json.loads(Path(PROVISION.parent / "lifecycle" / "raw-bucket.json").read_text())
    rules["rule"][2]["condition"]["age"] = 730
    changed = tmp_path / "raw.json"
    changed.write_text(json.dumps(rules))
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "--set", f"RAW_LIFECYCLE_FILE={changed}", "buckets")
    calls = mutations(fake_cloud.calls())
    assert [verb_path(c) for c in calls] == ["storage buckets update"]
    assert "gs://building-triplets-raw" in calls[0]
    assert fake_cloud.read_state()["buckets"]["building-triplets-raw"]["lifecycle"] == rules


def test_a_changed_script_is_uploaded_again_alone(fake_cloud: FakeCloud, run_files: dict[str, Path]) -> None:
    provision(fake_cloud, run_files, "apis", "--set", "DEPLOY_MODE=mig")
    provision(fake_cloud, run_files, "buckets")
    provision(fake_cloud, run_files, "upload-scripts")
    (run_files["scripts"] / "lib.sh").write_text("#!/bin/bash\n# changed, and not in the bucket\n")
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "upload-scripts")
    assert mutations(fake_cloud.calls()) == []
    (run_files["scripts"] / "startup_preprocess.sh").write_text("#!/bin/bash\n# changed\n")
    provision(fake_cloud, run_files, "upload-scripts")
    calls = mutations(fake_cloud.calls())
    assert len(calls) == 1
    assert calls[0][:2] == ["storage", "cp"]
    assert calls[0][-1].endswith("/startup/startup_preprocess.sh")


def test_a_failing_look_stops_before_creating_anything(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    code, _, err = provision(
        fake_cloud, run_files, "all", check=False, FAKE_GCLOUD_FAIL="compute disks describe"
    )
    assert code == 2
    assert "PERMISSION_DENIED" in err
    verbs = [verb_path(c) for c in mutations(fake_cloud.calls())]
    assert "compute disks create" not in verbs
    assert "compute instance-templates create" not in verbs


def test_teardown_keeps_disks_and_buckets_unless_asked(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "all")
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "teardown")
    verbs = [verb_path(c) for c in mutations(fake_cloud.calls())]
    assert verbs == ["compute instance-groups managed delete", "compute instance-templates delete"]
    state = fake_cloud.read_state()
    assert state["migs"] == {}
    assert state["instances"] == {}
    assert state["templates"] == {}
    assert len(state["disks"]) == 2
    assert len(state["buckets"]) == 2
    assert state["service_accounts"]
    assert len(state["images"]) == 1, "the baked image is kept (--delete-images deletes it)"

    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "teardown")
    assert mutations(fake_cloud.calls()) == []

    # The data survives a teardown: `all` brings the VM back on the same disks.
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "all")
    verbs = [verb_path(c) for c in mutations(fake_cloud.calls())]
    assert "compute disks create" not in verbs
    assert "storage buckets create" not in verbs
    assert verbs == ["compute instance-templates create", "compute instance-groups managed create"]


def test_teardown_with_every_flag_removes_everything(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "--set", "ON_DONE=stop", "all")
    state = fake_cloud.read_state()
    state["objects"]["gs://building-triplets-processed/checkpoints/run-001/state/download.json"] = {
        "md5": "x",
        "text": "{}",
    }
    fake_cloud.write_state(state)
    flags = [
        "--delete-checkpoints",
        "--delete-disks",
        "--delete-buckets",
        "--delete-images",
        "--delete-service-account",
    ]
    provision(fake_cloud, run_files, "--set", "ON_DONE=stop", "teardown", *flags)
    state = fake_cloud.read_state()
    assert state["disks"] == {}
    assert state["buckets"] == {}
    assert state["objects"] == {}
    assert state["images"] == {}
    assert state["service_accounts"] == []
    assert state["project_iam"] == []
    assert state["roles"]["tripletPreprocSelfStop"]["deleted"] is True
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "--set", "ON_DONE=stop", "teardown", *flags)
    assert mutations(fake_cloud.calls()) == []


def test_status_reports_vm_markers_and_preemptions(fake_cloud: FakeCloud, run_files: dict[str, Path]) -> None:
    provision(fake_cloud, run_files, "all")
    state = fake_cloud.read_state()
    base = "gs://building-triplets-processed/checkpoints/run-001/state"
    state["objects"][f"{base}/download.json"] = {"md5": "a", "text": '{"status": "done", "attempts": 1}\n'}
    state["objects"][f"{base}/extract.json"] = {"md5": "b", "text": '{"status": "running"}\n'}
    state["operations"] = [
        {"instance": "triplet-preproc-vm-abcd", "time": "2026-11-01T00:00:00Z"},
        {"instance": "triplet-preproc-vm-abcd", "time": "2026-11-02T00:00:00Z"},
    ]
    fake_cloud.write_state(state)
    fake_cloud.reset_log()
    _, out, _ = provision(fake_cloud, run_files, "status")
    assert "triplet-preproc-vm-abcd\tRUNNING" in out
    assert 'marker download: {"status": "done", "attempts": 1}' in out
    assert 'marker extract: {"status": "running"}' in out
    assert "preemptions recorded by Compute Engine (operations kept for a limited time): 2" in out
    assert mutations(fake_cloud.calls()) == []


def test_move_zone_snapshots_and_recreates_the_disks(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "all")
    code, _, err = provision(fake_cloud, run_files, "move-zone", "us-central1-b", check=False)
    assert code == 2, "refuses while the group uses the disks"
    assert "teardown" in err

    provision(fake_cloud, run_files, "teardown")
    provision(fake_cloud, run_files, "move-zone", "us-central1-b")
    state = fake_cloud.read_state()
    assert state["disks"]["us-central1-b/raw-data-1tb"]["source"] == "raw-data-1tb-to-us-central1-b"
    assert "us-central1-a/raw-data-1tb" in state["disks"]
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "move-zone", "us-central1-b")
    assert mutations(fake_cloud.calls()) == []

    provision(fake_cloud, run_files, "move-zone", "us-central1-b", "--delete-old")
    state = fake_cloud.read_state()
    assert sorted(state["disks"]) == ["us-central1-b/raw-data-1tb", "us-central1-b/work-scratch-512gb"]
    assert state["snapshots"] == []

    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "--set", "ZONE=us-central1-b", "all")
    verbs = [verb_path(c) for c in mutations(fake_cloud.calls())]
    assert "compute disks create" not in verbs
    assert verbs[-1] == "compute instance-groups managed create"


@pytest.mark.parametrize("sub", ["status", "teardown"])
def test_read_only_and_teardown_on_an_empty_project_create_nothing(
    fake_cloud: FakeCloud, run_files: dict[str, Path], sub: str
) -> None:
    provision(fake_cloud, run_files, "apis")
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, sub)
    assert mutations(fake_cloud.calls()) == []


def test_bindings_are_retried_while_a_new_service_account_propagates(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(
        fake_cloud,
        run_files,
        "all",
        FAKE_GCLOUD_FAIL="storage buckets add-iam-policy-binding",
        FAKE_GCLOUD_FAIL_TIMES="2",
        PROVISION_RETRY_SLEEP_S="0",
    )
    calls = [verb_path(c) for c in fake_cloud.calls()]
    assert calls.count("storage buckets add-iam-policy-binding") == 5  # 2 failures, then the 3 bindings
    assert fake_cloud.read_state()["buckets"]["building-triplets-raw"]["iam"] == RAW_ROLES


# --- the baked image ---------------------------------------------------------------------------------------


def test_the_image_is_baked_once_and_again_only_on_request(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "all")
    (first,) = fake_cloud.read_state()["images"]
    template = fake_cloud.read_state()["templates"]
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "image")
    assert mutations(fake_cloud.calls()) == []

    provision(fake_cloud, run_files, "image", "--rebuild")
    assert [verb_path(c) for c in mutations(fake_cloud.calls())] == [
        "compute instances create",
        "compute images create",
        "compute instances delete",
    ]
    state = fake_cloud.read_state()
    assert len(state["images"]) == 2
    assert first in state["images"]
    assert all(i["family"] == FAMILY for i in state["images"].values())
    assert BUILDER not in state["instances"]
    # The template names the family, not an image: a recreated VM boots the newest image, same template.
    assert state["templates"] == template


def test_without_the_baked_image_the_vm_boots_debian(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "--set", "USE_BAKED_IMAGE=false", "all")
    calls = fake_cloud.calls()
    assert not any(verb_path(c).startswith("compute images") for c in calls)
    assert not any(verb_path(c) == "compute instances create" for c in calls)
    state = fake_cloud.read_state()
    assert state["images"] == {}
    (template,) = state["templates"].values()
    assert (template["image-family"], template["image-project"]) == ("debian-12", "debian-cloud")


def test_the_group_needs_the_image_first(fake_cloud: FakeCloud, run_files: dict[str, Path]) -> None:
    """The stand-in refuses a VM whose baked family has no image, like Compute Engine: `all` bakes first."""
    for sub in ("apis", "buckets", "service-account", "disks", "upload-scripts", "template"):
        provision(fake_cloud, run_files, sub)
    code, _, err = provision(fake_cloud, run_files, "mig", check=False)
    assert code != 0
    assert f"images/family/{FAMILY}' was not found" in err
    provision(fake_cloud, run_files, "image")
    provision(fake_cloud, run_files, "mig")
    assert fake_cloud.read_state()["migs"]


def test_an_interrupted_bake_continues_with_its_builder(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    for sub in ("apis", "buckets", "service-account", "upload-scripts"):
        provision(fake_cloud, run_files, sub)
    # A run stopped (Ctrl-C) while it waited: the builder then powered itself off.
    state = fake_cloud.read_state()
    state["instances"][BUILDER] = {
        "zone": "us-central1-a",
        "status": "TERMINATED",
        "boot_disk": BUILDER.split("/")[1],
        "metadata": {"triplet-bake": "true"},
        "bake_polls": 0,
    }
    fake_cloud.write_state(state)
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "image")
    assert [verb_path(c) for c in mutations(fake_cloud.calls())] == [
        "compute images create",
        "compute instances delete",
    ]
    # A builder left after its image was made (the delete did not happen) is removed by the next run.
    state = fake_cloud.read_state()
    state["instances"][BUILDER] = {"zone": "us-central1-a", "status": "TERMINATED", "boot_disk": "x"}
    fake_cloud.write_state(state)
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "image")
    assert [verb_path(c) for c in mutations(fake_cloud.calls())] == ["compute instances delete"]
    assert len(fake_cloud.read_state()["images"]) == 1


def test_teardown_removes_a_leftover_builder_and_images_only_when_asked(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "all")
    state = fake_cloud.read_state()
    state["instances"][BUILDER] = {"zone": "us-central1-a", "status": "RUNNING", "boot_disk": "x"}
    fake_cloud.write_state(state)
    provision(fake_cloud, run_files, "teardown")
    state = fake_cloud.read_state()
    assert state["instances"] == {}
    assert len(state["images"]) == 1
    provision(fake_cloud, run_files, "teardown", "--delete-images")
    assert fake_cloud.read_state()["images"] == {}


# --- least privilege ---------------------------------------------------------------------------------------

OTHER = "user:someone@example.com"


def test_an_old_object_admin_binding_is_replaced_and_others_are_kept(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    """An earlier version granted objectAdmin on both buckets: the account's is removed, nobody else's."""
    provision(fake_cloud, run_files, "apis")
    provision(fake_cloud, run_files, "buckets")
    state = fake_cloud.read_state()
    for bucket in state["buckets"].values():
        bucket["iam"] = [["roles/storage.objectAdmin", SA], ["roles/storage.objectAdmin", OTHER]]
    fake_cloud.write_state(state)
    provision(fake_cloud, run_files, "service-account")
    buckets = fake_cloud.read_state()["buckets"]
    assert sorted(buckets["building-triplets-raw"]["iam"]) == sorted(
        [["roles/storage.objectAdmin", OTHER], *RAW_ROLES]
    )
    assert sorted(buckets["building-triplets-processed"]["iam"]) == sorted(
        [["roles/storage.objectAdmin", OTHER], *PROCESSED_ROLES]
    )
    for bucket in buckets.values():
        assert ["roles/storage.objectAdmin", SA] not in bucket["iam"]
    fake_cloud.reset_log()
    provision(fake_cloud, run_files, "service-account")
    assert mutations(fake_cloud.calls()) == []


def test_teardown_removes_exactly_what_was_granted(fake_cloud: FakeCloud, run_files: dict[str, Path]) -> None:
    provision(fake_cloud, run_files, "--set", "ON_DONE=stop", "all")
    state = fake_cloud.read_state()
    for bucket in state["buckets"].values():
        bucket["iam"].append(["roles/storage.objectViewer", OTHER])
    state["project_iam"].append(["roles/logging.logWriter", OTHER, ""])
    state["project_iam"].append(["roles/batch.agentReporter", SA, ""])  # batch_submit.sh setup
    fake_cloud.write_state(state)
    provision(fake_cloud, run_files, "--set", "ON_DONE=stop", "teardown", "--delete-service-account")
    state = fake_cloud.read_state()
    for bucket in state["buckets"].values():
        assert bucket["iam"] == [["roles/storage.objectViewer", OTHER]]
    assert state["project_iam"] == [["roles/logging.logWriter", OTHER, ""]]
    assert state["service_accounts"] == []
    assert state["roles"]["tripletPreprocSelfStop"]["deleted"] is True
