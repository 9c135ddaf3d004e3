"""The command line, as small as what the bash scripts call: ``cp SRC DEST`` (one verified file).

Folders are pushed and pulled by Python (vm/checkpoint.py, scale-out) through :mod:`.sync`, never from bash.
Exit: 0 copied, 1 the transfer failed, 2 usage, 3 not found.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from building_image_triplet_model.remote.cloud_sync.locations import CloudSyncError, is_gcs, local_path
from building_image_triplet_model.remote.cloud_sync.objects import download_file, upload_file


def _log_err(msg: str) -> None:
    print(f"cloud_sync: {msg}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="triplet-sync",
        description="Copy one file between a local path and gs:// (or a local folder standing in for a "
        "bucket), verified by CRC32C. Exit: 0 ok, 1 transfer failed, 2 usage, 3 not found.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cp", help="copy one file: local -> location, location -> local (verified)")
    p.add_argument("src")
    p.add_argument("dest", help="ending in '/' means 'into this folder'")
    return ap


def _cp(src: str, dest: str) -> int:
    if is_gcs(src) and not is_gcs(dest):
        info = download_file(src, dest)
    elif not is_gcs(src):
        if not local_path(src).is_file():
            _log_err(f"cp: {src}: no such file")
            return 3
        info = upload_file(local_path(src), dest)
    else:
        with tempfile.TemporaryDirectory() as td:
            download_file(src, Path(td) / "obj")
            info = upload_file(Path(td) / "obj", dest)
    _log_err(f"cp: {src} -> {dest} ({info.size} bytes, crc32c {info.crc32c})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _cp(args.src, args.dest)
    except FileNotFoundError as e:
        _log_err(f"cp: not found: {e}")
        return 3
    except (CloudSyncError, OSError) as e:
        _log_err(f"cp: {e}")
        return 1
    except Exception as e:  # google.api_core errors and the like: a clear one-line message, exit 1
        _log_err(f"cp: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
