"""The branch the VM runs: an empty REPO_REF (the committed default) is the branch being provisioned, and
every step that hands it to a VM checks with `git ls-remote` that it exists at REPO_URL before anything is
created, dry runs included, and says which commit the VM will run.

Real git remotes: a bare repository on disk as `origin`, and a clone of this repository itself. The scripts
run from a copy of this checkout's working tree with the committed gcp/provision.conf (no --set).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from provision_helpers import (
    REPO,
    FakeCloud,
    bare_origin,
    checkout_copy,
    commit_all,
    current_branch,
    git,
    mutations,
    run_script,
)

BRANCH = "operator-day-1"


def copy_on_branch(tmp_path: Path, origin: str, branch: str = BRANCH) -> tuple[Path, str]:
    repo = checkout_copy(tmp_path / "repo", origin=origin)
    assert (repo / "gcp" / "provision.conf").read_text() == (REPO / "gcp" / "provision.conf").read_text()
    return repo, commit_all(repo, branch)


@pytest.mark.parametrize(
    "command", [["provision.sh", "all"], ["provision.sh", "template"], ["batch_submit.sh", "submit"]]
)
def test_a_dry_run_fails_when_the_branch_is_not_pushed_and_names_the_commit_once_it_is(
    tmp_path: Path, command: list[str]
) -> None:
    origin = bare_origin(tmp_path / "origin.git")
    repo, sha = copy_on_branch(tmp_path, origin)
    script = repo / "gcp" / command[0]

    proc = run_script(script, ["--dry-run", command[1]], check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"REPO_REF {BRANCH} does not exist at {origin}" in proc.stderr
    assert "# step:" not in proc.stdout  # refused before the first step

    git(repo, "push", "-q", "origin", BRANCH)
    proc = run_script(script, ["--dry-run", command[1]])
    assert f"REPO_REF is empty: using this checkout's branch, {BRANCH}" in proc.stdout
    assert f"the VM will run commit {sha} ({BRANCH} at {origin})" in proc.stdout
    if command[0] == "provision.sh":
        assert f"triplet-repo-ref={BRANCH}," in proc.stdout

    # A commit that is not pushed yet: the VM runs the remote's, and the operator is told.
    (repo / "NOTES").write_text("local only\n")
    commit_all(repo, BRANCH)
    proc = run_script(script, ["--dry-run", command[1]])
    assert f"the VM will run commit {sha}" in proc.stdout
    assert "push first to run your commits" in proc.stderr


def test_a_real_run_refuses_before_creating_anything(tmp_path: Path, fake_cloud: FakeCloud) -> None:
    origin = bare_origin(tmp_path / "origin.git")
    repo, _ = copy_on_branch(tmp_path, origin)
    env = fake_cloud.env(FAKE_GCLOUD_PROJECT="operator-project-1")
    proc = run_script(repo / "gcp" / "provision.sh", ["all"], env=env, check=False)
    assert proc.returncode == 2
    assert "does not exist at" in proc.stderr
    assert mutations(fake_cloud.calls()) == []
    # Steps that hand no ref to a VM do not need it.
    run_script(repo / "gcp" / "provision.sh", ["buckets"], env=env)


def test_a_tag_and_an_explicit_ref_are_checked_too(tmp_path: Path) -> None:
    origin = bare_origin(tmp_path / "origin.git")
    repo, sha = copy_on_branch(tmp_path, origin)
    git(repo, "tag", "-a", "v1", "-m", "release")
    git(repo, "push", "-q", "origin", "v1")
    script = repo / "gcp" / "provision.sh"
    proc = run_script(script, ["--dry-run", "--set", "REPO_REF=v1", "template"])
    assert f"the VM will run commit {sha} (v1 at {origin})" in proc.stdout
    proc = run_script(script, ["--dry-run", "--set", "REPO_REF=gcp", "template"], check=False)
    assert proc.returncode == 2
    assert f"REPO_REF gcp does not exist at {origin}" in proc.stderr


def test_against_a_clone_of_this_repository(tmp_path: Path) -> None:
    """This repository's own branch, in a bare clone of it standing in for the pushed remote."""
    branch = current_branch()
    if not branch:
        pytest.skip("this checkout is on a detached HEAD: no branch to provision")
    clone = tmp_path / "clone.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(REPO), str(clone)], check=True)
    head = git(REPO, "rev-parse", "HEAD")
    repo = checkout_copy(tmp_path / "repo", origin=f"file://{clone}")
    git(repo, "checkout", "-q", "-b", branch)
    proc = run_script(repo / "gcp" / "provision.sh", ["--dry-run", "template"])
    assert f"the VM will run commit {head} ({branch} at file://{clone})" in proc.stdout
    assert f"triplet-repo-ref={branch}," in proc.stdout


def test_a_detached_checkout_must_name_its_ref(tmp_path: Path) -> None:
    origin = bare_origin(tmp_path / "origin.git")
    repo, sha = copy_on_branch(tmp_path, origin)
    git(repo, "push", "-q", "origin", BRANCH)
    git(repo, "checkout", "-q", "--detach", sha)
    proc = run_script(repo / "gcp" / "provision.sh", ["--dry-run", "template"], check=False)
    assert proc.returncode == 2
    assert "is not on a branch" in proc.stderr
    proc = run_script(repo / "gcp" / "provision.sh", ["--dry-run", "--set", f"REPO_REF={BRANCH}", "template"])
    assert f"the VM will run commit {sha}" in proc.stdout
