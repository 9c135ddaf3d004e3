"""The processor, run the way ``dataset_processor.main`` runs it (config, signal handlers,
``pipeline.execute``), with the engine's own Hooks and log records turned into a timeline.

    python benchmarks/processor_runner.py --config C.yaml --report R.json --t0 MONOTONIC [--print-batches]
        [--lazy-imports] [-- processor options: --fresh, --follow]

Times are seconds since ``--t0``, the parent's ``time.monotonic()`` just before it started this process
(CLOCK_MONOTONIC is one clock for every process of the machine), so they include the interpreter's start.
Unless ``--lazy-imports``, torch and timm are imported explicitly before the run (the engine imports them
during its preflight anyway) so that the import time can be told apart from the work. Nothing of the
engine is patched: only Hooks (context.py) and logging handlers on the engine's module loggers.

The report (written at the end, so a killed run has none) holds the timeline, every batch as
``[seconds, images]`` and the exit code; ``--print-batches`` also prints ``BATCH <images so far> <seconds>``
after each batch, for a parent that kills the run.
"""

from __future__ import annotations

import time

T_MAIN = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# First log record whose message starts with this: the timeline's name for it.
MARKS = {
    "processor started": "processor_started",
    "indexing": "index_started",
    "plan:": "plan_made",
    "backbone ": "model_ready",
    "assembling": "assemble_started",
    "done:": "done",
    "waiting for": "waiting_for_archives",
}
LOGGERS = ("pipeline", "steps", "index", "backbone", "artifact", "assemble", "embed", "preflight", "workdir")


class Timeline(logging.Handler):
    def __init__(self, t0: float, marks: dict[str, float], records: list[list[Any]]) -> None:
        super().__init__(level=logging.INFO)
        self.t0, self.marks, self.records = t0, marks, records

    def emit(self, record: logging.LogRecord) -> None:
        t = time.monotonic() - self.t0
        msg = record.getMessage()
        for prefix, name in MARKS.items():
            if msg.startswith(prefix) and name not in self.marks:
                self.marks[name] = round(t, 4)
        if len(self.records) < 400:
            self.records.append([round(t, 4), record.name.rsplit(".", 1)[-1], msg[:160]])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--t0", type=float, required=True)
    ap.add_argument("--print-batches", action="store_true")
    ap.add_argument("--lazy-imports", action="store_true")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--follow", action="store_true")
    args = ap.parse_args()
    t0 = args.t0
    marks: dict[str, float] = {"interpreter_ready": round(T_MAIN - t0, 4)}

    def mark(name: str) -> None:
        marks.setdefault(name, round(time.monotonic() - t0, 4))

    from building_image_triplet_model import config
    from building_image_triplet_model.engine import pipeline
    from building_image_triplet_model.engine.context import Hooks

    mark("engine_imported")
    if not args.lazy_imports:
        import torch  # noqa: F401

        mark("torch_imported")
        import timm  # noqa: F401

        mark("timm_imported")
    records: list[list[Any]] = []
    handler = Timeline(t0, marks, records)
    for name in LOGGERS:
        logging.getLogger(f"building_image_triplet_model.{name}").addHandler(handler)
    cfg = config.load(args.config)
    mark("config_loaded")
    batches: list[list[float]] = []
    chunks: list[float] = []
    done = [0]

    def on_batch(n: int) -> None:
        t = time.monotonic() - t0
        batches.append([round(t, 4), n])
        done[0] += n
        if args.print_batches:
            print(f"BATCH {done[0]} {t:.4f}", flush=True)

    hooks = Hooks(
        on_start=lambda ctx: mark("lock_held"),
        on_batch=on_batch,
        on_chunk=lambda ctx, work: chunks.append(round(time.monotonic() - t0, 4)),
    )
    stop = threading.Event()
    pipeline.install_signal_handlers(stop)
    mark("execute_started")
    code = pipeline.execute(cfg, fresh=args.fresh, follow=args.follow, hooks=hooks, stop=stop)
    mark("execute_ended")
    if batches:
        marks["first_batch"] = batches[0][0]
        marks["last_batch"] = batches[-1][0]
    report = {
        "code": int(code),
        "timeline": marks,
        "batches": batches,
        "chunks": chunks,
        "records": records,
        "pid": os.getpid(),
    }
    tmp = Path(args.report + ".tmp")
    tmp.write_text(json.dumps(report) + "\n")
    tmp.replace(args.report)
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
