"""The order of the steps, the checks before them, signals, and failures turned into exit codes.

    preflight (seconds, nothing written) -> sources -> index -> plan -> KNN -> embeddings -> artifact

A single run does them all. A scale-out worker indexes and embeds its share of the archives; the merge
plans, runs KNN and assembles from every worker's shards (scale_out.py). In follow mode the archives are
indexed, and when the whole of every archive is wanted also embedded, as they arrive, while later ones
still download. A committed file that turns out to be damaged is moved aside and the steps run again:
each does only what is missing, so the result is the same artifact a clean run gives.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.engine import machine, ownership, preflight, space, steps
from building_image_triplet_model.engine.artifact import finish as artifact
from building_image_triplet_model.engine.context import Hooks, Mode, RunContext
from building_image_triplet_model.errors import (
    BackboneError,
    ConfigError,
    InputError,
    Interrupted,
    RunError,
    disk_full,
)
from building_image_triplet_model.exit_codes import MEANINGS, Exit
from building_image_triplet_model.inputs.sources import list_sources
from building_image_triplet_model.io import durable
from building_image_triplet_model.io.durable import CorruptFileError
from building_image_triplet_model.io.progress import FILE_ONLY, Progress, setup_logging, utc_now
from building_image_triplet_model.io.workdir import Layout, RunLock

log = logging.getLogger(__name__)

STOP_GRACE_S = 8.0  # after a stop request the process is gone within this, whatever it was doing
DUPLICATE_SIGNAL_S = 2.0  # a group kill plus a forwarding wrapper deliver one stop request twice
MAX_CORRUPT_FILES = 20  # each found one is moved aside and recomputed; this many means something else


def install_signal_handlers(stop: threading.Event) -> None:
    first: list[float] = []
    owner = os.getpid()

    def handler(signum: int, _frame: Any) -> None:
        if os.getpid() != owner:
            # A forked child (a decode or index worker) inherits this handler; a terminal's Ctrl-C reaches
            # the whole process group. Stopping the children is the parent's job: a child that logged here
            # would repeat the line and redraw its copies of the bars, and its watchdog would exit 75
            # under the DataLoader ("worker exited unexpectedly").
            return
        name = signal.Signals(signum).name
        if stop.is_set():
            if time.monotonic() - first[0] < DUPLICATE_SIGNAL_S:
                return  # the same request, delivered twice: keep saving
            log.warning("%s again: exiting now (completed work is on disk)", name)
            os._exit(Exit.INTERRUPTED)
        first.append(time.monotonic())
        stop.set()
        log.warning(
            "%s received: saving progress and stopping (exit %d); run the same command again to continue",
            name,
            Exit.INTERRUPTED,
        )

        def watchdog() -> None:
            time.sleep(STOP_GRACE_S)
            log.warning("still busy %.0f s after %s: exiting (completed work is on disk)", STOP_GRACE_S, name)
            # Decode and index workers would otherwise linger until they notice their parent is gone.
            for child in multiprocessing.active_children():
                child.kill()
            logging.shutdown()
            os._exit(Exit.INTERRUPTED)

        threading.Thread(target=watchdog, name="stop-watchdog", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# ----------------------------------------------------------------------------------------- the runs
def run_single(ctx: RunContext, follow_timeout_s: float = 0) -> int:
    steps.resolve_sources(ctx)
    if ctx.follow:
        # Whole archives can be embedded before the plan only when the plan keeps every image.
        stream = not ctx.cfg.selects_subset
        for arrived in steps.arrivals(ctx, follow_timeout_s):
            steps.index_sources(ctx, arrived)
            if stream:
                steps.embed_rows(ctx, [s.name for s in arrived], all_rows=True)
    else:
        steps.index_sources(ctx, list(ctx.sources.values()))
    steps.indexed_without_source(ctx)
    steps.merge_index(ctx)
    steps.make_plan(ctx)
    if ctx.layout.is_complete(steps.run_key(ctx)):
        log.info("%s is complete; nothing to do", ctx.layout.output)
        return Exit.OK
    if steps.pending_works(ctx):
        ctx.prefetch_model()  # loads while KNN runs (nothing forks from here on until the decode workers)
    steps.knn(ctx)
    steps.embed_rows(ctx)
    artifact.assemble_artifact(ctx)
    stats = artifact.finish(ctx)
    log.info(
        "done: %s holds %d images (%d valid) of %d targets; %d embedded now, %d reused; %d rejected (%s)",
        ctx.layout.output,
        stats["images"],
        stats["valid_images"],
        stats["targets"],
        stats["images_embedded"],
        stats["images_reused"],
        sum(stats["rejects"].values()),
        ctx.layout.rejects,
    )
    return Exit.OK


def run_worker(ctx: RunContext, follow_timeout_s: float = 0) -> int:
    """A scale-out task: index and embed every image of its archives (scale_out.py publishes them)."""
    steps.resolve_sources(ctx)
    groups = steps.arrivals(ctx, follow_timeout_s) if ctx.follow else iter([list(ctx.sources.values())])
    for arrived in groups:
        names = [s.name for s in arrived]
        steps.index_sources(ctx, arrived)
        if ctx.hooks.after_index:
            ctx.hooks.after_index(ctx, names)  # checked and published before any GPU time is spent on them
        steps.embed_rows(ctx, names, all_rows=True)
    steps.indexed_without_source(ctx)
    steps.embed_rows(ctx, all_rows=True)  # archives whose shards were restored with work left
    if ctx.hooks.on_finish:
        ctx.hooks.on_finish(ctx)
    return Exit.OK


def run_merge(ctx: RunContext) -> int:
    """Every worker's shards are here (scale_out.py pulled them): plan, KNN and the artifact."""
    steps.resolve_sources(ctx)
    steps.indexed_without_source(ctx)
    steps.merge_index(ctx)
    steps.make_plan(ctx)
    if not ctx.layout.is_complete(steps.run_key(ctx)):
        steps.knn(ctx)
        steps.embed_rows(ctx)  # nothing to do, or an InputError naming the archives without embeddings
        artifact.assemble_artifact(ctx)
        artifact.finish(ctx)
    return Exit.OK


def _run(ctx: RunContext, follow_timeout_s: float) -> int:
    """The mode's steps; a damaged committed file is moved aside and the steps run again."""
    for _ in range(MAX_CORRUPT_FILES):
        try:
            with ctx.progress.console():
                if ctx.mode == "merge":
                    return run_merge(ctx)
                if ctx.mode == "worker":
                    return run_worker(ctx, follow_timeout_s)
                return run_single(ctx, follow_timeout_s)
        except CorruptFileError as exc:
            ctx.layout.quarantine(exc.path, exc.reason)
            if ctx.mode == "merge" and from_workers(ctx.layout, exc.path):
                # No archives, no model: the merge cannot make the file again. The run folder's copy is
                # pulled again by the next merge, once its worker (or the user) has replaced it.
                raise InputError(
                    f"{exc.path}: {exc.reason}; a merge cannot compute it again: run the worker of its "
                    "archive again, or replace the file in the run folder, then merge again"
                ) from None
            ctx.reset()
    raise RunError(f"{MAX_CORRUPT_FILES} corrupt files in {ctx.layout.work}: is the disk failing?")


def disk_full_message(cfg: DataConfig, layout: Layout, exc: BaseException, dim: int) -> str:
    """One line: the folder whose disk is full, what is free there, and what the run still writes."""
    name = getattr(exc, "filename", None)
    folder = Path(name).parent if isinstance(name, str) and name else layout.output.parent
    free = space.free_bytes(folder)
    need = ""
    if dim:
        with contextlib.suppress(Exception):  # an estimate for the message; never a second failure
            gb = max(0, space.bytes_still_needed(cfg, layout, dim)) / 1e9
            need = f"; this run still writes about {gb:.3f} GB"
    return (
        f"{folder}: the disk is full ({free / 1e9:.3f} GB free{need}): free space, or point data.hdf5_path / "
        "data.work_dir elsewhere, and run again (nothing done is lost)"
    )


def from_workers(layout: Layout, path: Path) -> bool:
    """A file a merge gets from the workers' shards (an index shard, an embedding store), not one it makes."""
    return any(path.is_relative_to(folder) for folder in (layout.index_dir, layout.emb_root))


def execute(
    cfg: DataConfig,
    *,
    fresh: bool = False,
    discard_embeddings: bool = False,
    mode: Mode = "single",
    task: tuple[int, int] | None = None,
    follow: bool = False,
    follow_timeout_s: float = 0,
    model_key: str = "",
    hooks: Hooks | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run the processor; returns the exit code. Nothing is written until the preflight has passed."""
    stop = stop or threading.Event()
    layout = Layout(cfg)
    resolved = None
    setup_logging()
    for note in cfg.warnings:
        log.warning("%s", note)
    try:
        preflight.check_output_file(layout.output)
        # Whose folders these are, before anything is read or written (ownership.py).
        ownership.check_apart_from_input(cfg, layout)
        ownership.check_work_folder(layout)
        ownership.check_embeddings_folder(layout)
        ownership.check_discard(layout, discard_embeddings)
        if mode != "single" and layout.shared_emb is not None:
            raise ConfigError(
                "data.embeddings_dir: a scale-out worker or merge publishes and reads its stores inside its "
                "run folder; remove the key for a scale-out run"
            )
        preflight.check_output_location(layout.output.parent, layout.work, layout.emb_root)
        if mode != "merge" and not follow:
            list_sources(cfg.input_dir)  # a missing folder, an unfinished download: now, not after minutes
        resolved = None if mode == "merge" else preflight.resolve(cfg)
        if resolved is not None:
            device_type = "cuda" if resolved.device.startswith("cuda") else "cpu"
            workers = machine.decode_workers(cfg, device_type)
            space.check_memory(cfg, int(resolved.identity.input_size[-1]), workers)
        if resolved is not None and not follow:
            space.check_disk_space_for(cfg, layout, resolved.output_size)
        layout.output.parent.mkdir(parents=True, exist_ok=True)
        ownership.claim_work_folder(layout)
        ownership.claim_embeddings_folder(layout)
        setup_logging(layout.log, layout.events)
        for note in cfg.warnings:
            log.warning("%s", note, extra=FILE_ONLY)  # the console has shown them already
        for note in resolved.notes if resolved else ():
            log.warning("%s", note)
        log.info("processor started (pid %d): %s -> %s", os.getpid(), cfg.input_dir, layout.output)
        with RunLock(layout.lock):
            progress = Progress(layout.progress_json, layout.events)
            ctx = RunContext(
                cfg,
                layout,
                stop,
                progress,
                mode=mode,
                task=task,
                follow=follow,
                resolved=resolved,
                model_key=resolved.identity.key if resolved else model_key,
                hooks=hooks or Hooks(),
            )
            if fresh or discard_embeddings:
                layout.discard(keep_embeddings=not discard_embeddings)
            layout.remove_interrupted_writes()
            if ctx.hooks.on_start:
                ctx.hooks.on_start(ctx)
            durable.write_json(
                layout.run_json,
                {"started": utc_now(), "mode": mode, "model_key": ctx.model_key, "pid": os.getpid()},
            )
            try:
                return _run(ctx, follow_timeout_s)
            finally:
                progress.close()
    except Interrupted:
        log.warning(
            "interrupted: progress is saved; run the same command again to continue (exit %d)",
            Exit.INTERRUPTED,
            extra=FILE_ONLY if stop.is_set() else {},  # a stop request has said so on the console
        )
        return Exit.INTERRUPTED
    except RunError as exc:
        if stop.is_set() and not isinstance(exc, InputError | BackboneError):
            return Exit.INTERRUPTED
        log.error("%s: %s", MEANINGS[exc.code].short, exc)
        return exc.code
    except Exception as exc:
        full = disk_full(exc)
        if full is not None:
            log.error("%s", disk_full_message(cfg, layout, full, resolved.output_size if resolved else 0))
            return Exit.CONFIG
        if stop.is_set():
            log.warning(
                "interrupted while %s: %s; progress is saved: run the same command again (exit %d)",
                type(exc).__name__,
                exc,
                Exit.INTERRUPTED,
            )
            return Exit.INTERRUPTED
        log.exception("unexpected error")
        return Exit.ERROR
