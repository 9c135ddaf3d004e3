"""The exit codes of the engine's commands: the one table, with what each means and what to do.

The processor, the scale-out worker and merge, the status report and the VM bootstrap all take their codes
and messages from here; bash asks for a message with

    python -m building_image_triplet_model.exit_codes CODE     # prints "input error: ..." for CODE 3

Standard library only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    ERROR = 1
    CONFIG = 2
    INPUT = 3
    REFUSED = 4
    LOCKED = 5
    MODEL = 6
    WORK_REMAINS = 10  # preprocess_resume only
    INTERRUPTED = 75  # EX_TEMPFAIL: progress is durable, run again


# What a shell reports for a child ended by SIGTERM (128 + 15): a bootstrap script the job stopped.
TERM_EXIT = 143
# The codes of a stop that loses nothing: run again to continue.
INTERRUPTED_CODES = frozenset({Exit.INTERRUPTED, TERM_EXIT})


@dataclass(frozen=True)
class Meaning:
    short: str  # a few words, for tables and log lines
    action: str  # what a person does about it


MEANINGS: dict[Exit, Meaning] = {
    Exit.OK: Meaning("complete", "nothing"),
    Exit.ERROR: Meaning("unexpected error", "see the log; a rerun continues from the last checkpoint"),
    Exit.CONFIG: Meaning("configuration or usage error", "fix the named key or path; nothing was started"),
    Exit.INPUT: Meaning(
        "input error",
        "the named archive is missing, unfinished, truncated, changed or unreadable: fix or re-download it",
    ),
    Exit.REFUSED: Meaning(
        "refused", "this worker's settings or archives differ from its scale-out run's: use the run's config"
    ),
    Exit.LOCKED: Meaning("another processor is running on this output", "wait for it, or stop it"),
    Exit.MODEL: Meaning(
        "the model, its weights or the device is not usable",
        "fix the named model name, weights file, hub access or GPU driver; never replaced by random weights",
    ),
    Exit.WORK_REMAINS: Meaning("work remains", "run the processor (again)"),
    Exit.INTERRUPTED: Meaning("interrupted", "progress is saved: run the same command again to continue"),
}

# The status report exits with OK or WORK_REMAINS (or CONFIG); the processor never exits WORK_REMAINS.
PROCESSOR_CODES = tuple(c for c in Exit if c is not Exit.WORK_REMAINS)
STATUS_CODES = (Exit.OK, Exit.WORK_REMAINS, Exit.CONFIG)


def describe(code: int) -> str:
    """'input error: the named archive ...' for a known code; a neutral line for any other."""
    try:
        meaning = MEANINGS[Exit(code)]
    except ValueError:
        return f"exit {code}: unexpected (killed by signal {code - 128}?)" if code > 128 else f"exit {code}"
    if code == Exit.OK:
        return "complete (exit 0)"
    return f"{meaning.short} (exit {code}): {meaning.action}"


def help_table(codes: tuple[Exit, ...]) -> str:
    """The 'exit codes:' block of a command's --help."""
    return "exit codes:\n" + "\n".join(f"  {int(c):<4}{MEANINGS[c].short}" for c in codes)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m building_image_triplet_model.exit_codes CODE"
    if args in (["-h"], ["--help"]):
        print(f"{usage}\n\nPrints what an exit code of the engine's commands means and what to do.\n")
        print("\n".join(describe(int(code)) for code in Exit))
        return 0
    if len(args) != 1 or not args[0].lstrip("-").isdigit():
        print(usage, file=sys.stderr)
        return 2
    print(describe(int(args[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
