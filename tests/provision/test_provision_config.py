"""gcp/provision.conf and its reader: defaults, strict checking, and values that are never executed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from provision_helpers import BATCH_SUBMIT, PROVISION, REPO, FakeCloud, checkout_copy, mutations, run_script

CONF = REPO / "gcp" / "provision.conf"


def read_conf(path: Path = CONF) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def test_defaults_are_the_original_plan_values() -> None:
    conf = read_conf()
    assert conf["REGION"] == "us-central1"
    assert conf["ZONE"].startswith("us-central1-")
    assert conf["RAW_BUCKET"] == "building-triplets-raw"
    assert conf["PROCESSED_BUCKET"] == "building-triplets-processed"
    assert conf["SERVICE_ACCOUNT"] == "triplet-preproc"
    assert (conf["RAW_DISK"], conf["RAW_DISK_GB"]) == ("raw-data-1tb", "1024")
    assert (conf["WORK_DISK"], conf["WORK_DISK_GB"]) == ("work-scratch-512gb", "512")
    assert (conf["MACHINE_TYPE"], conf["ACCELERATOR_TYPE"], conf["ACCELERATOR_COUNT"]) == (
        "g2-standard-16",
        "nvidia-l4",
        "1",
    )
    assert (conf["IMAGE_FAMILY"], conf["IMAGE_PROJECT"]) == ("debian-12", "debian-cloud")
    assert (conf["BOOT_DISK_GB"], conf["BOOT_DISK_TYPE"]) == ("50", "pd-balanced")
    assert conf["PROVISIONING_MODEL"] == "SPOT"
    assert conf["TERMINATION_ACTION"] in {"STOP", "DELETE"}
    # The one deliberate change from the plan: G2 machines cannot attach pd-standard disks.
    assert conf["DISK_TYPE"] == "pd-balanced"
    # Resolved at run time: gcloud's current project and this checkout's origin.
    assert conf["PROJECT_ID"] == ""
    assert conf["REPO_URL"] == ""
    assert conf["USE_BAKED_IMAGE"] == "true"


def key_types() -> dict[str, str]:
    config = (REPO / "gcp" / "provision.d" / "config.sh").read_text()
    return dict(re.findall(r"^\s*\[([A-Z_]+)\]=([a-z]+)$", config, flags=re.M))


def test_every_file_the_defaults_name_exists() -> None:
    conf = read_conf()
    paths = {k: conf[k] for k, kind in key_types().items() if kind in ("path", "optpath") and conf[k]}
    assert {"PREPROCESS_CONFIG", "SCRIPTS_DIR", "MANIFEST_SOURCE", "OPS_AGENT_CONFIG_FILE"} <= set(paths)
    missing = {k: v for k, v in paths.items() if not (REPO / v).exists()}
    assert not missing, f"gcp/provision.conf names files that do not exist: {missing}"
    assert conf["PREPROCESS_CONFIG"] == "configs/vm.yaml"
    for script in ("startup_preprocess.sh", "shutdown_preprocess.sh"):
        assert (REPO / conf["SCRIPTS_DIR"] / script).is_file(), script


def test_every_key_the_scripts_know_is_in_the_file_once() -> None:
    known = set(key_types())
    keys = [line.partition("=")[0] for line in CONF.read_text().splitlines() if re.match(r"^[A-Z]", line)]
    assert sorted(keys) == sorted(set(keys)), "a key appears twice"
    assert set(keys) == known


def dry(*args: str, script: Path = PROVISION, **env: str) -> tuple[int, str, str]:
    proc = run_script(script, ["--dry-run", *args], env=env, check=False)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "bad",
    [
        "RUN_ID=$(touch {pwned})",
        "RUN_ID=`touch {pwned}`",
        "REPO_REF=gcp;touch {pwned}",
        "REPO_URL=https://example.invalid/x.git,startup-script=touch {pwned}",
        "CHECKPOINT_URI=gs://bucket/$(touch {pwned})",
        "PROJECT_ID=a'b",
        "ZONE=us-central1-a && touch {pwned}",
        'MANIFEST_SOURCE="{pwned}"',
    ],
)
def test_values_with_shell_syntax_are_refused_and_never_run(tmp_path: Path, bad: str) -> None:
    pwned = tmp_path / "pwned"
    line = bad.format(pwned=pwned)
    conf = tmp_path / "provision.conf"
    conf.write_text(CONF.read_text() + line + "\n")
    code, out, err = dry("--config", str(conf), "all")
    assert code == 2, out
    assert "invalid value for" in err
    code, _, err = dry("--set", line, "all")
    assert code == 2
    assert "invalid value for" in err
    code, _, err = dry("--set", line, "submit", script=BATCH_SUBMIT)
    assert code == 2
    assert "invalid value for" in err
    assert not pwned.exists()


def test_unknown_and_missing_keys_are_errors(tmp_path: Path) -> None:
    conf = tmp_path / "provision.conf"
    conf.write_text(CONF.read_text() + "ZONEE=us-central1-b\n")
    code, _, err = dry("--config", str(conf), "all")
    assert code == 2
    assert "unknown configuration key 'ZONEE'" in err

    conf.write_text("\n".join(line for line in CONF.read_text().splitlines() if not line.startswith("ZONE=")))
    code, _, err = dry("--config", str(conf), "all")
    assert code == 2
    assert "missing: ZONE" in err

    conf.write_text("ZONE us-central1-b\n")
    code, _, err = dry("--config", str(conf), "all")
    assert code == 2
    assert "expected KEY=VALUE" in err


def test_the_file_is_read_not_sourced(tmp_path: Path) -> None:
    """A line that would do something if sourced is refused as a line, and has no effect."""
    pwned = tmp_path / "pwned"
    conf = tmp_path / "provision.conf"
    conf.write_text(CONF.read_text() + f"touch {pwned}\n")
    code, _, err = dry("--config", str(conf), "all")
    assert code == 2
    assert "expected KEY=VALUE" in err
    assert not pwned.exists()
    common = REPO / "gcp" / "provision_common.sh"
    parts = sorted((REPO / "gcp" / "provision.d").glob("*.sh"))
    assert parts
    part_names = {f"provision.d/{p.name}" for p in parts}
    # The scripts source their helpers and their parts, the helpers the one log format (gcp/scripts/lib.sh)
    # and the shared parts; the parts source nothing. Every source names one of these files, spelled out.
    allowed = {
        PROVISION: {"provision_common.sh"} | part_names,
        BATCH_SUBMIT: {"provision_common.sh"},
        common: {"scripts/lib.sh"} | part_names,
    }
    for script in (PROVISION, BATCH_SUBMIT, common, *parts):
        text = script.read_text()
        assert not re.search(r"^\s*eval\b|\beval\s", text, flags=re.M), script
        sources = re.findall(r"^\s*(?:source|\.)\s+(.+)$", text, flags=re.M)
        named = [re.fullmatch(r'"\$(?:SCRIPT_DIR|PROVISION_DIR)/([\w./]+)"', s) for s in sources]
        assert all(named), (script, sources)
        names = {m.group(1) for m in named if m}
        assert names <= allowed.get(script, set()), (script, sources)
        if script in allowed:
            assert ("scripts/lib.sh" if script == common else "provision_common.sh") in names, script


def test_pd_standard_cannot_be_used_with_g2(tmp_path: Path) -> None:
    code, _, err = dry("--set", "DISK_TYPE=pd-standard", "disks")
    assert code == 2
    assert "G2 machines do not support Standard persistent disks" in err
    code, _, _ = dry("--set", "DISK_TYPE=pd-standard", "--set", "MACHINE_TYPE=n2-standard-16", "disks")
    assert code == 0


def test_zone_must_be_in_region() -> None:
    code, _, err = dry("--set", "ZONE=europe-west4-a", "disks")
    assert code == 2
    assert "is not in REGION" in err


def test_real_runs_refuse_placeholders_and_unresolvable_defaults(
    tmp_path: Path, fake_cloud: FakeCloud
) -> None:
    """Every refusal happens before anything is created."""
    repo = checkout_copy(tmp_path / "repo", origin=None)
    script = repo / "gcp" / "provision.sh"

    def real(*args: str, **env: str) -> tuple[int, str]:
        proc = run_script(script, list(args), env=fake_cloud.env(**env), check=False)
        return proc.returncode, proc.stderr

    code, err = real("apis")  # PROJECT_ID empty, and gcloud has no current project
    assert code == 2
    assert "gcloud has no current project" in err
    code, err = real("apis", FAKE_GCLOUD_PROJECT="test-project")  # REPO_URL empty, and no origin remote
    assert code == 2
    assert "has no 'origin' remote" in err
    code, err = real("--set", "PROJECT_ID=your-project-id", "apis")
    assert code == 2
    assert "placeholder" in err
    code, err = real(
        "--set", "REPO_URL=https://github.com/your-org/x.git", "apis", FAKE_GCLOUD_PROJECT="p-123456"
    )
    assert code == 2
    assert "placeholder" in err
    assert mutations(fake_cloud.calls()) == []

    subprocess.run(["git", "-C", str(repo), "remote", "add", "origin", "/srv/git/triplets.git"], check=True)
    code, err = real("apis", FAKE_GCLOUD_PROJECT="test-project")
    assert code == 2
    assert "is not a URL the VM can clone" in err
    assert mutations(fake_cloud.calls()) == []
    # A dry run clones nothing: with the same origin it shows the placeholder and says why.
    proc = run_script(script, ["--dry-run", "template"])
    assert "is not a URL the VM can clone" in proc.stdout
    assert "triplet-repo-url=https://github.com/your-org/" in proc.stdout


def test_empty_project_and_repo_url_are_resolved(tmp_path: Path, fake_cloud: FakeCloud) -> None:
    origin = "https://example.invalid/org/building-image-triplet-model.git"
    repo = checkout_copy(tmp_path / "repo", origin=origin)
    proc = run_script(
        repo / "gcp" / "provision.sh", ["apis"], env=fake_cloud.env(FAKE_GCLOUD_PROJECT="my-project-7")
    )
    assert "using gcloud's current project my-project-7" in proc.stderr
    assert ["config", "get-value", "project"] in fake_cloud.calls()
    assert all("--project=my-project-7" in c for c in mutations(fake_cloud.calls()))
    # A dry run contacts nothing: it names what a real run would ask and shows placeholders.
    out = run_script(repo / "gcp" / "provision.sh", ["--dry-run", "template"]).stdout
    assert "# look: gcloud config get-value project" in out
    assert "--project=your-project-id" in out
    assert f"triplet-repo-url={origin}" in out
    # An explicit value wins and nothing is asked.
    fake_cloud.reset_log()
    run_script(
        repo / "gcp" / "provision.sh",
        ["--set", "PROJECT_ID=other-project", "--set", "REPO_URL=https://example.invalid/x.git", "apis"],
        env=fake_cloud.env(FAKE_GCLOUD_PROJECT="my-project-7"),
    )
    assert ["config", "get-value", "project"] not in fake_cloud.calls()
    assert all("--project=other-project" in c for c in mutations(fake_cloud.calls()))


def test_help_and_usage_errors() -> None:
    for script in (PROVISION, BATCH_SUBMIT):
        proc = run_script(script, ["--help"])
        assert "Subcommands" in proc.stdout
        assert "--dry-run" in proc.stdout
        assert run_script(script, [], check=False).returncode == 2
        assert run_script(script, ["--dry-run", "frobnicate"], check=False).returncode == 2
        assert run_script(script, ["--dry-run", "--bogus", "status"], check=False).returncode == 2


def test_dry_run_contacts_nothing(tmp_path: Path) -> None:
    """A dry run runs no gcloud at all: a gcloud on PATH that records calls sees none."""
    calls = tmp_path / "calls"
    fake = tmp_path / "gcloud"
    fake.write_text(f"#!/bin/sh\necho called >> {calls}\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    for args in (
        ["all"],
        ["status"],
        ["teardown", "--delete-disks", "--delete-buckets"],
        ["move-zone", "us-central1-b"],
    ):
        proc = run_script(PROVISION, ["--dry-run", *args], env=env, check=False)
        assert proc.returncode == 0, proc.stderr
    for sub in ("setup", "submit", "status", "merge", "delete"):
        proc = run_script(BATCH_SUBMIT, ["--dry-run", sub], env=env, check=False)
        assert proc.returncode == 0, proc.stderr
    assert not calls.exists()
