"""Scale-out: N workers each embed their share of the archives; a merge builds the one artifact.

A run lives under one folder ``RUN_URI`` (``gs://bucket/checkpoints/RUN_ID`` or a local path):

    RUN_URI/run_settings.json                          what every worker and the merge must share
    RUN_URI/shards/index/<source>.npz|.json            a source's index shard (its marker after the data)
    RUN_URI/shards/emb/<model key>/model.json          what the model key stands for
    RUN_URI/shards/emb/<model key>/<source>-<content>/ its embedding store, chunks as they are written,
                                                       _SUCCESS.json last

The shards are the work folder's own files (workdir.py): a worker's are the same kind of thing as a single
VM's. A worker (``--task-index I --task-count N``, or TASK_INDEX/TASK_COUNT, or Cloud Batch's
BATCH_TASK_INDEX/BATCH_TASK_COUNT) first restores its own archives' shards (a retried task on a fresh VM
continues), then indexes and embeds only them. The merge (``--merge``, CPU only, no archives) waits for
every archive's shard, pulls them and plans, runs KNN and assembles: the artifact equals a single run's.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.engine import identity, ownership, pipeline
from building_image_triplet_model.engine.context import Hooks, RunContext
from building_image_triplet_model.engine.embed.loader import Work
from building_image_triplet_model.errors import ConfigError, InputError, ResumeRefused
from building_image_triplet_model.inputs.work_split import manifest_sources, task_share
from building_image_triplet_model.io.progress import setup_logging
from building_image_triplet_model.io.workdir import Layout
from building_image_triplet_model.remote import cloud_sync

log = logging.getLogger(__name__)

SETTINGS_NAME = "run_settings.json"
POLL_S = 30.0


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def run_settings(cfg: DataConfig) -> dict:
    """What a worker of the run shares with every other and with the merge."""
    return {"selection": identity.selection(cfg), "knn_k": cfg.knn_k, "model_spec": identity.model_spec(cfg)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _differences(theirs: dict, ours: dict) -> str:
    a, b = _flat(theirs), _flat(ours)
    return ", ".join(
        f"{k.split('.')[-1]}: run has {a.get(k)!r}, this process {v!r}"
        for k, v in sorted(b.items())
        if a.get(k) != v
    )


def claim(run_uri: str, record: dict, create: bool) -> dict:
    """Create the run's settings record (create-only), or check ours against it: ResumeRefused when any
    of our keys differs. Returns the run's record."""
    uri = join(run_uri, SETTINGS_NAME)
    if create:
        try:
            cloud_sync.write_text(uri, json.dumps(record, indent=1, sort_keys=True), if_generation_match=0)
            log.info("created run settings %s", uri)
            return record
        except FileExistsError:
            pass
    try:
        theirs = json.loads(cloud_sync.read_text(uri))
    except FileNotFoundError:
        raise ConfigError(f"--run-uri {run_uri}: no such run ({SETTINGS_NAME} is missing)") from None
    if any(theirs.get(k) != v for k, v in record.items()):
        raise ResumeRefused(
            f"{run_uri}: this process's settings differ from the run's ({_differences(theirs, record)}); "
            "refusing to join: use the run's config, or start a new run id"
        )
    return theirs


def worker(
    cfg: DataConfig,
    run_uri: str | None,
    task: tuple[int, int],
    fresh: bool,
    follow: bool,
    stop: threading.Event | None = None,
) -> int:
    """Index and embed this task's archives, publishing shards to run_uri as they are written."""
    if cfg.selects_subset:
        raise ConfigError(
            "data.n_samples/data.n_images: a scale-out worker embeds every image of its archives and cannot "
            "see the others to choose a subset; leave both unset for a scale-out run"
        )
    names = task_share(manifest_sources(cfg.manifest or ""), *task)
    log.info("task %d of %d: %d archives: %s", task[0], task[1], len(names), " ".join(names))
    shards = join(run_uri, "shards") if run_uri else None
    published: dict[str, str | None] = {}

    def publish(ctx: RunContext, which: list[str]) -> None:
        if shards:
            result = cloud_sync.push_dir(
                ctx.layout.work, shards, include=ctx.layout.shard_files(ctx.model_key, which)
            )
            log.debug("published: %s", result.summary("pushed"))

    def on_start(ctx: RunContext) -> None:
        if not run_uri or not shards:
            return
        claim(run_uri, {**run_settings(cfg), "model_key": ctx.model_key}, create=True)
        if cloud_sync.exists(shards):
            result = cloud_sync.pull_dir(
                shards, ctx.layout.work, include=ctx.layout.shard_files(ctx.model_key, names)
            )
            log.info("restored shards from %s: %s", shards, result.summary("pulled"))
        for n in names:
            marker = ctx.layout.index_marker(n, None)
            published[n] = marker["digest"] if marker else None

    def after_index(ctx: RunContext, indexed: list[str]) -> None:
        # A re-downloaded archive is indexed again; its shards are only valid if its content is the same.
        for n in indexed:
            if published.get(n) and ctx.markers[n]["digest"] != published[n]:
                raise ResumeRefused(
                    f"archive {n} differs from the one this run's shards were made from; "
                    "restore the original archive or start a new run id"
                )
        publish(ctx, indexed)

    def chunk(ctx: RunContext, work: Work) -> None:
        publish(ctx, [work.name])  # from the writer thread: seconds after it is on disk

    def finished(ctx: RunContext) -> None:
        publish(ctx, names)

    hooks = Hooks(
        on_start=on_start, after_index=after_index, on_chunk=chunk, on_store_done=chunk, on_finish=finished
    )
    return pipeline.execute(cfg, fresh=fresh, mode="worker", task=task, follow=follow, hooks=hooks, stop=stop)


def wait_for_shards(layout: Layout, run_uri: str, model_key: str, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    shards = join(run_uri, "shards")
    while True:
        present = {o.name for o in cloud_sync.list_objects(shards)} if cloud_sync.exists(shards) else set()
        stores = layout.stores_committed(model_key, present)
        missing = [n for n in names if n not in stores or layout.rel(layout.shard_marker(n)) not in present]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise InputError(
                f"{shards}: {len(missing)} of {len(names)} archives have no complete shard yet: "
                f"{' '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"
            )
        log.info("waiting for %d archives' shards (%s ...)", len(missing), " ".join(missing[:5]))
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def merge(
    cfg: DataConfig, run_uri: str | None, timeout_s: float, fresh: bool, stop: threading.Event | None = None
) -> int:
    names = manifest_sources(cfg.manifest or "")
    model_key = ""
    if run_uri:
        run = claim(run_uri, {k: v for k, v in run_settings(cfg).items() if k != "model_spec"}, create=False)
        model_key = str(run["model_key"])
        layout = Layout(cfg)
        ownership.check_apart_from_input(cfg, layout)
        ownership.check_work_folder(layout)
        wait_for_shards(layout, run_uri, model_key, names, timeout_s)
        ownership.claim_work_folder(layout)  # the pull writes into it: it must be the engine's
        result = cloud_sync.pull_dir(
            join(run_uri, "shards"), layout.work, include=layout.shard_files(model_key, names)
        )
        log.info("pulled shards: %s", result.summary("pulled"))
    else:
        model_key = _local_model_key(cfg)
    return pipeline.execute(cfg, fresh=fresh, mode="merge", model_key=model_key, stop=stop)


def _local_model_key(cfg: DataConfig) -> str:
    """Without a run folder, the work folder's only model key (the workers shared it)."""
    keys = sorted(p.parent.name for p in Layout(cfg).emb_root.glob("*/model.json"))
    if len(keys) != 1:
        raise ConfigError(f"{Layout(cfg).emb_root}: expected the embeddings of one model, found {len(keys)}")
    return keys[0]


def main(
    cfg: DataConfig,
    args: argparse.Namespace,
    task: tuple[int, int] | None,
    stop: threading.Event | None = None,
) -> int:
    setup_logging()
    try:
        if args.merge:
            return merge(cfg, args.run_uri, args.wait_timeout_s, args.fresh, stop)
        assert task is not None
        return worker(cfg, args.run_uri, task, args.fresh, args.follow, stop)
    except (ConfigError, ResumeRefused, InputError) as exc:
        log.error("%s", exc)
        return exc.code
