"""Every command in docs/preprocessing_gcp.md (and docs/costs.md) is one the tests exercise.

- gcloud lines of the guide's code blocks are expanded by bash with the guide's own shell variables and run
  through the real gcloud parser (no account: they must stop at "no active account");
- `gcloud ...` mentioned inline without flags must name an existing command (`--help` exits 0);
- gcp/provision.sh and gcp/batch_submit.sh lines are run with --dry-run and must succeed;
- `python -m building_image_triplet_model.costs ...` lines of docs/costs.md must succeed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from provision_helpers import BASH, BATCH_SUBMIT, PROVISION, REPO, rejected, run_parser, run_script

GUIDE = REPO / "docs" / "preprocessing_gcp.md"
COSTS_DOC = REPO / "docs" / "costs.md"


def code_lines(doc: Path) -> list[str]:
    """Logical lines of the fenced bash/sh/plain code blocks (continuations joined, indentation removed)."""
    text = doc.read_text()
    lines: list[str] = []
    for m in re.finditer(r"^([ \t]*)```(\w*)\n(.*?)^[ \t]*```", text, flags=re.S | re.M):
        if m.group(2) not in ("", "bash", "sh", "console"):
            continue
        block = textwrap.dedent(m.group(3)).replace("\\\n", " ")
        lines += [line.strip() for line in block.splitlines() if line.strip()]
    return lines


def guide_variables() -> dict[str, str]:
    variables = {}
    for line in code_lines(GUIDE):
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(\S+)", line)
        if m:
            variables[m.group(1)] = m.group(2)
    return variables


def expand(line: str, variables: dict[str, str]) -> list[str]:
    """The words bash makes of the line (with the guide's variables set), without running the command."""
    assert "$(" not in line, line
    assert "`" not in line, line
    assert not re.search(r"[;&|]\s*\w", line.replace("||", "").split("'", 1)[0]), (
        f"one command per line: {line}"
    )
    assignments = "".join(f"{k}={v}\n" for k, v in variables.items())
    words = line.split(None, 1)[1] if " " in line else ""
    script = f"set -f\n{assignments}printf '%s\\0' {words}\n"
    out = subprocess.run([BASH, "-c", script], capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def test_the_guide_defines_its_variables() -> None:
    variables = guide_variables()
    for name in ("PROJECT", "ZONE", "MIG", "VM", "RUN", "CKPT", "JOB"):
        assert name in variables, name


def test_every_gcloud_command_of_the_guide_passes_the_real_parser(gcloud_lib: Path, tmp_path: Path) -> None:
    variables = guide_variables()
    commands = [expand(line, variables) for line in code_lines(GUIDE) if line.startswith("gcloud ")]
    assert len(commands) >= 30
    inline = set()
    for span in re.findall(r"`(gcloud [^`]+)`", GUIDE.read_text()):
        words = span.split()[1:]
        if any(w.startswith("-") for w in words):
            commands.append(expand(" ".join(span.split()), variables))
        else:
            inline.add(tuple(words))
    help_checks = [[*words, "--help"] for words in sorted(inline)]
    results = run_parser(gcloud_lib, commands + help_checks, tmp_path)
    bad = rejected(results[: len(commands)])
    bad += [
        f"gcloud {' '.join(r['argv'])} -> {r['code']}" for r in results[len(commands) :] if r["code"] != 0
    ]  # type: ignore[arg-type]
    assert not bad, "commands in docs/preprocessing_gcp.md that gcloud rejects:\n" + "\n".join(bad)


def script_lines() -> list[str]:
    return [
        line for line in code_lines(GUIDE) if line.startswith(("gcp/provision.sh", "gcp/batch_submit.sh"))
    ]


@pytest.mark.parametrize("line", script_lines())
def test_every_script_command_of_the_guide_runs_as_a_dry_run(line: str, tmp_path: Path) -> None:
    words = expand(line, guide_variables())
    script = PROVISION if line.startswith("gcp/provision.sh") else BATCH_SUBMIT
    args = [w for w in words if w != "--dry-run"]
    config = tmp_path / "preprocess.yaml"
    config.write_text("model: {}\n")
    proc = run_script(script, ["--dry-run", "--set", f"PREPROCESS_CONFIG={config}", *args], check=False)
    assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
    assert "gcloud " in proc.stdout


def test_the_guide_covers_the_required_topics() -> None:
    text = GUIDE.read_text()
    for needle in (
        "journalctl -u google-startup-scripts.service",
        "get-serial-port-output",
        "simulate-maintenance-event",
        "preprocess_resume",
        "gcp/provision.sh status",
        "jsonPayload.event",
        "jsonPayload.phase",
        "move-zone",
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "50001",
        "docs/bootstrap.md",
        "Ops Agent",
        "## 6. Retention",
        "## 8. Teardown",
        # The defaults that work as they are, the baked image and why, the roles, the one driver path.
        "gcloud config get-value project",
        "git config remote.origin.url",
        "configs/vm.yaml",
        "### The baked image",
        "**recreates**",
        "triplet-bake=true",
        "USE_BAKED_IMAGE=false",
        "gcp/provision.sh image --rebuild",
        "`roles/storage.objectViewer` + `roles/storage.objectCreator`",
        "`roles/storage.objectUser`",
        "`installGpuDrivers` is `false`",
        "TRIPLET_PUSH_INTERVAL_MIN",
        "--delete-images",
    ):
        assert needle in text, needle
    for gone in (
        "BATCH_INSTALL_GPU_DRIVERS",
        "BATCH_BOOT_IMAGE",
        "TRIPLET_SCRIPTS_URI",
        "triplet-scripts-uri",
    ):
        assert gone not in text, gone
    assert "CHECKPOINT_INTERVAL_MIN" not in text.replace("TRIPLET_CHECKPOINT_INTERVAL_MIN", "")


def test_cost_commands_of_docs_costs_run() -> None:
    lines = [
        line
        for line in code_lines(COSTS_DOC)
        if line.startswith("python -m building_image_triplet_model.costs")
    ]
    assert lines
    for line in lines:
        args = line.split("#", 1)[0].split()[3:]
        proc = subprocess.run(
            [sys.executable, "-m", "building_image_triplet_model.costs", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        assert proc.returncode == 0, (line, proc.stderr)
