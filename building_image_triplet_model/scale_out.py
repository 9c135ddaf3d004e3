"""Scale-out: N workers each embed their share of the archives; a merge builds the one artifact.

A run lives under one folder ``RUN_URI`` (``gs://bucket/checkpoints/RUN_ID`` or a local path):

    RUN_URI/run_settings.json                 the settings fingerprint every worker and the merge must match
    RUN_URI/shards/index/<source>.npz|.json   a source's index shard (marker .json sent after the data)
    RUN_URI/shards/emb/<source>/<a>-<b>.npz   its embedding chunks, published as they are written
    RUN_URI/shards/emb/<source>/_SUCCESS.json the source's commit marker, sent last

A worker (``--task-index I --task-count N``, or TASK_INDEX/TASK_COUNT, or Cloud Batch's
BATCH_TASK_INDEX/BATCH_TASK_COUNT) first restores its own sources' shards from RUN_URI (a retried task on a
fresh VM continues), then indexes and embeds only them. The merge (``--merge``, CPU only, no archives
needed) waits for every source of the manifest, pulls the shards and runs the usual plan, KNN and
assembly steps: the artifact equals a single run's over the same archives.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

from . import cloud_sync, pipeline, workdir
from .config import ConfigError, DataConfig
from .progress import setup_logging

log = logging.getLogger(__name__)

SETTINGS_NAME = "run_settings.json"
POLL_S = 30.0


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def claim_settings(cfg: DataConfig, run_uri: str, create: bool) -> None:
    """Create the run's settings record, or check ours against it; ResumeRefused when they differ."""
    record = pipeline.new_run_record(cfg)
    uri = join(run_uri, SETTINGS_NAME)
    if create:
        try:
            cloud_sync.write_text(uri, json.dumps(record, indent=1, sort_keys=True), if_generation_match=0)
            log.info("created run settings %s", uri)
            return
        except FileExistsError:
            pass
    try:
        theirs = json.loads(cloud_sync.read_text(uri))
    except FileNotFoundError:
        raise ConfigError(f"--run-uri {run_uri}: no such run ({SETTINGS_NAME} is missing)") from None
    if theirs.get("settings_fp") != record["settings_fp"]:
        old, settings = theirs.get("settings", {}), record["settings"]
        details = ", ".join(
            f"{k}: run has {old.get(k)!r}, this worker {settings.get(k)!r}" for k in cfg.changed_settings(old)
        )
        raise pipeline.ResumeRefused(
            f"{run_uri}: this process's settings differ from the run's ({details}); refusing to join. "
            "Use the run's config, or start a new run id"
        )


def _source_filters(names: list[str]) -> list[str]:
    out = []
    for n in names:
        out += [f"index/{n}.npz", f"index/{n}.json", f"emb/{n}/*"]
    return out


def adopt_settings(cfg: DataConfig, run_uri: str) -> None:
    """Shards pulled from the run are trusted locally: claim_settings checked they share our settings."""
    if not (cfg.work / "run.json").exists():
        workdir.write_json(cfg.work / "run.json", {**pipeline.new_run_record(cfg), "shards_from": run_uri})


def restore(run_uri: str, cfg: DataConfig, names: list[str]) -> None:
    shards = join(run_uri, "shards")
    if not cloud_sync.exists(shards):
        return
    result = cloud_sync.pull_dir(shards, cfg.work, include=_source_filters(names))
    log.info("restored shards from %s: %s", shards, result.summary("pulled"))
    adopt_settings(cfg, run_uri)


def publish(run_uri: str, cfg: DataConfig, names: list[str]) -> None:
    result = cloud_sync.push_dir(cfg.work, join(run_uri, "shards"), include=_source_filters(names))
    log.debug("published: %s", result.summary("pushed"))


def worker(
    cfg: DataConfig,
    run_uri: str | None,
    task: tuple[int, int],
    fresh: bool,
    stop: threading.Event | None = None,
) -> int:
    """Index and embed this task's archives, publishing shards to run_uri as they complete."""
    if cfg.manifest is None:
        raise ConfigError("data.manifest: a scale-out worker needs the run's manifest to know its share")
    from .work_split import manifest_sources, task_share

    names = task_share(manifest_sources(cfg.manifest), *task)
    log.info("task %d of %d: %d archives: %s", task[0], task[1], len(names), " ".join(names))
    if run_uri:
        claim_settings(cfg, run_uri, create=True)
        restore(run_uri, cfg, names)
    published = {n: (workdir.read_json(cfg.work / "index" / f"{n}.json") or {}).get("digest") for n in names}

    def after_index() -> None:
        # A re-downloaded archive is indexed again; its embeddings are only valid if its content is the same.
        for n in names:
            now = (workdir.read_json(cfg.work / "index" / f"{n}.json") or {}).get("digest")
            if published[n] and now != published[n]:
                raise pipeline.ResumeRefused(
                    f"archive {n} differs from the one this run's shards were made from; "
                    "restore the original archive or start a new run id"
                )
        if run_uri:
            publish(run_uri, cfg, names)

    def hooks(runner: pipeline.Runner) -> None:
        runner.after_index = after_index
        if run_uri:
            # Publishing from the writer thread: a chunk reaches the bucket seconds after it is on disk.
            runner.on_chunk = lambda work, a, b: publish(run_uri, cfg, [work.name])
            runner.on_source_published = lambda name: publish(run_uri, cfg, [name])

    code = pipeline.execute(cfg, fresh=fresh, task=pipeline.Task(*task), stop=stop, hooks=hooks)
    if code == pipeline.EXIT_OK and run_uri:
        publish(run_uri, cfg, names)
    return code


def wait_for_shards(run_uri: str, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    shards = join(run_uri, "shards")
    while True:
        present = {o.name for o in cloud_sync.list_objects(shards)} if cloud_sync.exists(shards) else set()
        missing = [
            n
            for n in names
            if f"emb/{n}/{workdir.SUCCESS}" not in present or f"index/{n}.json" not in present
        ]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise pipeline.InputError(
                f"{shards}: {len(missing)} of {len(names)} archives have no complete shard yet: "
                f"{' '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"
            )
        log.info("waiting for %d archives' shards (%s ...)", len(missing), " ".join(missing[:5]))
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def merge(
    cfg: DataConfig, run_uri: str | None, timeout_s: float, fresh: bool, stop: threading.Event | None = None
) -> int:
    if cfg.manifest is None:
        raise ConfigError("data.manifest: the merge needs the run's manifest to know every archive")
    from .work_split import manifest_sources

    names = manifest_sources(cfg.manifest)
    if run_uri:
        claim_settings(cfg, run_uri, create=False)
        wait_for_shards(run_uri, names, timeout_s)
        result = cloud_sync.pull_dir(join(run_uri, "shards"), cfg.work, include=_source_filters(names))
        log.info("pulled shards: %s", result.summary("pulled"))
        adopt_settings(cfg, run_uri)
    return pipeline.execute(cfg, fresh=fresh, merge=True, stop=stop)


def main(
    cfg: DataConfig,
    args: argparse.Namespace,
    task: tuple[int, int] | None,
    stop: threading.Event | None = None,
) -> int:
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg.log_path, events_file=cfg.work / "events.jsonl")
    try:
        if args.merge:
            return merge(cfg, args.run_uri, args.wait_timeout_s, args.fresh, stop)
        assert task is not None
        return worker(cfg, args.run_uri, task, args.fresh, stop)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return pipeline.EXIT_CONFIG
    except pipeline.ResumeRefused as exc:
        log.error("%s", exc)
        return pipeline.EXIT_REFUSED
    except pipeline.InputError as exc:
        log.error("input error: %s", exc)
        return pipeline.EXIT_INPUT
