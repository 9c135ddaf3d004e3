"""The command line: push|pull|cp|ls|cat|put|exists; exit 0 ok, 1 failed, 2 usage, 3 not found, 4 exists."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from building_image_triplet_model.remote.cloud_sync.locations import CloudSyncError, is_gcs, local_path
from building_image_triplet_model.remote.cloud_sync.objects import (
    download_file,
    exists,
    list_objects,
    read_text,
    upload_file,
    write_text,
)
from building_image_triplet_model.remote.cloud_sync.sync import (
    DEFAULT_EXCLUDES,
    DEFAULT_MARKERS,
    pull_dir,
    push_dir,
)


def _log_err(msg: str) -> None:
    print(f"cloud_sync: {msg}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.remote.cloud_sync",
        description="Incremental, verified sync between local folders and gs:// (or a local folder standing "
        "in for a bucket). Exit: 0 ok, 1 transfer failed, 2 usage, 3 not found, 4 exists (--if-absent).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)  # the flags push and pull share
    a = common.add_argument
    a(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only files matching GLOB (repeatable; a GLOB without '/' matches any path component)",
    )
    a("--exclude", action="append", default=[], metavar="GLOB", help="skip files matching GLOB")
    a(
        "--marker",
        action="append",
        metavar="GLOB",
        help=f"commit-marker file names, sent last (default: {' '.join(DEFAULT_MARKERS)})",
    )
    a("--no-default-excludes", action="store_true", help=f"also send {' '.join(DEFAULT_EXCLUDES)}")
    a("--jobs", type=int, default=8, help="parallel transfers (default 8)")
    a("--dry-run", action="store_true", help="only say what would be transferred")
    a("--json", action="store_true", help="print the result as JSON on stdout")
    a("-v", "--verbose", action="store_true", help="name every file transferred")
    loc = "gs://bucket/prefix or a local folder standing in for a bucket"
    p = sub.add_parser("push", parents=[common], help="send a local folder to a location (markers last)")
    p.add_argument("src", help="local folder")
    p.add_argument("dest", help=loc)
    p.add_argument("--max-size", type=int, metavar="BYTES", help="leave bigger files behind (then no marker)")
    p.add_argument("--delete", action="store_true", help="delete objects that no longer exist locally")
    p = sub.add_parser("pull", parents=[common], help="fetch a location into a local folder (markers last)")
    p.add_argument("src", help=loc)
    p.add_argument("dest", help="local folder")
    p.add_argument("--into-empty", action="store_true", help="refuse unless the local folder holds no file")
    p = sub.add_parser("cp", help="copy one file: local -> location, location -> local (verified)")
    p.add_argument("src")
    p.add_argument("dest", help="ending in '/' means 'into this folder'")
    p.add_argument("--if-absent", action="store_true", help="only if the object does not exist (exit 4)")
    p.add_argument("--json", action="store_true", help="print the copy's size and crc32c as JSON")
    p = sub.add_parser("ls", help="list objects under a location")
    p.add_argument("uri")
    p.add_argument("-l", "--long", action="store_true", help="size, crc32c and mtime too")
    p.add_argument("--json", action="store_true")
    sub.add_parser("cat", help="print one object").add_argument("uri")
    p = sub.add_parser("put", help="write stdin to one object")
    p.add_argument("uri")
    p.add_argument("--if-absent", action="store_true", help="only if the object does not exist (exit 4)")
    sub.add_parser("exists", help="exit 0 when an object or non-empty folder exists").add_argument("uri")
    return ap


def _sync(args: argparse.Namespace) -> int:
    markers = tuple(args.marker) if args.marker is not None else DEFAULT_MARKERS
    kw: dict[str, Any] = dict(
        include=args.include,
        exclude=args.exclude,
        markers=markers,
        jobs=args.jobs,
        default_excludes=not args.no_default_excludes,
        dry_run=args.dry_run,
        log=_log_err if args.verbose else None,
    )
    try:
        if args.cmd == "push":
            res = push_dir(args.src, args.dest, max_size=args.max_size, delete=args.delete, **kw)
        else:
            res = pull_dir(args.src, args.dest, into_empty=args.into_empty, **kw)
    except CloudSyncError as e:
        if args.json and e.result is not None:
            print(json.dumps(asdict(e.result)))
        _log_err(str(e))
        return 1
    _log_err(res.summary(args.cmd + (" (dry run)" if args.dry_run else "")))
    if args.json:
        print(json.dumps(asdict(res)))
    return 0


def _cp(args: argparse.Namespace) -> int:
    gen = 0 if args.if_absent else None
    if is_gcs(args.src) and not is_gcs(args.dest):
        info = download_file(args.src, args.dest)
    elif not is_gcs(args.src):
        if not local_path(args.src).is_file():
            _log_err(f"cp: {args.src}: no such file")
            return 3
        info = upload_file(local_path(args.src), args.dest, if_generation_match=gen)
    else:
        with tempfile.TemporaryDirectory() as td:
            download_file(args.src, Path(td) / "obj")
            info = upload_file(Path(td) / "obj", args.dest, if_generation_match=gen)
    _log_err(f"cp: {args.src} -> {args.dest} ({info.size} bytes, crc32c {info.crc32c})")
    if args.json:
        print(json.dumps(asdict(info)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd in ("push", "pull"):
            return _sync(args)
        if args.cmd == "cp":
            return _cp(args)
        if args.cmd == "exists":
            return 0 if exists(args.uri) else 1
        if args.cmd == "cat":
            sys.stdout.write(read_text(args.uri))
        elif args.cmd == "put":
            write_text(args.uri, sys.stdin.read(), if_generation_match=0 if args.if_absent else None)
        elif args.json:
            print(json.dumps([asdict(o) for o in list_objects(args.uri)]))
        else:
            for o in list_objects(args.uri):
                print(f"{o.size}\t{o.crc32c or '-'}\t{o.mtime_ns or '-'}\t{o.key}" if args.long else o.key)
        return 0
    except FileExistsError as e:
        _log_err(f"{args.cmd}: exists: {e}")
        return 4
    except FileNotFoundError as e:
        _log_err(f"{args.cmd}: not found: {e}")
        return 3
    except (CloudSyncError, OSError) as e:
        _log_err(f"{args.cmd}: {e}")
        return 1
    except Exception as e:  # google.api_core errors and the like: a clear one-line message, exit 1
        _log_err(f"{args.cmd}: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
