"""Every gcloud command the scripts can generate goes through the REAL gcloud CLI parser.

The command lines come from the scripts' own --dry-run output (so the test cannot drift from the scripts), for
every subcommand and option: MIG and single VM, Spot and on-demand, self-stop on and off, every teardown flag,
zone moves, and the Cloud Batch submit script. With an empty configuration folder and no account, a command
whose flags gcloud accepts stops at "You do not currently have an active account selected" (exit 1); a flag it
rejects exits 2 (or 1 with another message) and fails the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from provision_helpers import (
    BATCH_SUBMIT,
    PROVISION,
    REPO,
    file_sets,
    gcloud_lines,
    make_run_files,
    rejected,
    run_parser,
    run_script,
    verb_path,
)

SPOT_VM_SELF_STOP = ["--set", "DEPLOY_MODE=vm", "--set", "ON_DONE=stop"]
ON_DEMAND = [
    "--set",
    "PROVISIONING_MODEL=STANDARD",
    "--set",
    "ON_DONE=delete",
    "--set",
    "SUBNET=preproc-subnet",
    "--set",
    "INSTALL_OPS_AGENT=false",
    "--set",
    "PROCESSED_VERSIONING=false",
    "--set",
    "MANIFEST_SOURCE=",
]
SPOT_DELETE = ["--set", "TERMINATION_ACTION=DELETE", "--set", "ON_DONE=stop"]

# (options, subcommand args, PROVISION_DRY_RUN_LOOK): 'missing' = first run in an empty project; 'exists:X' =
# every look finds something (reruns, updates, teardown of a complete setup).
PROVISION_MATRIX: list[tuple[list[str], list[str], str]] = [
    ([], ["all"], "missing"),
    (SPOT_VM_SELF_STOP, ["all"], "missing"),
    (ON_DEMAND, ["all"], "missing"),
    (SPOT_DELETE, ["all"], "missing"),
    (SPOT_DELETE, ["all", "--apply-now"], "exists:True"),
    (SPOT_VM_SELF_STOP, ["all"], "exists:TERMINATED"),
    (["--set", "USE_BAKED_IMAGE=false"], ["all"], "missing"),
    ([], ["apis"], "missing"),
    ([], ["buckets"], "missing"),
    (SPOT_VM_SELF_STOP, ["service-account"], "missing"),
    ([], ["disks"], "missing"),
    ([], ["upload-scripts"], "missing"),
    ([], ["image"], "missing"),  # first bake: builder, wait, image, builder deleted
    ([], ["image", "--rebuild"], "exists:TERMINATED"),  # a new image from an existing, powered-off builder
    ([], ["image"], "exists:TERMINATED"),  # the family has an image: a leftover builder is deleted
    ([*SPOT_VM_SELF_STOP, "--set", "SUBNET=preproc-subnet"], ["image"], "missing"),
    ([], ["template"], "missing"),
    ([], ["mig"], "missing"),
    ([], ["mig", "--apply-now"], "exists:other-template"),
    (SPOT_VM_SELF_STOP, ["vm"], "missing"),
    ([], ["status"], "missing"),
    ([], ["status"], "exists:gs://building-triplets-processed/checkpoints/run-001/state/download.json"),
    (SPOT_VM_SELF_STOP, ["status"], "exists:RUNNING"),
    ([], ["teardown"], "missing"),
    ([], ["teardown"], "exists:triplet-preproc-tpl-0123456789ab"),
    (
        SPOT_VM_SELF_STOP,
        [
            "teardown",
            "--delete-checkpoints",
            "--delete-disks",
            "--delete-buckets",
            "--delete-images",
            "--delete-service-account",
        ],
        "exists:",
    ),
    ([], ["teardown", "--delete-images"], "exists:"),
    (SPOT_VM_SELF_STOP, ["teardown", "--delete-service-account"], "exists:"),
    ([], ["setup"], "missing"),
    ([], ["mirror"], "missing"),
    ([], ["weights"], "missing"),
    ([], ["smoke-benchmark"], "missing"),
    (SPOT_VM_SELF_STOP, ["smoke-benchmark"], "exists:RUNNING"),
    ([], ["fetch"], "exists:building-triplets-processed"),
    ([], ["fetch", "/tmp/results"], "missing"),
    ([], ["move-zone", "us-central1-b"], "missing"),
    ([], ["move-zone", "us-central1-c", "--delete-old"], "missing"),
]

BATCH_MATRIX: list[tuple[list[str], list[str], str]] = [
    ([], ["setup"], "missing"),
    ([], ["submit"], "missing"),
    (
        ["--set", "BATCH_ALLOWED_LOCATIONS=zones/us-central1-a,zones/us-central1-b"],
        ["submit", "--job-name", "triplet-retry-2"],
        "missing",
    ),
    ([], ["status"], "exists:RUNNING"),
    (["--set", "USE_BAKED_IMAGE=false"], ["submit"], "missing"),
    ([], ["merge", "--wait"], "missing"),
    ([], ["merge"], "exists:SUCCEEDED"),
    ([], ["delete"], "exists:"),
]


def dry_run_corpus(files: dict[str, Path]) -> dict[str, list[str]]:
    """{gcloud command line: the invocation that printed it}, from every dry run of the matrices."""
    corpus: dict[str, list[str]] = {}
    for script, matrix in ((PROVISION, PROVISION_MATRIX), (BATCH_SUBMIT, BATCH_MATRIX)):
        for options, sub, look in matrix:
            args = ["--dry-run", *file_sets(files), *options, *sub]
            out = run_script(script, args, env={"PROVISION_DRY_RUN_LOOK": look}).stdout
            commands = gcloud_lines(out)
            assert commands, f"{script.name} {sub} printed no gcloud command"
            for argv in commands:
                corpus.setdefault("\x00".join(argv), [script.name, *sub])
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    return dry_run_corpus(make_run_files(tmp_path_factory.mktemp("files")))


def test_every_generated_command_passes_the_real_parser(
    gcloud_lib: Path, corpus: dict[str, list[str]], tmp_path: Path
) -> None:
    commands = [key.split("\x00") for key in corpus]
    results = run_parser(gcloud_lib, commands, tmp_path)
    assert len(results) == len(commands)
    bad = rejected(results)
    assert not bad, "gcloud rejected these generated commands:\n" + "\n".join(bad)


def gc_run_verbs(script: Path) -> set[str]:
    """The command paths of every `gc_run` call in a script's source (e.g. 'compute disks create')."""
    verbs = set()
    for line in script.read_text().splitlines():
        m = re.search(r"\bgc_run\s+([a-z].*)", line)
        if not m:
            continue
        words = []
        for w in m.group(1).split():
            if w.startswith(('"', "$", "-", "\\")) or "." in w:
                break
            words.append(w)
        verbs.add(" ".join(words))
    return verbs


def test_the_dry_run_matrix_reaches_every_command_the_scripts_contain(corpus: dict[str, list[str]]) -> None:
    printed = {verb_path(key.split("\x00")) for key in corpus}
    for script in (PROVISION, BATCH_SUBMIT):
        missing = {v for v in gc_run_verbs(script) if v and v not in printed}
        assert not missing, f"{script.name}: no dry run of the matrix prints {sorted(missing)}"
    # The common helpers run these for both scripts.
    assert "storage cp" in printed
    assert "storage hash" in printed


PLAN_FLAGS_REJECTED = [
    ["compute", "instance-templates", "create", "t", "--shielded-secure-boot=false"],
    ["compute", "instance-templates", "create", "t", "--local-ssd=interface=none"],
    [
        "compute",
        "instance-groups",
        "managed",
        "create",
        "m",
        "--zone=us-central1-a",
        "--template=t",
        "--size=1",
        "--max-surge=0",
        "--max-unavailable=1",
    ],
]


# Near misses of the commands the image step and the empty-PROJECT_ID lookup added: each must be caught too.
NEW_COMMANDS_MISSPELT = [
    ["config", "get-value", "projects"],
    ["compute", "images", "describe-from-family", "f", "--project=p", "--families=f"],
    [
        "compute",
        "images",
        "create",
        "i",
        "--project=p",
        "--source-disk=b",
        "--source-disk-zones=us-central1-a",
    ],
    ["compute", "images", "list", "--project=p", "--no-standard-image"],
    [
        "compute",
        "instances",
        "create",
        "b",
        "--project=p",
        "--zone=us-central1-a",
        "--provisioning-model=STANDARDS",
    ],
    [
        "compute",
        "instances",
        "create",
        "b",
        "--project=p",
        "--zone=us-central1-a",
        "--shielded-secure-boot=false",
    ],
]


def test_the_harness_rejects_what_the_real_cli_rejects(gcloud_lib: Path, tmp_path: Path) -> None:
    """The original plan's flags that gcloud refuses (shared/gcp-facts.md), and near misses of the newer
    commands: the check must catch each."""
    commands = PLAN_FLAGS_REJECTED + NEW_COMMANDS_MISSPELT
    results = run_parser(gcloud_lib, commands, tmp_path)
    assert len(rejected(results)) == len(commands), [r for r in results if not rejected([r])]


def test_the_image_commands_are_in_the_corpus(corpus: dict[str, list[str]]) -> None:
    printed = {verb_path(key.split("\x00")) for key in corpus}
    for verb in (
        "config get-value",
        "compute images describe-from-family",
        "compute images create",
        "compute images list",
        "compute images delete",
        "compute instances create",
    ):
        assert verb in printed, verb
    builder = next(
        key.split("\x00")
        for key in corpus
        if key.startswith("compute\x00instances\x00create\x00") and "triplet-bake=true" in key
    )
    assert "--provisioning-model=STANDARD" in builder


def test_no_generated_command_uses_the_flags_the_plan_got_wrong(corpus: dict[str, list[str]]) -> None:
    text = "\n".join(key.replace("\x00", " ") for key in corpus)
    assert "--shielded-secure-boot=false" not in text
    assert "--local-ssd" not in text
    assert "--max-surge" not in text
    assert "--max-unavailable" not in text
    for line in text.splitlines():
        if "instance-groups managed create" in line:
            assert "--zones" not in line
            assert "--zone=" in line
        if "instance-templates create" in line and "--provisioning-model=SPOT" in line:
            assert "--restart-on-failure" not in line
            assert "--instance-termination-action=" in line
    assert REPO.joinpath("gcp", "provision.conf").is_file()
