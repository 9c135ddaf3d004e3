"""Which archives a scale-out worker owns: a deterministic share of the manifest.

    python -m building_image_triplet_model.inputs.work_split --manifest M --task-index 0 --task-count 3

prints the manifest entries (URI and option lines) of task 0's archives, or their names.
"""

from __future__ import annotations

import argparse
import os
import sys

from building_image_triplet_model.inputs import manifest


def manifest_sources(path: str | os.PathLike[str]) -> list[str]:
    return manifest.archives(path)


def task_share(names: list[str], task_index: int, task_count: int) -> list[str]:
    """Round-robin over the sorted names: every task gets an equal count (+-1), neighbours spread out."""
    if task_count < 1 or not 0 <= task_index < task_count:
        raise ValueError(f"task index {task_index} is not in [0, {task_count})")
    return sorted(names)[task_index::task_count]


def task_from_env(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(index, count) from TASK_INDEX/TASK_COUNT, else Cloud Batch's BATCH_TASK_INDEX/BATCH_TASK_COUNT."""
    env = dict(os.environ) if env is None else env
    for prefix in ("", "BATCH_"):
        names = (f"{prefix}TASK_INDEX", f"{prefix}TASK_COUNT")
        if all(n in env for n in names):
            values = [env[n].strip() for n in names]
            if not all(v.isascii() and v.isdigit() and len(v) < 10 for v in values):
                shown = " ".join(f"{n}={env[n][:20]!r}" for n in names)
                raise ValueError(f"{shown}: task numbers must be integers")
            return int(values[0]), int(values[1])
    return None


def share_entries(entries: list[manifest.Entry], task: tuple[int, int]) -> list[manifest.Entry]:
    mine = set(task_share(sorted({a for e in entries if (a := e.archive)}), *task))
    return [e for e in entries if e.archive in mine]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.inputs.work_split",
        description="Print the manifest entries of one scale-out task's archives.",
    )
    ap.add_argument("--manifest", required=True, help="aria2c input file (URI lines with out= options)")
    ap.add_argument("--task-index", type=int, help="this task (default: TASK_INDEX or BATCH_TASK_INDEX)")
    ap.add_argument(
        "--task-count", type=int, help="number of tasks (default: TASK_COUNT or BATCH_TASK_COUNT)"
    )
    ap.add_argument("--names", action="store_true", help="print archive names instead of manifest entries")
    args = ap.parse_args(argv)
    if (args.task_index is None) != (args.task_count is None):
        ap.error("give --task-index and --task-count together (or neither, for TASK_INDEX/TASK_COUNT)")
    try:
        task = (args.task_index, args.task_count) if args.task_index is not None else task_from_env()
    except ValueError as exc:
        ap.error(str(exc))
    if task is None:
        ap.error("give --task-index and --task-count (or set TASK_INDEX/TASK_COUNT)")
    try:
        mine = share_entries(manifest.load(args.manifest), task)
    except (manifest.ManifestError, ValueError) as exc:
        print(f"work_split: {exc}", file=sys.stderr)
        return 2
    if args.names:
        sys.stdout.write("".join(f"{e.archive}\n" for e in mine))
    else:
        sys.stdout.write(manifest.render(mine) if mine else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
