"""The download phase's bookkeeping (download_archives.sh calls it): which entries are complete, aria2c's
input, and the commit of a finished file.

Files are downloaded into a staging folder, ``<raw dir>/.triplet-downloads/partial/<out>`` (aria2c's
partial file and control file stay there between attempts), and moved to ``<raw dir>/<out>`` only once
aria2c has finished (no ``.aria2`` left) and, for a ``.tar``, it reads whole as the index reads it
(``sources.check_archive``). So the archive folder only ever holds complete archives, and the engine may read
each one the moment it appears (``--follow``). A record of the size and mtime of every committed file
(``.triplet-downloads/<out>.json``) lets later runs skip it without reading it again.

    python -m building_image_triplet_model.vm.downloads status MANIFEST RAW_DIR --repo-root R
    python -m building_image_triplet_model.vm.downloads aria2-input MANIFEST OUTPUT OUT... --repo-root R
    python -m building_image_triplet_model.vm.downloads commit RAW_DIR OUT URI
    python -m building_image_triplet_model.vm.downloads summary MANIFEST RAW_DIR OUT.json --before N ...

Exit codes: 0 ok; 1 no (not complete, a truncated download, or committed already by the other caller: the
message says why); 2 usage or bad manifest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from building_image_triplet_model.inputs import manifest, sources
from building_image_triplet_model.io import durable, locks
from building_image_triplet_model.io.progress import utc_now

from ..errors import InputError

STATE = ".triplet-downloads"
STAGING = f"{STATE}/partial"


def record_path(raw: Path, out: str) -> Path:
    return raw / STATE / f"{out}.json"


def staged(raw: Path, out: str) -> Path:
    return raw / STAGING / out


def complete(raw: Path, out: str) -> tuple[bool, str]:
    dest = raw / out
    if not dest.is_file():
        return False, "missing"
    try:
        rec = durable.read_json(record_path(raw, out))
    except durable.CorruptFileError:
        rec = None
    st = dest.stat()
    if not rec:
        return False, "no completion record"
    if rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns:
        return False, "changed since it was verified"
    return True, "complete"


def verify(path: Path) -> str | None:
    """Why ``path`` is not a complete download, or None."""
    if Path(f"{path}.aria2").exists():
        return "aria2c control file present (unfinished)"
    if path.suffix == ".tar":
        try:
            sources.check_archive(path)
        except InputError as exc:
            return f"not a complete tar: {exc}"
    return None


def commit(raw: Path, out: str, uri: str) -> str | None:
    """Move a finished staged file into place and record it; the reason when it is not finished."""
    src = staged(raw, out)
    dest = raw / out
    if not src.is_file():
        return "nothing downloaded"
    lock_path = raw / STATE / f"{out}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # aria2c's completion hook and download_archives.sh may commit the same file at the same moment (aria2c
    # does not wait for its hooks): one at a time, so that the record is there whenever the file is.
    lock = locks.acquire(lock_path, wait=True)
    try:
        if not src.is_file():
            return "already committed" if complete(raw, out)[0] else "nothing downloaded"
        why = verify(src)
        if why:
            return why
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)  # same file system: the archive appears whole or not at all
        durable.fsync_dir(dest.parent)
        st = dest.stat()
        durable.write_json(
            record_path(raw, out),
            {
                "uri": uri,
                "out": out,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "verified_at": utc_now(),
            },
        )
    finally:
        if lock is not None:
            os.close(lock)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m building_image_triplet_model.vm.downloads")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="one TSV line per entry: status kind uri out src reason")
    p.add_argument("manifest")
    p.add_argument("raw_dir", type=Path)
    p.add_argument("--repo-root", type=Path, required=True)
    p = sub.add_parser("aria2-input", help="aria2c's input for some entries, into the staging folder")
    p.add_argument("manifest")
    p.add_argument("output", type=Path)
    p.add_argument("outs", nargs="*")
    p.add_argument("--repo-root", type=Path, required=True)
    p = sub.add_parser("summary", help="the phase's summary (JSON): entries, complete, missing, bytes")
    p.add_argument("manifest")
    p.add_argument("raw_dir", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--repo-root", type=Path, required=True)
    p.add_argument("--before", type=int, default=0, help="entries complete when the phase started")
    p.add_argument("--downloaded", type=int, default=0, help="entries this phase completed")
    p = sub.add_parser("commit", help="verify a staged file, move it into place, record it")
    p.add_argument("raw_dir", type=Path)
    p.add_argument("out")
    p.add_argument("uri", nargs="?", default="", help="recorded with it (informational)")
    args = ap.parse_args(argv)
    if args.cmd == "commit":
        why = commit(args.raw_dir, args.out, args.uri)
        if why:
            print(f"{args.out}: {why}", file=sys.stderr)
            return 1
        return 0
    try:
        entries = manifest.load(args.manifest, args.repo_root)
    except manifest.ManifestError as exc:
        print(f"manifest: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "status":
        for e in entries:
            ok, why = complete(args.raw_dir, e.out)
            print("\t".join(["complete" if ok else "pending", e.kind, e.uri, e.out, e.src or "-", why]))
        return 0
    if args.cmd == "summary":
        missing = [e.uri for e in entries if not complete(args.raw_dir, e.out)[0]]
        on_disk = sum(f.stat().st_size for e in entries if (f := args.raw_dir / e.out).is_file())
        durable.write_json(
            args.output,
            {
                "entries": len(entries),
                "already_complete": args.before,
                "downloaded": args.downloaded,
                "failed": len(missing),
                "bytes_on_disk": on_disk,
                "missing": missing,
            },
        )
        return 0
    wanted = [e for e in entries if e.out in set(args.outs)]
    durable.write_bytes(args.output, manifest.render(wanted, out_prefix=f"{STAGING}/").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
