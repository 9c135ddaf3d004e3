"""Which archives a scale-out worker owns: a deterministic share of the manifest.

    python -m building_image_triplet_model.work_split --manifest M --task-index 0 --task-count 3

prints the manifest entries (URL and option lines) of task 0's archives, for download_archives.sh.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ARCHIVE = re.compile(r"(?:^|/)(\d+)\.tar$")


def parse_manifest(text: str) -> list[tuple[str, list[str]]]:
    """aria2c input-file entries: (URL line, its option lines)."""
    entries: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not entries:
                raise ValueError(f"option line before any URL: {line.strip()!r}")
            entries[-1][1].append(line)
        else:
            entries.append((line.strip(), []))
    return entries


def entry_archive(url: str, options: list[str]) -> str | None:
    """The source name (NNNN) an entry downloads, or None for other files (the readmes)."""
    for opt in options:
        key, _, value = opt.strip().partition("=")
        if key == "out":
            m = ARCHIVE.search(value)
            return m.group(1) if m else None
    m = ARCHIVE.search(url)
    return m.group(1) if m else None


def manifest_sources(path: str | os.PathLike[str]) -> list[str]:
    entries = parse_manifest(Path(path).read_text())
    return sorted({name for url, opts in entries if (name := entry_archive(url, opts))})


def task_share(names: list[str], task_index: int, task_count: int) -> list[str]:
    """Round-robin over the sorted names: every task gets an equal count (+-1), neighbours spread out."""
    if task_count < 1 or not 0 <= task_index < task_count:
        raise ValueError(f"task index {task_index} is not in [0, {task_count})")
    return sorted(names)[task_index::task_count]


def task_from_env(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(index, count) from TASK_INDEX/TASK_COUNT, else Cloud Batch's BATCH_TASK_INDEX/BATCH_TASK_COUNT."""
    env = dict(os.environ) if env is None else env
    for prefix in ("", "BATCH_"):
        if f"{prefix}TASK_INDEX" in env and f"{prefix}TASK_COUNT" in env:
            return int(env[f"{prefix}TASK_INDEX"]), int(env[f"{prefix}TASK_COUNT"])
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.work_split",
        description="Print the manifest entries of one scale-out task's archives.",
    )
    ap.add_argument("--manifest", required=True, help="aria2c input file (URL lines with out= options)")
    ap.add_argument("--task-index", type=int, help="this task (default: TASK_INDEX or BATCH_TASK_INDEX)")
    ap.add_argument(
        "--task-count", type=int, help="number of tasks (default: TASK_COUNT or BATCH_TASK_COUNT)"
    )
    ap.add_argument("--names", action="store_true", help="print archive names instead of manifest entries")
    args = ap.parse_args(argv)
    task = (args.task_index, args.task_count) if args.task_index is not None else task_from_env()
    if task is None or task[1] is None:
        ap.error("give --task-index and --task-count (or set TASK_INDEX/TASK_COUNT)")
    entries = parse_manifest(Path(args.manifest).read_text())
    names = sorted({n for u, o in entries if (n := entry_archive(u, o))})
    mine = set(task_share(names, *task))
    for url, opts in entries:
        name = entry_archive(url, opts)
        if name in mine:
            sys.stdout.write(f"{name}\n" if args.names else url + "\n" + "".join(o + "\n" for o in opts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
