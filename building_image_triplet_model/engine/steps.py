"""The steps of a run, each a function of the one RunContext: sources -> index -> plan -> KNN -> embeddings
-> artifact. Each step starts from what is on disk and does only what is missing (pipeline.py orders them).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from building_image_triplet_model.engine import (
    done,
    geo_knn,
    identity,
    index,
    machine,
    ownership,
    plan,
    space,
)
from building_image_triplet_model.engine.context import RunContext
from building_image_triplet_model.engine.embed import loader as embed
from building_image_triplet_model.engine.embed import proof
from building_image_triplet_model.engine.embed.decode import ImageReader
from building_image_triplet_model.engine.embed.store import EmbeddingStore
from building_image_triplet_model.errors import InputError, Interrupted
from building_image_triplet_model.inputs.sources import Source, list_sources
from building_image_triplet_model.inputs.work_split import manifest_sources, task_share
from building_image_triplet_model.io import durable, faults, workdir
from building_image_triplet_model.io.progress import utc_now

log = logging.getLogger(__name__)

FOLLOW_POLL_S = 2.0


# ------------------------------------------------------------------------------------------- sources
def present_sources(ctx: RunContext) -> dict[str, Source]:
    """The run's archives that are in input_dir now (in follow mode a missing folder is just early)."""
    try:
        found = list_sources(ctx.cfg.input_dir)
    except InputError:
        if ctx.follow and not os.path.exists(ctx.cfg.input_dir):
            return {}
        raise
    return {s.name: s for s in found}


def resolve_sources(ctx: RunContext) -> None:
    """ctx.names (every archive of the run, or of this worker's share) and ctx.sources (those here)."""
    cfg = ctx.cfg
    expected = manifest_sources(cfg.manifest) if cfg.manifest else None
    if ctx.mode == "merge":
        ctx.names, ctx.sources = list(expected or []), {}
        return
    present = present_sources(ctx) if not ctx.follow else {}
    names = expected if expected is not None else sorted(present)
    if ctx.task:
        names = task_share(names, *ctx.task)
    ctx.names = list(names)
    if not ctx.follow:
        ctx.sources = {n: present[n] for n in ctx.names if n in present}


def arrivals(ctx: RunContext, timeout_s: float = 0) -> Iterator[list[Source]]:
    """Follow mode: the run's archives in groups, as they appear in input_dir (a downloader moves each
    one there when it is complete); ends when all are here. Stops with Interrupted on a stop request."""
    waiting = set(ctx.names)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    announced = False
    while waiting:
        here = present_sources(ctx)
        new = sorted(waiting & here.keys())
        if new:
            waiting -= set(new)
            ctx.sources.update({n: here[n] for n in new})
            if ctx.resolved is not None:  # the space check the preflight could not do: no archive was here
                sizes = [s.path.stat().st_size for s in ctx.sources.values() if s.kind == "tar"]
                space.check_disk_space_for(
                    ctx.cfg, ctx.layout, ctx.resolved.output_size, sizes, len(ctx.names)
                )
            yield [here[n] for n in new]
            continue
        if not announced:
            log.info("waiting for %d archives to arrive in %s", len(waiting), ctx.cfg.input_dir)
            announced = True
        if deadline is not None and time.monotonic() > deadline:
            late = " ".join(sorted(waiting)[:20])
            raise InputError(f"{ctx.cfg.input_dir}: {len(waiting)} archives never arrived: {late}")
        if ctx.stop.wait(FOLLOW_POLL_S):
            raise Interrupted


# --------------------------------------------------------------------------------------------- index
def index_sources(ctx: RunContext, sources: list[Source]) -> None:
    """Index what has no valid shard yet (in parallel processes); the markers go to ctx.markers."""
    cfg, layout = ctx.cfg, ctx.layout
    total = sum(s.path.stat().st_size if s.kind == "tar" else 0 for s in sources)
    ctx.progress.start("index", total=total, unit="bytes")

    def done(marker: dict[str, Any]) -> None:
        ctx.progress.advance("index", int(marker["signature"].get("size", 0)), archives=1)

    markers = index.index_all(
        sources, layout, machine.index_workers(cfg), cfg.tar_record_bytes, ctx.stop, done
    )
    if ctx.stop.is_set():
        raise Interrupted
    ctx.markers.update(markers)
    ctx.progress.finish("index")


def indexed_without_source(ctx: RunContext) -> None:
    """Archives of the run that are not here (a merge, an archive deleted after its run): their shards
    stand in for them, or the run cannot go on."""
    for name in ctx.names:
        if name in ctx.markers:
            continue
        marker = ctx.layout.index_marker(name, None)
        if marker is None:
            raise InputError(
                f"archive {name}: not in {ctx.cfg.input_dir} and not indexed in {ctx.layout.work}"
            )
        ctx.markers[name] = marker


def merge_index(ctx: RunContext) -> None:
    index.merge_cache(ctx.layout, ctx.names, ctx.markers)
    ctx.cache = index.load_cache(ctx.layout)
    sync_uri = os.environ.get("METADATA_CACHE_SYNC_URI")
    if sync_uri and ctx.mode == "single":
        index.upload_cache(ctx.layout, sync_uri)


# ---------------------------------------------------------------------------------------------- plan
def make_plan(ctx: RunContext) -> None:
    ctx.plan_key = done.plan_key(ctx.cfg, ctx.names, ctx.markers)
    layout = ctx.layout
    stored = done.stored_plan(layout, ctx.plan_key)
    if stored is not None:
        ctx.plan = stored
    else:
        p = plan.make_plan(ctx.cache, ctx.cfg)
        if len(p["rows"]) == 0:
            raise InputError(f"{ctx.cfg.input_dir}: no valid image/metadata pair (see {layout.rejects})")
        durable.write_npz(layout.plan, p)
        summary = plan.summary(p, ctx.names)
        workdir.commit(layout.plan_json, {"key": ctx.plan_key, **summary})
        faults.point("plan.written")
        log.info(
            "plan: %d images of %d targets (train %d, val %d, test %d targets)",
            summary["images"],
            summary["targets"],
            *summary["targets_per_split"].values(),
        )
        ctx.plan = p
    ctx.knn_ks = {s: plan.knn_k(ctx.cfg.knn_k, len(plan.split_targets(ctx.plan, s))) for s in plan.SPLITS}
    ctx.knn_key = identity.knn_key(ctx.plan_key, ctx.cfg.knn_k)


def run_key(ctx: RunContext) -> str:
    return identity.run_key(ctx.plan_key, ctx.knn_key, ctx.model_key)


# ----------------------------------------------------------------------------------------------- KNN
def knn(ctx: RunContext) -> None:
    p, layout = ctx.plan, ctx.layout
    assert p is not None
    layout.remove_stale_keys(layout.knn_root, ctx.knn_key)
    done = sum(layout.knn_rows_done(ctx.knn_key, s, len(plan.split_targets(p, s))) for s in plan.SPLITS)
    ctx.progress.start("knn", total=len(p["target_keys"]), done=done, unit="targets")
    for split in plan.SPLITS:
        pos = plan.split_targets(p, split)
        complete = geo_knn.run_split(
            layout.knn_split(ctx.knn_key, split),
            p["target_lat"][pos],
            p["target_lon"][pos],
            ctx.knn_ks[split],
            ctx.stop,
            machine.cpu_count(),
            ctx.cfg.knn_chunk_rows,
            on_rows=lambda n: ctx.progress.advance("knn", n),
            on_bad=layout.quarantine,
        )
        if not complete:
            raise Interrupted
    ctx.progress.finish("knn")


# ------------------------------------------------------------------------------------------ embedding
def store_of(ctx: RunContext, name: str) -> EmbeddingStore:
    marker = ctx.markers[name]
    return EmbeddingStore(
        ctx.layout.store_dir(ctx.model_key, name, marker["content"]),
        int(marker["images"]),
        (name, str(marker["content"]), ctx.model_key),
    )


def audited_store(ctx: RunContext, s: int, name: str) -> EmbeddingStore:
    """The archive's store, checked once per run against the keys and rows the run expects (a damaged or
    foreign file raises CorruptFileError); chunks of an earlier release are proven or moved aside."""
    store = store_of(ctx, name)
    if name not in ctx.audited:
        unkeyed = store.audit()
        if unkeyed:
            proof.prove_unkeyed(ctx, s, store, unkeyed, image_reader(ctx))
            store.audit()  # the proven chunks now carry their keys; the marker is written again with them
        ctx.audited.add(name)
    return store


def needed_rows(ctx: RunContext, s: int, all_rows: bool) -> np.ndarray:
    if all_rows:
        return np.arange(int(ctx.markers[ctx.names[s]]["images"]), dtype=np.int64)
    assert ctx.plan is not None
    return done.rows_needed(ctx.plan, ctx.names, ctx.markers, s)


def pending_works(
    ctx: RunContext, names: list[str] | None = None, all_rows: bool = False
) -> list[embed.Work]:
    hook = ctx.hooks.on_store_done
    on_done = (lambda w: hook(ctx, w)) if hook else None
    works = []
    for s, name in enumerate(ctx.names):
        if names is not None and name not in names:
            continue
        store = audited_store(ctx, s, name)
        needed = needed_rows(ctx, s, all_rows)
        if store.marker():
            continue  # every row of the archive is there
        pending = np.setdiff1d(needed, store.done_rows(), assume_unique=True)
        if len(pending):
            works.append(embed.Work(s, name, store, pending, {}, on_done=on_done))
    return works


def record_model(ctx: RunContext) -> None:
    """emb/<model key>/model.json: what the key stands for (written once, before the first chunk)."""
    path = ctx.layout.model_json(ctx.model_key)
    if ctx.resolved is not None and not path.exists():
        durable.write_json(
            path,
            {
                "key": ctx.model_key,
                "identity": ctx.resolved.identity.as_dict(),
                "spec": identity.model_spec(ctx.cfg),
                "dim": ctx.resolved.output_size,
                "created": utc_now(),
            },
        )


def image_reader(ctx: RunContext) -> ImageReader:
    sources = [ctx.sources.get(n) for n in ctx.names]
    return ImageReader(
        [str(s.path) if s else "" for s in sources], [bool(s and s.kind == "tar") for s in sources]
    )


def _locked_rows(ctx: RunContext, work: embed.Work) -> bool:
    """Under the store's lock: the rows still missing now (another run may have embedded some since the
    store was read), and the leftovers of its chunk writes that a kill interrupted. False: nothing left."""
    for tmp in work.store.folder.glob(f".*-*.npz.*{durable.TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
    before = len(work.rows)
    if work.store.marker():
        work.rows = work.rows[:0]
    else:
        work.rows = np.setdiff1d(work.rows, work.store.done_rows(), assume_unique=True)
    if len(work.rows) < before:
        ctx.progress.advance("embed", before - len(work.rows))  # embedded by another run: reused
        log.info(
            "%s: %d images embedded by another run meanwhile: reused", work.name, before - len(work.rows)
        )
    return bool(len(work.rows))


def _wait_for_store(ctx: RunContext, work: embed.Work) -> workdir.RunLock:
    """Block until the run writing this store lets go of it (or dies: the kernel drops its lock)."""
    lock = workdir.RunLock(ctx.layout.store_lock(ctx.model_key, work.store.folder))
    holder = workdir.lock_holder(lock.path)
    log.info("%s: waiting for the run that is embedding it (pid %s, lock %s)", work.name, holder, lock.path)
    while not lock.try_acquire():
        if ctx.stop.wait(0.5):
            raise Interrupted
    return lock


def embed_rows(ctx: RunContext, names: list[str] | None = None, all_rows: bool = False) -> None:
    """Embed every needed row that no store holds yet (``names``: only these archives).

    A store is written only under its lock (workdir.Layout.store_lock), so runs sharing data.embeddings_dir
    never write the same store at once: a store another run holds is left for later, the others are embedded
    first, then the run waits for it and embeds only what is still missing."""
    ownership.record_user(
        ctx.layout,
        ctx.model_key,
        [f"{ctx.model_key}/{store_of(ctx, n).name}" for n in ctx.names if n in ctx.markers],
    )
    works = pending_works(ctx, names, all_rows)
    todo = sum(len(w.rows) for w in works)
    if not todo:
        return
    absent = [w.name for w in works if w.name not in ctx.sources]
    if absent:
        raise InputError(
            f"embeddings of {', '.join(absent)} are missing, and so are the archives in {ctx.cfg.input_dir}"
        )
    record_model(ctx)
    backbone = ctx.backbone()
    reader = image_reader(ctx)
    step = "embed"
    ctx.progress.start(step, total=todo, unit="images")  # the clock starts now that the model is ready

    def batch(n: int) -> None:
        ctx.counts.images_embedded += n
        ctx.progress.advance(step, n)
        if ctx.hooks.on_batch:
            ctx.hooks.on_batch(n)

    def changed(work: embed.Work, row: int) -> None:
        marker_path = ctx.layout.shard_marker(work.name)
        durable.write_json(
            marker_path, {**ctx.markers[work.name], "stale": f"row {row} changed, {utc_now()}"}
        )

    chunk = ctx.hooks.on_chunk
    on_chunk = (lambda w: chunk(ctx, w)) if chunk else None
    left = works
    while left:
        held: list[tuple[embed.Work, workdir.RunLock]] = []
        busy: list[embed.Work] = []
        for w in left:
            lock = workdir.RunLock(ctx.layout.store_lock(ctx.model_key, w.store.folder))
            if lock.try_acquire():
                held.append((w, lock))
            else:
                busy.append(w)
        if not held:  # every store left is another run's now: wait for the first
            held, busy = [(busy[0], _wait_for_store(ctx, busy[0]))], busy[1:]
        try:
            ready = [w for w, _ in held if _locked_rows(ctx, w)]
            for w in ready:
                shard = index.load_shard(ctx.layout, w.name, ctx.markers[w.name], lazy=True)
                w.locators = {k: shard[k][w.rows] for k in ("path", "offset", "size", "checksum")}
            complete = embed.embed_all(ready, backbone, reader, ctx.cfg, ctx.stop, batch, on_chunk, changed)
        finally:
            for _, lock in held:
                lock.release()
        if ctx.stop.is_set() or not complete:
            raise Interrupted
        for w in ready:
            log.info("embedded %s: %d images", w.name, len(w.rows))
        left = busy
    ctx.progress.finish(step)
