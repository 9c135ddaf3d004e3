"""``python -m building_image_triplet_model.vm COMMAND``: the bootstrap's steps that are Python.

    config      settings, manifest and preprocess YAML, checked and stored (vm/config_step.py)
    preflight   the GPU check (vm/gpu_check.py)
    restore     a new work disk: bring the bucket's checkpoint back first (vm/checkpoint.py)
    job         download -> extract -> preprocess -> finalize -> on-done (vm/job.py)
    checkpoint  one push to the bucket now
    status      the phases, the preemptions, and the engine's report
    shutdown    REASON: count a preemption (REASON preempted) or a stop, then push the small files
    get KEY     print one stored setting (true/false for booleans)
    --help      this text

Every command logs in the project's one format to stderr and to $TRIPLET_LOG_FILE when it is set.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from building_image_triplet_model.io.progress import setup_logging, utc_now

from ..exit_codes import Exit
from . import checkpoint, settings
from .paths import VMPaths
from .phases import PHASES, PREEMPTIONS, PREFLIGHT, Markers, describe

log = logging.getLogger("building_image_triplet_model.vm")  # not __name__: run as __main__


def status(paths: VMPaths) -> int:
    markers = Markers(paths.state_dir)
    try:
        s: dict | None = settings.load(paths.config_dir)
    except settings.SettingError:
        s = None
    for name in (PREFLIGHT, *PHASES, "done"):
        m = markers.get(name)
        if name == PREFLIGHT and not m:
            continue
        text = "complete" if name == "done" and m else "not yet" if name == "done" else describe(m)
        if name == "extract" and not m and s is not None and not s["extract-archives"]:
            # Reading the archives in place, the job never runs this phase: "pending" would never change.
            text = "not used (the engine reads the archives in place)"
        log.info("state: %s: %s", name, text)
    pre = markers.get(PREEMPTIONS)
    if pre:
        log.info("state: preemptions: %d, stops: %d", pre.get("count", 0), pre.get("stops", 0))
    if s is None:
        return 0
    python = os.environ.get("TRIPLET_PYTHON", sys.executable)
    module = os.environ.get("TRIPLET_STATUS_MODULE", "building_image_triplet_model.preprocess_resume")
    subprocess.run([python, "-m", module, "--config", s["engine"]["config"]], cwd=paths.repo_dir)
    return 0


def shutdown(paths: VMPaths, reason: str) -> int:
    """After the job was stopped: count, then push the markers and logs (the big files went earlier)."""
    markers = Markers(paths.state_dir)
    phase = next(
        (p for p in reversed(PHASES) if markers.get(p).get("status") in ("running", "interrupted")), "none"
    )
    if reason == "preempted":
        pre = markers.get(PREEMPTIONS)
        events = [*(pre.get("events") or [])[-99:], {"at": utc_now(), "phase": phase}]
        markers.update(PREEMPTIONS, count=int(pre.get("count", 0)) + 1, last_at=utc_now(), events=events)
        log.info("preemption counted (%d so far; phase %s)", int(pre.get("count", 0)) + 1, phase)
    else:
        pre = markers.get(PREEMPTIONS)
        markers.update(PREEMPTIONS, stops=int(pre.get("stops", 0)) + 1, last_stop_at=utc_now())
    try:
        s = settings.load(paths.config_dir)
    except settings.SettingError:
        log.info("no checkpoint location configured: nothing to push")
        return 0
    if checkpoint.destination(s) is None:
        log.info("no checkpoint location configured: nothing to push")
        return 0
    ok = checkpoint.push(s, paths, full=False, max_size=16 << 20)
    log.info("pushed state and logs to %s" if ok else "push to %s failed", checkpoint.destination(s))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    log_file = os.environ.get("TRIPLET_LOG_FILE") or None
    setup_logging(Path(log_file) if log_file else None)
    if args[:1] in (["-h"], ["--help"], ["help"]):
        print(__doc__)
        return 0
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    paths = VMPaths.from_env()
    cmd = args[0]
    try:
        if cmd == "config":
            from .config_step import ConfigStepError, run

            try:
                run()
            except (ConfigStepError, settings.SettingError) as exc:
                log.error("config: %s", exc)
                return Exit.CONFIG
            return 0
        if cmd == "status":
            return status(paths)
        if cmd == "shutdown":
            return shutdown(paths, args[1] if len(args) > 1 else "shutdown")
        s = settings.load(paths.config_dir)
        if cmd == "get" and len(args) == 2:
            value = s.get(args[1], "")
            print(str(value).lower() if isinstance(value, bool) else value)
            return 0
        if cmd == "preflight":
            from . import gpu_check

            return gpu_check.run(s, paths)
        if cmd == "restore":
            try:
                checkpoint.restore(s, paths)
            except checkpoint.cloud_sync.CloudSyncError as exc:
                # A bucket object the restore refuses (a name that would leave its folder) or cannot fetch:
                # the checkpoint is input this disk cannot take as it is.
                log.error("restore: %s", exc)
                return Exit.INPUT
            return 0
        if cmd == "checkpoint":
            return 0 if checkpoint.push(s, paths, full=True) else 1
        if cmd == "job":
            from . import job

            return job.run(dict(os.environ))
    except settings.SettingError as exc:
        log.error("%s", exc)
        return 1
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
