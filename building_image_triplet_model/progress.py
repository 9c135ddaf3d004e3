"""Progress: timestamped logs, tqdm bars, and a machine-readable trail.

``progress.json`` (in the work folder) holds each step's counts, rate and ETA for the status report;
``events.jsonl`` gets one JSON object per progress event, the structured lines Cloud Logging filters on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import workdir

log = logging.getLogger("building_image_triplet_model")


class UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class JsonEventHandler(logging.Handler):
    """Warnings and errors as JSON lines in events.jsonl too, where Cloud Logging filters on severity."""

    def __init__(self, path: Path) -> None:
        super().__init__(level=logging.WARNING)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = {
                "ts": utc_now(),
                "severity": record.levelname,
                "event": "log",
                "logger": record.name,
                "message": record.getMessage(),
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(line) + "\n")
        except Exception:
            self.handleError(record)


def setup_logging(log_file: Path | None, verbose: bool = False, events_file: Path | None = None) -> None:
    """Console and log-file handlers with UTC timestamps (idempotent)."""
    root = logging.getLogger("building_image_triplet_model")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    fmt = UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if events_file is not None:
        root.addHandler(JsonEventHandler(events_file))
    root.propagate = False


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Progress:
    """Counts per step; rates are measured over this run only (resumed work is not counted as speed)."""

    def __init__(self, work: Path, log_every_s: float = 30.0, bars: bool | None = None) -> None:
        self.work = work
        self.path = work / "progress.json"
        previous = workdir.read_json(self.path) or {}
        self.state: dict[str, Any] = {"steps": previous.get("steps", {}), "run": {}}
        self.state["run"] = {"pid": os.getpid(), "started": utc_now(), "previous": previous.get("run")}
        self.log_every_s = log_every_s
        self._t0: dict[str, float] = {}
        self._done0: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._last_write = 0.0
        self._bars: dict[str, Any] = {}
        self.bars_enabled = sys.stderr.isatty() if bars is None else bars
        self.events = work / "events.jsonl"

    def start(self, step: str, total: int, done: int = 0, unit: str = "items", **extra: Any) -> None:
        self._t0[step] = time.monotonic()
        self._done0[step] = done
        st = self.state["steps"].setdefault(step, {})
        st.update({"total": int(total), "done": int(done), "unit": unit, "status": "running", **extra})
        st["started"] = utc_now()
        st.pop("rate", None)
        st.pop("eta_s", None)
        if self.bars_enabled:
            from tqdm import tqdm

            self._bars[step] = tqdm(
                total=total, initial=done, desc=step, unit=unit[:-1] if unit.endswith("s") else unit
            )
        self._emit(step, force=True)

    def advance(self, step: str, n: int = 1, **extra: Any) -> None:
        st = self.state["steps"][step]
        st["done"] += n
        for key, value in extra.items():
            st[key] = st.get(key, 0) + value if isinstance(value, int) else value
        elapsed = time.monotonic() - self._t0[step]
        gained = st["done"] - self._done0[step]
        if elapsed > 0 and gained > 0:
            st["rate"] = round(gained / elapsed, 3)
            st["eta_s"] = round(max(0, st["total"] - st["done"]) / st["rate"], 1)
        if step in self._bars:
            self._bars[step].update(n)
        self._emit(step)

    def finish(self, step: str, status: str = "done", **extra: Any) -> None:
        st = self.state["steps"].setdefault(step, {"done": 0, "total": 0})
        st.update({"status": status, "ended": utc_now(), **extra})
        st.pop("eta_s", None)
        bar = self._bars.pop(step, None)
        if bar is not None:
            bar.close()
        self._emit(step, force=True)

    def _emit(self, step: str, force: bool = False) -> None:
        now = time.monotonic()
        st = self.state["steps"][step]
        if force or now - self._last_log.get(step, 0.0) >= self.log_every_s:
            self._last_log[step] = now
            event = {
                "ts": utc_now(),
                "severity": "INFO",
                "event": "progress",
                "phase": step,
            }
            event.update({k: st.get(k) for k in ("status", "done", "total", "unit", "rate", "eta_s")})
            with open(self.events, "a") as fh:
                fh.write(json.dumps(event) + "\n")
            if not force and not self.bars_enabled:
                eta = st.get("eta_s")
                log.info(
                    "%s: %d/%d %s%s%s",
                    step,
                    st["done"],
                    st["total"],
                    st.get("unit", ""),
                    f", {st['rate']:.1f}/s" if st.get("rate") else "",
                    f", ETA {eta / 60:.1f} min" if eta is not None else "",
                )
        if force or now - self._last_write >= 2.0:
            self._last_write = now
            self.save()

    def save(self) -> None:
        self.state["run"]["updated"] = utc_now()
        workdir.write_json(self.path, self.state)
