"""The commands: ``triplet-process`` (turn 3D Street View archives into the HDF5 training artifact) and
``triplet-status`` (what is done and what remains, read-only).

    triplet-process --config config.yaml   # python -m building_image_triplet_model.dataset_processor
    triplet-status --config config.yaml    # python -m building_image_triplet_model.preprocess_resume

Resumable and incremental: run the same command again after any interruption and it continues where it
stopped; run it with other settings or more archives and it redoes only what they change (embeddings are
reused whenever the model and the archive are the same).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

from building_image_triplet_model import config as config_mod
from building_image_triplet_model import exit_codes
from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.inputs.work_split import task_from_env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.dataset_processor",
        description=__doc__.split("\n\n")[0],
        epilog=exit_codes.help_table(exit_codes.PROCESSOR_CODES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="YAML file with a data: section (see the README)")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="discard the artifact, plan, KNN tables and index (every archive is indexed again) and start "
        "over; embeddings are kept and reused where the model and the archive are the same",
    )
    ap.add_argument(
        "--discard-embeddings", action="store_true", help="--fresh, and discard the embeddings too"
    )
    ap.add_argument(
        "--follow",
        action="store_true",
        help="the archives of data.manifest are still arriving (a download runs): index, and embed, each one "
        "when it appears in input_dir; plan, KNN and the artifact once all are there",
    )
    ap.add_argument("--task-index", type=int, help="scale-out worker: this task's index (or TASK_INDEX)")
    ap.add_argument("--task-count", type=int, help="scale-out worker: number of tasks (or TASK_COUNT)")
    ap.add_argument("--merge", action="store_true", help="scale-out: merge every worker's shards")
    ap.add_argument(
        "--run-uri",
        help="scale-out: the run's folder (gs://bucket/prefix/RUN_ID or a local path) workers publish to",
    )
    ap.add_argument(
        "--wait-timeout-s",
        type=float,
        default=0,
        help="--merge: wait this long for every worker's shards; --follow: for the archives (0: forever)",
    )
    return ap.parse_args(argv)


def worker_task(args: argparse.Namespace) -> tuple[int, int] | None:
    """(index, count) of a scale-out worker, or None for a plain run. A worker publishes to its run folder,
    so a run is one only where --run-uri is given: TASK_INDEX/BATCH_TASK_INDEX left in the environment of
    a plain run (a shell, a Batch VM running something else) never make it one. ValueError names bad
    numbers."""
    if args.task_index is not None or args.task_count is not None:
        if args.task_index is None or args.task_count is None:
            raise ValueError("--task-index and --task-count go together")
        task: tuple[int, int] | None = (args.task_index, args.task_count)
        source = "--task-index/--task-count"
    elif args.merge or not args.run_uri:
        return None
    else:
        task, source = task_from_env(), "TASK_INDEX/TASK_COUNT"
        if task is None:
            return None
    assert task is not None
    if not args.run_uri:
        raise ValueError(f"{source}: a scale-out worker needs its run folder (--run-uri)")
    if args.merge:
        raise ValueError(f"{source}: --merge is no worker")
    index, count = task
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{source}: task {index} of {count} is not in [0, {count})")
    return task


def load_config(path: str) -> config_mod.DataConfig | None:
    """The config, or None after one line on stderr (both commands exit Exit.CONFIG then)."""
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return None


def process(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config)
    if cfg is None:
        return Exit.CONFIG
    try:
        task = worker_task(args)
    except ValueError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return Exit.CONFIG
    if (args.follow or task is not None) and not cfg.manifest:
        print(
            "configuration error: data.manifest: --follow and scale-out workers need the run's manifest",
            file=sys.stderr,
        )
        return Exit.CONFIG
    # imported here: triplet-status shares this module and imports no torch
    from building_image_triplet_model.engine import pipeline

    stop = threading.Event()
    pipeline.install_signal_handlers(stop)
    if task is not None or args.merge:
        from building_image_triplet_model.engine import scale_out

        return scale_out.main(cfg, args, task, stop)
    return pipeline.execute(
        cfg,
        fresh=args.fresh,
        discard_embeddings=args.discard_embeddings,
        follow=args.follow,
        follow_timeout_s=args.wait_timeout_s,
        stop=stop,
    )


def status(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.preprocess_resume",
        description="Report what the processor has done and what remains (read-only).",
        epilog=exit_codes.help_table(exit_codes.STATUS_CODES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="the processor's YAML config")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--html", metavar="FILE", help="also write a one-page picture of the run (HTML with SVG)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if cfg is None:
        return Exit.CONFIG
    # imported here: the status command imports no torch, and the processor needs no report
    from building_image_triplet_model.report import status as status_mod

    report = status_mod.collect(cfg)
    print(json.dumps(report, indent=1) if args.json else status_mod.render(report))
    if args.html:
        from building_image_triplet_model.report import report_page

        print(f"wrote {report_page.write(cfg, report, args.html, args.config)}")
    return Exit.OK if report["complete"] else Exit.WORK_REMAINS
