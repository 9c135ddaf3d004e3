"""The job's phases and their markers: the one list that the job, the status report, the shutdown script
and provisioning read.

A phase's marker is ``<state dir>/<phase>.json``, written atomically: ``status`` (running, done, failed,
interrupted), ``attempts`` (starts), ``started_at``/``ended_at``, ``exit_code``, ``host``, ``run_id`` and the
phase's own ``summary``. Other state files: ``preflight.json`` (the GPU check), ``done.json`` (the run is
complete), ``preemptions.json``.

Standard library only (``python3 -m building_image_triplet_model.vm.phases`` prints the list).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

from building_image_triplet_model.io import durable
from building_image_triplet_model.io.progress import utc_now

from ..exit_codes import INTERRUPTED_CODES

PHASES = ("download", "extract", "preprocess", "finalize")
DONE, PREFLIGHT, PREEMPTIONS = "done", "preflight", "preemptions"


class Markers:
    """The state folder: one JSON file per phase and a few more."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str) -> dict[str, Any]:
        try:
            return durable.read_json(self.path(name)) or {}
        except durable.CorruptFileError:
            return {}  # a marker cut short by a power loss: as if the phase had not run

    def update(self, name: str, **fields: Any) -> dict[str, Any]:
        marker = {**self.get(name), **fields, "updated_at": utc_now()}
        durable.write_json(self.path(name), marker)
        return marker

    def start(self, phase: str, run_id: str) -> int:
        attempts = int(self.get(phase).get("attempts", 0)) + 1
        self.update(
            phase,
            phase=phase,
            status="running",
            attempts=attempts,
            started_at=utc_now(),
            ended_at=None,
            exit_code=None,
            host=socket.gethostname(),
            run_id=run_id,
        )
        return attempts

    def end(self, phase: str, code: int, summary: dict[str, Any] | None = None) -> str:
        status = "done" if code == 0 else "interrupted" if code in INTERRUPTED_CODES else "failed"
        extra = {"summary": summary} if summary is not None else {}
        self.update(phase, status=status, ended_at=utc_now(), exit_code=code, **extra)
        return status

    def is_done(self, name: str) -> bool:
        return self.get(name).get("status") == "done"

    def any(self) -> bool:
        """A phase has run on this work disk. Only the phases count: the preflight (which runs before the
        restore step) and a shutdown's count can be written on a new work disk before anything is restored."""
        return any(self.path(name).exists() for name in (*PHASES, DONE))


def describe(marker: dict[str, Any]) -> str:
    """'done after 2 attempts', 'running (attempt 3)', 'failed (exit 3) after 1 attempt', 'pending'."""
    if not marker:
        return "pending"
    status, n = marker.get("status", "unknown"), int(marker.get("attempts", 0))
    attempts = f"{n} attempt{'s' if n != 1 else ''}"
    if status == "running":
        return f"running (attempt {n})"
    if status in ("failed", "interrupted"):
        return f"{status} (exit {marker.get('exit_code')}) after {attempts}"
    return f"{status} after {attempts}" if n else status


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write("".join(f"{p}\n" for p in PHASES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
