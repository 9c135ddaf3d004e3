"""Every command's --help prints help (exit 0), and --html says where it wrote the page."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from engine_helpers import REPO, make_archives, run_cli, tiny_config

from building_image_triplet_model.exit_codes import Exit


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_the_vm_command_prints_its_help(flag: str) -> None:
    # no settings exist on this machine: help must not need them
    res = run_cli("vm", flag, env={"TRIPLET_MOUNT_WORK": "/nonexistent/work"})
    assert res.returncode == 0, res.stderr
    assert "COMMAND" in res.stdout and "status" in res.stdout and "job" in res.stdout
    assert "ERROR" not in res.stderr and "settings.json" not in res.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_exit_codes_prints_its_help_and_every_code(flag: str) -> None:
    res = run_cli("exit_codes", flag)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m building_image_triplet_model.exit_codes CODE")
    for code in Exit:
        assert f"(exit {int(code)})" in res.stdout
    assert res.stderr == ""


def test_usage_errors_stay_errors() -> None:
    assert run_cli("exit_codes", "x").returncode == 2
    assert run_cli("vm").returncode == 2


def test_html_prints_the_path_it_wrote(tmp_path: Path) -> None:
    make_archives(tmp_path / "raw", archives=1, targets=3, bad=False)
    cfg = tiny_config(tmp_path, tmp_path / "raw")
    rel = os.path.relpath(tmp_path / "pages" / "run.html", Path(__file__).resolve().parents[1])
    res = run_cli("preprocess_resume", "--config", str(cfg), "--html", rel)
    assert res.returncode == Exit.WORK_REMAINS, res.stderr
    assert res.stdout.splitlines()[-1] == f"wrote {tmp_path / 'pages' / 'run.html'}"
    assert (tmp_path / "pages" / "run.html").is_file()


def test_uv_run_says_nothing_in_a_synced_environment() -> None:
    """`uv run` (the README's commands) must not byte-compile the environment again at every command."""
    uv = shutil.which("uv")
    assert uv, "uv is not installed: make setup"
    res = subprocess.run(
        [uv, "run", "--frozen", "python", "-c", "print('ok')"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "UV_NO_PROGRESS": "1"},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "ok\n" and res.stderr == "", res.stderr
