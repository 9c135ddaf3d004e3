"""Pushes to the bucket (every push-interval-min while the engine runs) and the restore onto a new work disk.

    <checkpoint-uri>/<run-id>/            (a worker: .../tasks/<i>-of-<n>/, the merge: .../merge/)
      output/<stem>.work/...   the engine's work folder: index shards, plan, KNN and embedding chunks
      output/<stem>.log, .rejects.tsv, .stats.json
      logs/                    the bootstrap's logs
      state/                   the phase markers: sent last, so a marker never runs ahead of its data

A full push sends the engine's files too (single-VM mode: a worker's shards are published by the engine
itself); a small push only logs and markers. Each push is one log line, none when nothing was sent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from building_image_triplet_model.remote import cloud_sync

from .paths import VMPaths
from .phases import Markers

log = logging.getLogger(__name__)


def destination(s: dict[str, Any]) -> str | None:
    ckpt = s.get("checkpoint-uri")
    if not ckpt:
        return None
    if s["mode"] == "worker":
        return f"{ckpt}/{s['run-id']}/tasks/{s['task-index']}-of-{s['task-count']}"
    if s["mode"] == "merge":
        return f"{ckpt}/{s['run-id']}/merge"
    return f"{ckpt}/{s['run-id']}"


def _engine_files(s: dict[str, Any]) -> tuple[Path, list[str]]:
    """The output's folder and the engine's names in it, anchored there ('./x'): a push sends, and a restore
    brings back, only these, never another file of that folder (it may be the user's)."""
    e = s["engine"]
    folder = Path(e["output"]).parent
    return folder, [f"./{Path(e[k]).name}" for k in ("work", "log", "rejects", "stats")]


def push(s: dict[str, Any], paths: VMPaths, full: bool = True, max_size: int | None = None) -> bool:
    """One push; True when everything was sent (a failure is logged: the next push catches up)."""
    dest = destination(s)
    if dest is None:
        return True
    sent = 0
    nbytes = 0
    jobs: list[tuple[Path, str, dict[str, Any]]] = []
    if full and s["mode"] == "single":
        folder, names = _engine_files(s)
        if folder.is_dir():
            jobs.append((folder, f"{dest}/output", {"include": names}))
    if paths.log_dir.is_dir():
        jobs.append((paths.log_dir, f"{dest}/logs", {}))
    jobs.append((paths.state_dir, f"{dest}/state", {"markers": ("*",)}))
    for src, to, kw in jobs:
        if not src.is_dir():
            continue
        try:
            result = cloud_sync.push_dir(src, to, max_size=max_size, **kw)
        except (cloud_sync.CloudSyncError, OSError) as exc:
            log.warning("push to %s failed (%s); the next one catches up", to, exc)
            return False  # the state markers are not sent ahead of data that failed
        sent += len(result.transferred)
        nbytes += result.bytes
    if sent:
        log.info("pushed %d files (%.1f MB) to %s", sent, nbytes / 1e6, dest)
    return True


def restore(s: dict[str, Any], paths: VMPaths) -> None:
    """A new work disk (no markers) and a checkpoint in the bucket: bring the checkpoint back first."""
    dest = destination(s)
    if dest is None:
        log.info("restore: no checkpoint-uri")
        return
    if Markers(paths.state_dir).any():
        log.info("restore: the work disk has state (%s); nothing to restore", paths.state_dir)
        return
    if s["mode"] == "single" and Path(s["engine"]["work"]).exists():
        log.warning(
            "restore: %s exists but %s has no markers; keeping the local files",
            s["engine"]["work"],
            paths.state_dir,
        )
        return
    if not cloud_sync.exists(f"{dest}/state"):
        log.info("restore: nothing under %s/state: a fresh run", dest)
        return
    log.info("restore: the work disk is new and %s has a checkpoint: restoring it", dest)
    if s["mode"] == "single" and cloud_sync.exists(f"{dest}/output"):
        folder, names = _engine_files(s)
        cloud_sync.pull_dir(f"{dest}/output", folder, include=names)
    try:
        cloud_sync.pull_dir(f"{dest}/logs", paths.log_dir)
    except cloud_sync.CloudSyncError as exc:
        log.warning("restore: logs not restored (%s)", exc)
    # State last: it says which phases are done, so it may only arrive after what they produced.
    cloud_sync.pull_dir(f"{dest}/state", paths.state_dir, markers=("*",))
    log.info("restore: done; continuing from the restored state")
