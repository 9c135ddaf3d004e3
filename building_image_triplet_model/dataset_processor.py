"""Turn 3D Street View archives into the HDF5 training artifact.

    python -m building_image_triplet_model.dataset_processor --config config.yaml

Resumable: run the same command again after any interruption and it continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import threading

from . import config as config_mod
from . import pipeline
from .work_split import task_from_env

EPILOG = f"""exit codes:
  {pipeline.EXIT_OK}   complete
  {pipeline.EXIT_ERROR}   unexpected error (see the log)
  {pipeline.EXIT_CONFIG}   configuration or usage error
  {pipeline.EXIT_INPUT}   input error (missing input_dir, unreadable archive, no valid pair)
  {pipeline.EXIT_REFUSED}   resume refused: settings or inputs differ from the existing run (use --fresh)
  {pipeline.EXIT_LOCKED}   another processor is running on this output
  {pipeline.EXIT_MODEL}   the model or its pretrained weights could not be loaded
  {pipeline.EXIT_INTERRUPTED}  interrupted (SIGTERM/SIGINT): progress is saved, run again
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.dataset_processor",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="YAML file with a data: section (see the README)")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="discard the existing output and its work folder (index shards are kept) and start over",
    )
    ap.add_argument("--task-index", type=int, help="scale-out worker: this task's index (or TASK_INDEX)")
    ap.add_argument("--task-count", type=int, help="scale-out worker: number of tasks (or TASK_COUNT)")
    ap.add_argument("--merge", action="store_true", help="scale-out: merge every worker's shards")
    ap.add_argument(
        "--run-uri",
        help="scale-out: the run's folder (gs://bucket/prefix/RUN_ID or a local path) workers publish to",
    )
    ap.add_argument("--wait-timeout-s", type=float, default=0, help="--merge: wait this long for all shards")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return pipeline.EXIT_CONFIG
    task = None
    if args.task_index is not None or args.task_count is not None:
        if args.task_index is None or args.task_count is None:
            print("--task-index and --task-count go together", file=sys.stderr)
            return pipeline.EXIT_CONFIG
        task = (args.task_index, args.task_count)
    elif not args.merge:
        task = task_from_env()
    stop = threading.Event()
    pipeline.install_signal_handlers(stop)
    if task is not None or args.merge:
        from . import scale_out

        return scale_out.main(cfg, args, task, stop)
    return pipeline.execute(cfg, fresh=args.fresh, stop=stop)


if __name__ == "__main__":
    raise SystemExit(main())
