"""`make demo` as a user runs it, in a copy of the repository: the dry run of the VM flow ends complete, its
output is short enough to read, and `preprocess_resume --config configs/demo.yaml` (the committed config, as
the README says) reports that very artifact complete."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import REPO

DEMO_CONFIG = "configs/demo.yaml"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed (make sys-deps)"),
]


def user_env() -> dict[str, str]:
    """The environment of a user's shell: this venv first on PATH, and no outer make's variables (under
    `make test` they would make the demo's make a sub-make, which prints 'Entering directory' lines)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return {**env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    copy = tmp_path_factory.mktemp("repo")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    env = user_env()
    # The environment is this one (-o setup: no second uv sync of several GB); RUN= runs the package's
    # commands with its python, as `uv run` would.
    r = subprocess.run(
        ["make", "-o", "setup", "-o", "sys-deps", "demo", "RUN=", f"DRY_RUN_PYTHON={sys.executable}"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return copy, r


def test_the_demo_completes_and_its_config_names_its_artifact(demo):
    copy, _ = demo
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "building_image_triplet_model.preprocess_resume",
            "--config",
            "configs/demo.yaml",
        ],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"output: {copy / 'build/dry-run/work/output/dataset.h5'}  [COMPLETE]" in r.stdout
    assert "next run: nothing: the artifact is complete" in r.stdout


def test_the_demo_output_is_short_enough_to_read(demo):
    _, r = demo
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) < 90, len(lines)
    pushes = [line for line in lines if "checkpoint[" in line and " pushed " in line]
    assert pushes and not [line for line in pushes if "pushed 0 files" in line], pushes  # one line each
    assert not any(line.startswith(("Downloading", "Installed", "Get:", "Setting up")) for line in lines)
    # The report reconciles without arithmetic: who found each reject is said.
    text = "\n".join(lines)
    assert "found by the index:" in text
    assert "found by the decoder: decode_error=3, not_jpeg=3, truncated_scan=3" in text


def test_a_second_demo_says_it_is_complete_in_a_few_lines_and_pushes_nothing(demo):
    copy, _ = demo
    bucket = copy / "build/dry-run/bucket"
    before = {p: p.stat().st_mtime_ns for p in bucket.rglob("*") if p.is_file()}
    r = subprocess.run(
        ["make", "-o", "setup", "-o", "sys-deps", "demo", "RUN=", f"DRY_RUN_PYTHON={sys.executable}"],
        cwd=copy,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) <= 8, lines
    assert " job[" in lines[-1] and ": dry-run is complete (" in lines[-1], lines  # the one line saying so
    assert lines[-1].endswith("): nothing to do"), lines
    text = "\n".join(lines)
    for word in ("pushed", "phase ", "extract_archives", "skipping", "Bytecode"):
        assert word not in text, (word, lines)
    assert {p: p.stat().st_mtime_ns for p in bucket.rglob("*") if p.is_file()} == before  # nothing pushed
