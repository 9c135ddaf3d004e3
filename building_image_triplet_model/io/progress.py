"""Progress a person can watch, and a trail a machine can read.

* The log format: ``<UTC time>Z <tag>[<pid>]: [WARNING: |ERROR: ]message``, the same as the bootstrap's
  bash (gcp/scripts/lib.sh), so that one journal reads as one log.
* On a terminal every long step has a tqdm bar with its rate and ETA, and log lines go through tqdm
  (its logging redirection), never into the middle of a bar. Off a terminal, one progress line per
  ``log_every_s``.
* ``progress.json`` (the work folder) holds each step's counts, rate and ETA for the status report, this
  run's record and a flat history of the last :data:`HISTORY_RUNS` runs; ``events.jsonl`` one JSON object
  per progress event and per warning, for Cloud Logging.

A step's clock starts when its work starts (the embedding step's once the model is ready), so rates and
ETAs measure work, not imports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from building_image_triplet_model.errors import disk_full
from building_image_triplet_model.io import durable

log = logging.getLogger("building_image_triplet_model")

HISTORY_RUNS = 20  # earlier runs' records kept in progress.json, newest first


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_event(path: str | os.PathLike[str], event: str, severity: str = "INFO", **fields: Any) -> None:
    """The one writer of event lines (events.jsonl, the VM's job log; one Cloud Logging log, one schema):
    ``{"time", "severity", "event", ...fields}``. Raises OSError; callers say whether that matters."""
    line = {"time": utc_now(), "severity": severity, "event": event, **fields}
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


class LineFormatter(logging.Formatter):
    """``2026-12-01T21:21:07Z index[4242]: indexed 0088 ...``; warnings and errors say so first."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        text = f"{ts} {record.name.rsplit('.', 1)[-1]}[{record.process}]: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonEventHandler(logging.Handler):
    """Warnings and errors as JSON lines in events.jsonl too, where Cloud Logging filters on severity."""

    def __init__(self, path: Path) -> None:
        super().__init__(level=logging.WARNING)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_event(self.path, "log", record.levelname, logger=record.name, message=record.getMessage())
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        _quiet_when_full(self, record)


class _FileHandler(logging.FileHandler):
    """The log file; on a full disk a line is dropped without logging's traceback on the console (the run
    reports the full disk itself, in one line)."""

    def handleError(self, record: logging.LogRecord) -> None:
        _quiet_when_full(self, record)


def _quiet_when_full(handler: logging.Handler, record: logging.LogRecord) -> None:
    if disk_full(sys.exc_info()[1]) is None:
        logging.Handler.handleError(handler, record)


# A record logged with this extra goes to the log file and the events, not the console: the warnings the
# console showed before the output folder could be created (nothing is written before the preflight).
FILE_ONLY = {"file_only": True}


def setup_logging(
    log_file: Path | None = None, events_file: Path | None = None, verbose: bool = False
) -> None:
    """The console handler, and once the output folder exists, the log file and the events (idempotent)."""
    root = logging.getLogger("building_image_triplet_model")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    fmt = LineFormatter()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    root.addHandler(console)
    if log_file is not None:
        fh = _FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if events_file is not None:
        root.addHandler(JsonEventHandler(events_file))
    root.propagate = False


class Progress:
    """Counts per step; rates are measured over this run's work only."""

    def __init__(self, path: Path, events: Path, log_every_s: float = 30.0, bars: bool | None = None) -> None:
        self.path = path
        self.events = events
        try:
            previous = read_progress(path)
        except durable.CorruptFileError:
            previous = {}  # only a report: start a new one
        history = [previous["run"], *previous["history"]] if previous.get("run") else []
        self.state: dict[str, Any] = {
            "steps": previous.get("steps", {}),
            "run": {"pid": os.getpid(), "started": utc_now()},
            "history": history[:HISTORY_RUNS],
        }
        self.log_every_s = log_every_s
        self._t0: dict[str, float] = {}
        self._done0: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._last_write = 0.0
        self._bars: dict[str, Any] = {}
        self.bars_enabled = sys.stderr.isatty() if bars is None else bars

    @contextlib.contextmanager
    def console(self) -> Iterator[None]:
        """While bars are shown, log lines are written through tqdm, above the bars."""
        if not self.bars_enabled:
            yield
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[log]):
            yield

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
                total=total,
                initial=done,
                desc=step,
                unit=unit.rstrip("s") or unit,
                unit_scale=unit == "bytes",
                dynamic_ncols=True,
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

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        self.save()

    def _emit(self, step: str, force: bool = False) -> None:
        now = time.monotonic()
        st = self.state["steps"][step]
        if force or now - self._last_log.get(step, 0.0) >= self.log_every_s:
            self._last_log[step] = now
            fields = {k: st.get(k) for k in ("status", "done", "total", "unit", "rate", "eta_s")}
            # A full disk: the run reports it; progress is a view, never a second failure.
            with contextlib.suppress(OSError):
                write_event(self.events, "progress", phase=step, **fields)
            if not force and not self.bars_enabled:
                log.info("%s", line(step, st))
        if force or now - self._last_write >= 2.0:
            self._last_write = now
            self.save()

    def save(self) -> None:
        self.state["run"]["updated"] = utc_now()
        try:
            durable.write_json(self.path, self.state)
        except OSError as exc:
            # On a full disk the run stops and says so once; the progress file is a view of the durable
            # files, rewritten by the next run, so it must not fail that report a second time.
            if disk_full(exc) is None:
                raise


def line(step: str, st: dict[str, Any]) -> str:
    """'embed: 1200/5000 images, 180.2/s, ETA 0.4 min'."""
    eta = st.get("eta_s")
    return (
        f"{step}: {st['done']}/{st['total']} {st.get('unit', '')}"
        + (f", {st['rate']:.1f}/s" if st.get("rate") else "")
        + (f", ETA {eta / 60:.1f} min" if eta is not None else "")
    )


# ------------------------------------------------------------------------------------------ progress.json
def _flat(record: Any) -> dict[str, Any]:
    """A run's record without anything nested in it (an older release nested the previous run)."""
    if not isinstance(record, dict):
        return {}
    return {k: v for k, v in record.items() if not isinstance(v, dict | list)}


def read_progress(path: Path) -> dict[str, Any]:
    """progress.json as {"steps", "run", "history"}: {} when absent, CorruptFileError when unreadable. The
    history is flat and at most HISTORY_RUNS long, also from a file of the release that nested each start's
    previous record inside the next (read without recursion, however deep, and cut to the last runs)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        try:
            doc = json.loads(raw)
        except RecursionError:
            doc = _loads_deep(raw.decode())
    except ValueError as exc:
        raise durable.CorruptFileError(path, f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise durable.CorruptFileError(path, "not a JSON object")
    run = doc.get("run") if isinstance(doc.get("run"), dict) else {}
    nested, node = [], run.get("previous")
    while isinstance(node, dict) and len(nested) < HISTORY_RUNS:
        nested.append(_flat(node))
        node = node.get("previous")
    history = doc.get("history") if isinstance(doc.get("history"), list) else []
    steps = doc.get("steps") if isinstance(doc.get("steps"), dict) else {}
    return {"steps": steps, "run": _flat(run), "history": [*nested, *map(_flat, history)][:HISTORY_RUNS]}


_WS = re.compile(r"[ \t\n\r]*")
_SCALAR = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null|NaN|-?Infinity")


def _loads_deep(text: str) -> Any:
    """JSON without recursion: the standard library's decoder recurses once per level of nesting."""
    stack: list[tuple[Any, str | None]] = []  # the open containers, and an object's pending key
    i, n = _WS.match(text, 0).end(), len(text)  # type: ignore[union-attr]

    def key_at(i: int) -> tuple[str, int]:
        if text[i : i + 1] != '"':
            raise ValueError(f"expected a key at {i}")
        key, i = json.decoder.scanstring(text, i + 1)
        i = _WS.match(text, i).end()  # type: ignore[union-attr]
        if text[i : i + 1] != ":":
            raise ValueError(f"expected ':' at {i}")
        return key, _WS.match(text, i + 1).end()  # type: ignore[union-attr]

    while True:
        ch = text[i : i + 1]
        closing = {"{": "}", "[": "]"}.get(ch)
        if closing:
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
            if text[i : i + 1] != closing:
                key = None
                if ch == "{":
                    key, i = key_at(i)
                stack.append(({} if ch == "{" else [], key))
                continue
            value, i = ({} if ch == "{" else []), i + 1
        elif ch == '"':
            value, i = json.decoder.scanstring(text, i + 1)
        else:
            m = _SCALAR.match(text, i)
            if not m:
                raise ValueError(f"unexpected character at {i}")
            value, i = json.loads(m.group()), m.end()
        while True:  # attach the value; close every container that ends here
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if not stack:
                if i != n:
                    raise ValueError(f"extra data at {i}")
                return value
            container, key = stack[-1]
            if isinstance(container, dict):
                container[key] = value
            else:
                container.append(value)
            ch = text[i : i + 1]
            if ch == ",":
                i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
                if isinstance(container, dict):
                    key, i = key_at(i)
                    stack[-1] = (container, key)
                break
            if ch != ("}" if isinstance(container, dict) else "]"):
                raise ValueError(f"expected ',' or the end of a container at {i}")
            stack.pop()
            value, i = container, i + 1
