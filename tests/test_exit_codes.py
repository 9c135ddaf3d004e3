"""exit_codes.py: one table of codes with a meaning each; the commands' --help list exactly their own."""

from __future__ import annotations

import re

import pytest
from engine_helpers import run_cli

from building_image_triplet_model import errors, exit_codes
from building_image_triplet_model.exit_codes import MEANINGS, Exit


def test_every_exit_code_has_a_meaning_and_an_action() -> None:
    assert set(MEANINGS) == set(Exit)
    for code in Exit:
        assert MEANINGS[code].short.strip() and MEANINGS[code].action.strip(), code
    assert len({m.short for m in MEANINGS.values()}) == len(Exit)  # each says something of its own
    assert [int(c) for c in Exit] == [0, 1, 2, 3, 4, 5, 6, 10, 75]  # stored in scripts: never renumber


def test_each_run_error_maps_to_its_code() -> None:
    assert errors.RunError.code == Exit.ERROR
    assert errors.ConfigError.code == Exit.CONFIG
    assert errors.InputError.code == Exit.INPUT
    assert errors.ResumeRefused.code == Exit.REFUSED
    assert errors.LockedError.code == Exit.LOCKED
    assert errors.BackboneError.code == Exit.MODEL
    assert errors.Interrupted.code == Exit.INTERRUPTED


def test_describe() -> None:
    assert exit_codes.describe(0) == "complete (exit 0)"
    assert exit_codes.describe(3) == f"input error (exit 3): {MEANINGS[Exit.INPUT].action}"
    assert exit_codes.describe(75).startswith("interrupted (exit 75): progress is saved")
    assert exit_codes.describe(137) == "exit 137: unexpected (killed by signal 9?)"
    assert exit_codes.describe(42) == "exit 42"


def test_the_command_prints_the_input_error_line() -> None:
    proc = run_cli("exit_codes", "3", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == exit_codes.describe(3) + "\n"
    assert proc.stdout.startswith("input error (exit 3): the named archive is missing")
    bad = run_cli("exit_codes", "three", timeout=60)
    assert bad.returncode == 2 and "usage:" in bad.stderr and bad.stdout == ""


def help_codes(module: str) -> list[tuple[int, str]]:
    proc = run_cli(module, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split("exit codes:\n", 1)[1]
    return [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^  (\d+)\s+(.+)$", block, re.M)]


@pytest.mark.parametrize(
    ("module", "codes"),
    [
        ("dataset_processor", exit_codes.PROCESSOR_CODES),
        ("preprocess_resume", exit_codes.STATUS_CODES),
    ],
)
def test_help_lists_exactly_the_commands_codes(module: str, codes: tuple[Exit, ...]) -> None:
    listed = help_codes(module)
    assert listed == [(int(c), MEANINGS[c].short) for c in codes]


def test_which_command_exits_with_which_codes() -> None:
    assert set(exit_codes.PROCESSOR_CODES) == set(Exit) - {Exit.WORK_REMAINS}
    assert exit_codes.STATUS_CODES == (Exit.OK, Exit.WORK_REMAINS, Exit.CONFIG)
