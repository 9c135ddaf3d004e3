"""Incremental push/pull between a local folder and Cloud Storage (or a local folder standing in for one).

A *location* is either ``gs://bucket/prefix`` or a local path (``/abs/path``, ``rel/path`` or ``file:///abs/path``)
that stands in for a bucket in dry runs and tests. Objects of a local location are plain files under it.

Guarantees:

* **Incremental.** A file is sent again only when it differs: first by size plus the source mtime recorded in
  the object's metadata (no hashing), then by size plus CRC32C (the checksum Cloud Storage keeps).
* **Never partial files.** ``*.tmp``, ``*.partial``, ``*.part``, ``*.aria2``, lock files... are never sent
  (see :data:`DEFAULT_EXCLUDES`); downloads go to a temporary name and are renamed when verified.
* **Commit markers last.** Files matching the marker globs (``_SUCCESS.json`` by default) are *read when the
  sync starts, before the data files are listed*, and sent only after every data file was sent. A reader that
  sees a marker therefore also sees the data the marker describes, and a marker is never sent when a data file
  failed.
* **Verified.** Every upload checks size and CRC32C of what the bucket holds against the bytes read; every
  download checks them against the object.

Python API: :func:`push_dir`, :func:`pull_dir`, :func:`upload_file`, :func:`download_file`, :func:`exists`,
:func:`read_text`, :func:`write_text` (``if_generation_match=0``: create only), :func:`list_objects`.
Command line: ``python -m building_image_triplet_model.cloud_sync push|pull|cp|ls|cat|put|exists --help``.

Importing this module is cheap: ``google.cloud.storage`` is imported only when a ``gs://`` location is used
(``STORAGE_EMULATOR_HOST`` works, with anonymous credentials).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DEFAULT_EXCLUDES",
    "DEFAULT_MARKERS",
    "ChecksumMismatchError",
    "CloudSyncError",
    "ObjectInfo",
    "SyncResult",
    "crc32c_of_file",
    "download_file",
    "exists",
    "list_objects",
    "pull_dir",
    "push_dir",
    "read_text",
    "upload_file",
    "write_text",
]

#: Never transferred (matched against the file name and every parent folder name).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "*.tmp",
    "*.tmp.*",
    ".*.tmp",
    "*.partial",
    "*.part",
    "*.aria2",
    "*.lock",
    "lock",
    "*.swp",
    "*~",
    ".nfs*",
)
#: Commit markers (matched against the file name): read first, sent last. Every ``*.json`` counts: the
#: engine's ``_SUCCESS.json`` and per-source ``index/<source>.json``, the bootstrap's ``state/<phase>.json``.
DEFAULT_MARKERS: tuple[str, ...] = ("*.json", "_SUCCESS")
#: Markers bigger than this are treated as data (they are held in memory between listing and upload).
MARKER_MAX_BYTES = 4 * 1024 * 1024

_META_MTIME = "triplet-src-mtime-ns"
_META_SIZE = "triplet-src-size"
_META_GOOG_MTIME = "goog-reserved-file-mtime"  # what gcloud storage rsync reads (seconds)
_CHUNK = 8 * 1024 * 1024
_RESUMABLE_CHUNK = 32 * 1024 * 1024


class CloudSyncError(RuntimeError):
    """A transfer failed; the message names the file or object."""


class ChecksumMismatchError(CloudSyncError):
    """What arrived differs (size or CRC32C) from what was sent."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object (or one file of a local location)."""

    key: str
    size: int
    crc32c: str | None = None  # base64 of the big-endian CRC32C, as Cloud Storage reports it
    mtime_ns: int | None = None  # the source file's mtime recorded at upload (local: the file's mtime)
    generation: int | None = None

    @property
    def name(self) -> str:
        """Same as ``key`` (relative to the folder location for :func:`list_objects`)."""
        return self.key


@dataclass
class SyncResult:
    """What a push or pull did. ``transferred`` is in the order of the transfers (markers last)."""

    transferred: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    too_big: list[str] = field(default_factory=list)
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def record(
        self, outcome: tuple[str, str, int, str | None], verb: str, log: Callable[[str], None] | None
    ) -> None:
        """Count one file's outcome: ("skip" | "big" | "sent" | "fail", relative path, bytes, error)."""
        kind, rel, n, err = outcome
        if kind == "skip":
            self.skipped.append(rel)
        elif kind == "big":
            self.too_big.append(rel)
        elif kind == "sent":
            self.transferred.append(rel)
            self.bytes += n
            if log:
                log(f"{verb} {rel} ({n} bytes)")
        else:
            self.failed.append((rel, err or "failed"))

    def summary(self, verb: str) -> str:
        return (
            f"{verb}: {len(self.transferred)} transferred ({self.bytes} bytes), "
            f"{len(self.skipped)} unchanged, {len(self.too_big)} over the size limit, "
            f"{len(self.deleted)} deleted, {len(self.failed)} failed"
        )


# ----------------------------------------------------------------------------------------------- checksums
def _crc32c_new() -> Any:
    import google_crc32c

    return google_crc32c.Checksum()


def _b64_crc(checksum: Any) -> str:
    return base64.b64encode(checksum.digest()).decode("ascii")


def _crc32c_of_stream(f: IO[bytes], size: int | None = None) -> str:
    c = _crc32c_new()
    left = size
    while left is None or left > 0:
        block = f.read(_CHUNK if left is None else min(_CHUNK, left))
        if not block:
            break
        c.update(block)
        if left is not None:
            left -= len(block)
    if left:
        raise CloudSyncError(f"file shrank while being read ({left} bytes missing)")
    return _b64_crc(c)


def crc32c_of_file(path: str | Path) -> str:
    """Base64 CRC32C of a file, in the form Cloud Storage reports (``blob.crc32c``)."""
    with open(path, "rb") as f:
        return _crc32c_of_stream(f)


class _LimitedReader:
    """Reads exactly ``size`` bytes of ``f`` (a file may grow while it is sent: a log, for example)."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f, self._size, self._pos = f, size, 0

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        if n is None or n < 0 or n > left:
            n = left
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        target = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        self._f.seek(target)
        self._pos = target
        return target


# ------------------------------------------------------------------------------------------------ locations
def is_gcs(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("gs://")


def _split_gs(uri: str) -> tuple[str, str]:
    rest = uri[len("gs://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise CloudSyncError(f"no bucket in {uri!r}")
    return bucket, key


def _local_path(uri: str | os.PathLike[str]) -> Path:
    text = os.fspath(uri)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return Path(text)


class _Store:
    """One bucket (or one local root). Keys are '/'-separated."""

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        raise NotImplementedError

    def stat(self, key: str) -> ObjectInfo | None:
        raise NotImplementedError

    def upload_stream(
        self, f: IO[bytes], key: str, size: int, crc: str, mtime_ns: int, if_generation_match: int | None
    ) -> ObjectInfo:
        raise NotImplementedError

    def download(self, key: str, dest: Path, info: ObjectInfo | None) -> ObjectInfo:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def touch_meta(self, key: str, mtime_ns: int, size: int) -> None:
        """Record the source mtime on an object whose content already matches (best effort)."""

    def name(self, key: str) -> str:
        raise NotImplementedError


def _atomic_tmp(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_stream_to(
    f: IO[bytes], dest: Path, size: int | None, mtime_ns: int | None, create_only: bool = False
) -> str:
    """Write ``f`` to ``dest`` through a temporary name (fsync, rename); return the CRC32C written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_tmp(dest)
    c = _crc32c_new()
    try:
        with open(tmp, "wb") as out:
            left = size
            while left is None or left > 0:
                block = f.read(_CHUNK if left is None else min(_CHUNK, left))
                if not block:
                    break
                c.update(block)
                out.write(block)
                if left is not None:
                    left -= len(block)
            if left:
                raise CloudSyncError(f"source shrank while being copied to {dest}")
            out.flush()
            os.fsync(out.fileno())
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        if create_only:
            os.link(tmp, dest)  # FileExistsError when dest exists: the create-only precondition
            os.unlink(tmp)
        else:
            os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)
    return _b64_crc(c)


class _LocalStore(_Store):
    def __init__(self, root: Path) -> None:
        self.root = root

    def name(self, key: str) -> str:
        return str(self.root / key) if key else str(self.root)

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise CloudSyncError(f"refusing key with '.' or '..': {key!r}")
        return self.root.joinpath(*parts)

    def _info(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(key=key, size=st.st_size, mtime_ns=st.st_mtime_ns)

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        out: dict[str, ObjectInfo] = {}
        if base.is_file():
            out[prefix] = self._info(prefix, base)
            return out
        if not base.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.startswith(".") and fn.endswith(".tmp"):
                    continue  # our own in-flight temporary files
                p = Path(dirpath) / fn
                key = p.relative_to(self.root).as_posix()
                with contextlib.suppress(FileNotFoundError):
                    out[key] = self._info(key, p)
        return out

    def stat(self, key: str) -> ObjectInfo | None:
        p = self._path(key)
        return self._info(key, p) if p.is_file() else None

    def upload_stream(
        self, f: IO[bytes], key: str, size: int, crc: str, mtime_ns: int, if_generation_match: int | None
    ) -> ObjectInfo:
        if if_generation_match not in (None, 0):
            raise CloudSyncError("a local location supports only if_generation_match=0 (create only)")
        dest = self._path(key)
        written = _copy_stream_to(f, dest, size, mtime_ns, create_only=if_generation_match == 0)
        info = ObjectInfo(key=key, size=dest.stat().st_size, crc32c=written, mtime_ns=mtime_ns)
        if info.size != size or written != crc:
            raise ChecksumMismatchError(
                f"{self.name(key)}: wrote {info.size} bytes crc32c {written}, "
                f"expected {size} bytes crc32c {crc}"
            )
        return info

    def download(self, key: str, dest: Path, info: ObjectInfo | None) -> ObjectInfo:
        src = self._path(key)
        with open(src, "rb") as f:
            st = os.fstat(f.fileno())
            crc = _copy_stream_to(f, dest, st.st_size, st.st_mtime_ns)
        return ObjectInfo(key=key, size=st.st_size, crc32c=crc, mtime_ns=st.st_mtime_ns)

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


class _GCSStore(_Store):
    def __init__(self, bucket: str) -> None:
        self.bucket_name = bucket
        self._local = threading.local()

    def name(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{key}"

    def _bucket(self) -> Any:
        b = getattr(self._local, "bucket", None)
        if b is None:
            from google.cloud import storage  # lazy: only gs:// locations pay for it

            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(
                    project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test-project"),
                    credentials=AnonymousCredentials(),
                )
            else:
                client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)
            b = client.bucket(self.bucket_name)
            self._local.bucket = b
        return b

    @staticmethod
    def _retry() -> Any:
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY

    @staticmethod
    def _info(blob: Any) -> ObjectInfo:
        meta = blob.metadata or {}
        mtime: int | None = None
        with contextlib.suppress(TypeError, ValueError):
            mtime = int(meta.get(_META_MTIME))
        return ObjectInfo(
            key=blob.name,
            size=int(blob.size or 0),
            crc32c=blob.crc32c,
            mtime_ns=mtime,
            generation=blob.generation,
        )

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        bucket = self._bucket()
        out: dict[str, ObjectInfo] = {}
        for blob in bucket.client.list_blobs(bucket, prefix=prefix or None, retry=self._retry()):
            if blob.name.endswith("/"):
                continue  # "folder" placeholder objects
            out[blob.name] = self._info(blob)
        return out

    def stat(self, key: str) -> ObjectInfo | None:
        blob = self._bucket().get_blob(key, retry=self._retry())
        return None if blob is None else self._info(blob)

    def upload_stream(
        self, f: IO[bytes], key: str, size: int, crc: str, mtime_ns: int, if_generation_match: int | None
    ) -> ObjectInfo:
        from google.api_core import exceptions as gexc

        bucket = self._bucket()
        start = f.tell()
        last: Exception | None = None
        for attempt in range(4):
            blob = bucket.blob(key, chunk_size=_RESUMABLE_CHUNK if size > _RESUMABLE_CHUNK else None)
            blob.metadata = {
                _META_MTIME: str(mtime_ns),
                _META_SIZE: str(size),
                _META_GOOG_MTIME: str(mtime_ns // 1_000_000_000),
            }
            f.seek(start)
            try:
                blob.upload_from_file(
                    f,
                    size=size,
                    checksum="crc32c",
                    crc32c_checksum_value=crc,
                    if_generation_match=if_generation_match,
                    retry=self._retry(),
                    timeout=300,
                )
                break
            except gexc.PreconditionFailed as e:
                raise FileExistsError(f"{self.name(key)} already exists") from e
            except (gexc.ServiceUnavailable, gexc.InternalServerError, gexc.TooManyRequests,
                    gexc.BadGateway, gexc.GatewayTimeout, ConnectionError) as e:  # fmt: skip
                last = e
                time.sleep(min(30.0, 2.0**attempt))
        else:
            raise CloudSyncError(f"upload of {self.name(key)} failed: {last}")
        info = self._info(blob)
        if info.size != size or (info.crc32c is not None and info.crc32c != crc):
            raise ChecksumMismatchError(
                f"{self.name(key)}: bucket holds {info.size} bytes crc32c {info.crc32c}, "
                f"sent {size} bytes crc32c {crc}"
            )
        return info

    def download(self, key: str, dest: Path, info: ObjectInfo | None) -> ObjectInfo:
        blob = self._bucket().get_blob(key, retry=self._retry())
        if blob is None:
            raise FileNotFoundError(self.name(key))
        got = self._info(blob)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _atomic_tmp(dest)
        try:
            with open(tmp, "wb") as out:
                blob.download_to_file(out, checksum="crc32c", retry=self._retry(), timeout=300)
                out.flush()
                os.fsync(out.fileno())
            crc = crc32c_of_file(tmp)
            size = tmp.stat().st_size
            if size != got.size or (got.crc32c is not None and crc != got.crc32c):
                raise ChecksumMismatchError(
                    f"{self.name(key)}: downloaded {size} bytes crc32c {crc}, "
                    f"object has {got.size} / {got.crc32c}"
                )
            if got.mtime_ns is not None:
                os.utime(tmp, ns=(got.mtime_ns, got.mtime_ns))
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(dest.parent)
        return got

    def read_bytes(self, key: str) -> bytes:
        from google.api_core import exceptions as gexc

        try:
            return self._bucket().blob(key).download_as_bytes(checksum="crc32c", retry=self._retry())
        except gexc.NotFound as e:
            raise FileNotFoundError(self.name(key)) from e

    def delete(self, key: str) -> None:
        from google.api_core import exceptions as gexc

        with contextlib.suppress(gexc.NotFound):
            self._bucket().blob(key).delete(retry=self._retry())

    def touch_meta(self, key: str, mtime_ns: int, size: int) -> None:
        with contextlib.suppress(Exception):
            blob = self._bucket().blob(key)
            blob.metadata = {
                _META_MTIME: str(mtime_ns),
                _META_SIZE: str(size),
                _META_GOOG_MTIME: str(mtime_ns // 1_000_000_000),
            }
            blob.patch(retry=self._retry())


def _open_location(uri: str | os.PathLike[str]) -> tuple[_Store, str]:
    """(store, key) for a location: the key is the object name or the folder prefix (no trailing '/')."""
    text = os.fspath(uri)
    if is_gcs(text):
        bucket, key = _split_gs(text)
        return _GCSStore(bucket), key.strip("/")
    return _LocalStore(_local_path(text)), ""


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


# ------------------------------------------------------------------------------------------------- filters
def _match_one(rel: str, pattern: str) -> bool:
    pattern = pattern.strip()
    if not pattern:
        return False
    parts = rel.split("/")
    if "/" not in pattern.rstrip("/"):
        pat = pattern.rstrip("/")
        return any(fnmatch.fnmatchcase(p, pat) for p in parts)
    pat = pattern.rstrip("/").removeprefix("./")
    if pat.endswith("/**"):
        pat = pat[:-3]
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes)


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    return any(_match_one(rel, p) for p in patterns)


@dataclass(frozen=True)
class _Filter:
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    markers: tuple[str, ...]

    def wanted(self, rel: str) -> bool:
        if _matches(rel, self.exclude):
            return False
        return not self.include or _matches(rel, self.include)

    def is_marker(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(name, m) if "/" not in m else fnmatch.fnmatchcase(rel, m)
                   for m in self.markers)  # fmt: skip


def _make_filter(
    include: Sequence[str], exclude: Sequence[str], markers: Sequence[str], default_excludes: bool
) -> _Filter:
    ex = tuple(exclude) + (DEFAULT_EXCLUDES if default_excludes else ())
    return _Filter(tuple(include), ex, tuple(markers))


# -------------------------------------------------------------------------------------------------- push
@dataclass
class _LocalFile:
    rel: str
    path: Path
    size: int
    mtime_ns: int
    content: bytes | None = None  # markers: read when the sync starts


def _walk_local(root: Path, flt: _Filter, markers: bool) -> Iterator[_LocalFile]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if not flt.wanted(rel) or flt.is_marker(rel) != markers:
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # renamed away while we walked
            if not p.is_file():
                continue
            yield _LocalFile(rel, p, st.st_size, st.st_mtime_ns)


def _same(local_size: int, local_mtime: int, remote: ObjectInfo | None, crc: Callable[[], str]) -> bool:
    if remote is None or remote.size != local_size:
        return False
    if remote.mtime_ns is not None and remote.mtime_ns == local_mtime:
        return True
    if remote.crc32c is None:
        return False
    return crc() == remote.crc32c


def _upload_local_file(
    store: _Store, lf: _LocalFile, key: str, if_generation_match: int | None = None
) -> int:
    if lf.content is not None:
        import io

        data = lf.content
        c = _crc32c_new()
        c.update(data)
        store.upload_stream(io.BytesIO(data), key, len(data), _b64_crc(c), lf.mtime_ns, if_generation_match)
        return len(data)
    with open(lf.path, "rb") as f:
        st = os.fstat(f.fileno())
        size = lf.size if lf.size <= st.st_size else st.st_size
        crc = _crc32c_of_stream(f, size)
        f.seek(0)
        store.upload_stream(_LimitedReader(f, size), key, size, crc, st.st_mtime_ns, if_generation_match)  # type: ignore[arg-type]
    return size


def push_dir(
    src: str | os.PathLike[str],
    dest: str,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    markers: Sequence[str] = DEFAULT_MARKERS,
    default_excludes: bool = True,
    jobs: int = 8,
    max_size: int | None = None,
    delete: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
) -> SyncResult:
    """Send the files of local folder ``src`` to location ``dest`` (a folder: ``gs://b/prefix`` or a path).

    Unchanged files are skipped; markers (``markers`` globs on the file name) are read before the data files
    are listed and sent after all of them, only when every data file was sent. ``max_size`` skips bigger data
    files and then sends no marker at all. ``delete`` removes objects under ``dest`` that match the filters
    and no longer exist locally (markers first). Raises :class:`CloudSyncError` when something failed (after
    trying everything else), with the result attached as ``.result``.
    """
    root = Path(src)
    if not root.is_dir():
        raise CloudSyncError(f"push: {root} is not a folder")
    store, prefix = _open_location(dest)
    flt = _make_filter(include, exclude, markers, default_excludes)
    res = SyncResult()

    # 1. markers first (their content, as of now), 2. then the data files: a marker's data predates it.
    marker_files: list[_LocalFile] = []
    for lf in _walk_local(root, flt, markers=True):
        if lf.size > MARKER_MAX_BYTES:
            continue
        try:
            lf.content = lf.path.read_bytes()
        except FileNotFoundError:
            continue
        lf.size = len(lf.content)
        marker_files.append(lf)
    big_markers = [lf for lf in _walk_local(root, flt, markers=True) if lf.size > MARKER_MAX_BYTES]
    data_files = list(_walk_local(root, flt, markers=False)) + big_markers
    remote = _list_folder(store, prefix, include)

    def want_key(lf: _LocalFile) -> str:
        return _join(prefix, lf.rel)

    def sync_one(lf: _LocalFile) -> tuple[str, str, int, str | None]:
        key = want_key(lf)
        try:
            if lf.content is not None:
                data = lf.content

                def crc() -> str:
                    c = _crc32c_new()
                    c.update(data)
                    return _b64_crc(c)
            else:

                def crc() -> str:
                    return crc32c_of_file(lf.path)

            rinfo = remote.get(key)
            if _same(lf.size, lf.mtime_ns, rinfo, crc):
                if rinfo is not None and rinfo.mtime_ns != lf.mtime_ns and not dry_run:
                    store.touch_meta(key, lf.mtime_ns, lf.size)
                return ("skip", lf.rel, 0, None)
            if max_size is not None and lf.size > max_size:
                return ("big", lf.rel, 0, None)
            if dry_run:
                return ("sent", lf.rel, lf.size, None)
            n = _upload_local_file(store, lf, key)
            return ("sent", lf.rel, n, None)
        except Exception as e:
            return ("fail", lf.rel, 0, f"{type(e).__name__}: {e}")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for outcome in pool.map(sync_one, data_files):
            res.record(outcome, "sent", log)
    if res.failed or res.too_big:
        if res.failed:
            err = CloudSyncError(
                f"push to {store.name(prefix)}: {len(res.failed)} failed, no marker sent: "
                + "; ".join(f"{r}: {e}" for r, e in res.failed[:5])
            )
            err.result = res  # type: ignore[attr-defined]
            raise err
        # Some data files stayed behind (size limit): a marker may describe them, so none is sent.
        return res
    for lf in marker_files:
        res.record(sync_one(lf), "sent", log)
    if res.failed:
        err = CloudSyncError(
            f"push to {store.name(prefix)}: markers failed: " + "; ".join(f"{r}: {e}" for r, e in res.failed)
        )
        err.result = res  # type: ignore[attr-defined]
        raise err
    if delete:
        local_keys = {want_key(lf) for lf in [*marker_files, *data_files]}
        extra = [k for k in remote if k not in local_keys and flt.wanted(_rel_of(prefix, k))]
        extra.sort(key=lambda k: (not flt.is_marker(_rel_of(prefix, k)), k))  # markers go first
        for k in extra:
            if not dry_run:
                store.delete(k)
            res.deleted.append(_rel_of(prefix, k))
    return res


def _literal_prefix(pattern: str) -> str | None:
    """The fixed leading folders of an include pattern with a '/' (None: it may match anywhere)."""
    pat = pattern.strip().removeprefix("./")
    if "/" not in pat.rstrip("/"):
        return None
    cut = min([i for i, ch in enumerate(pat) if ch in "*?["] + [len(pat)])
    head = pat[:cut]
    return head if cut == len(pat) else head[: head.rfind("/") + 1]


def _list_folder(store: _Store, prefix: str, include: Sequence[str] = ()) -> dict[str, ObjectInfo]:
    """The objects under folder ``prefix`` (not those of a sibling that merely starts with the same text).

    When every include pattern starts with fixed folders, only those are listed (a worker publishing one
    archive's shards does not list the whole run)."""
    base = f"{prefix}/" if prefix else ""
    heads = [_literal_prefix(p) for p in include]
    if not include or any(h is None for h in heads):
        return store.list(base)
    out: dict[str, ObjectInfo] = {}
    for head in sorted(set(h for h in heads if h is not None)):
        for key, info in store.list(base + head).items():
            if key.startswith(base):
                out[key] = info
    return out


def _rel_of(prefix: str, key: str) -> str:
    return key[len(prefix) + 1 :] if prefix else key


# -------------------------------------------------------------------------------------------------- pull
def pull_dir(
    src: str,
    dest: str | os.PathLike[str],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    markers: Sequence[str] = DEFAULT_MARKERS,
    default_excludes: bool = True,
    jobs: int = 8,
    into_empty: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
) -> SyncResult:
    """Fetch the objects under location ``src`` into local folder ``dest``; unchanged local files are skipped.

    Each file is written to a temporary name, verified, fsynced and renamed; markers are fetched last, and
    only when every data file arrived. ``into_empty`` refuses to write into a folder that holds any file
    (a restore onto a fresh disk).
    """
    root = Path(dest)
    if into_empty and root.exists() and any(p.is_file() for p in root.rglob("*")):
        raise CloudSyncError(f"pull: {root} is not empty (a restore goes into an empty folder only)")
    store, prefix = _open_location(src)
    flt = _make_filter(include, exclude, markers, default_excludes)
    remote = _list_folder(store, prefix, include)
    items = []
    for key, info in remote.items():
        rel = _rel_of(prefix, key)
        if not rel:
            continue
        if any(p in ("", ".", "..") for p in rel.split("/")):
            raise CloudSyncError(f"pull: refusing object name {key!r}")
        if flt.wanted(rel):
            items.append((rel, key, info))
    data = sorted((i for i in items if not flt.is_marker(i[0])), key=lambda i: i[0])
    marks = sorted((i for i in items if flt.is_marker(i[0])), key=lambda i: i[0])
    res = SyncResult()

    def sync_one(item: tuple[str, str, ObjectInfo]) -> tuple[str, str, int, str | None]:
        rel, key, info = item
        target = root.joinpath(*rel.split("/"))
        try:
            if target.is_file():
                st = target.stat()
                if _same(st.st_size, st.st_mtime_ns, info, lambda: crc32c_of_file(target)):
                    return ("skip", rel, 0, None)
            if dry_run:
                return ("sent", rel, info.size, None)
            got = store.download(key, target, info)
            return ("sent", rel, got.size, None)
        except Exception as e:
            return ("fail", rel, 0, f"{type(e).__name__}: {e}")

    if not dry_run:
        root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for outcome in pool.map(sync_one, data):
            res.record(outcome, "fetched", log)
    if not res.failed:
        for item in marks:
            res.record(sync_one(item), "fetched", log)
    if res.failed:
        err = CloudSyncError(
            f"pull from {store.name(prefix)}: {len(res.failed)} failed (markers not fetched): "
            + "; ".join(f"{r}: {e}" for r, e in res.failed[:5])
        )
        err.result = res  # type: ignore[attr-defined]
        raise err
    return res


# ------------------------------------------------------------------------------------- single objects
def upload_file(
    local: str | os.PathLike[str], uri: str, *, if_generation_match: int | None = None
) -> ObjectInfo:
    """Upload one file to ``uri`` (an object name, or a folder when it ends with '/'), verified by size and
    CRC32C. ``if_generation_match=0``: only when the object does not exist yet (else
    :class:`FileExistsError`).
    """
    path = Path(local)
    if uri.endswith("/"):
        uri = uri + path.name
    store, key = _single(uri)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        crc = _crc32c_of_stream(f, st.st_size)
        f.seek(0)
        return store.upload_stream(
            _LimitedReader(f, st.st_size),  # type: ignore[arg-type]
            key,
            st.st_size,
            crc,
            st.st_mtime_ns,
            if_generation_match,
        )


def download_file(uri: str, local: str | os.PathLike[str]) -> ObjectInfo:
    """Download one object to ``local`` (a file path, or a folder when it ends with '/' or is a folder)."""
    store, key = _single(uri)
    dest = Path(local)
    if os.fspath(local).endswith("/") or dest.is_dir():
        dest = dest / key.rsplit("/", 1)[-1]
    info = store.stat(key)
    if info is None:
        raise FileNotFoundError(uri)
    return store.download(key, dest, info)


def _single(uri: str) -> tuple[_Store, str]:
    store, key = _open_location(uri)
    if isinstance(store, _LocalStore):
        p = _local_path(uri)
        return _LocalStore(p.parent), p.name
    if not key:
        raise CloudSyncError(f"no object name in {uri!r}")
    return store, key


def exists(uri: str) -> bool:
    """True when ``uri`` names an object (or file), or a folder prefix holding at least one object."""
    store, key = _open_location(uri)
    if isinstance(store, _LocalStore):
        p = _local_path(uri)
        return p.is_file() or (p.is_dir() and any(q.is_file() for q in p.rglob("*")))
    if key and store.stat(key) is not None:
        return True
    bucket = store._bucket()  # type: ignore[attr-defined]
    pfx = f"{key}/" if key else None
    return any(True for _ in bucket.client.list_blobs(bucket, prefix=pfx, max_results=1))


def stat(uri: str) -> ObjectInfo | None:
    """The object's size, CRC32C (local: not computed) and recorded mtime, or None."""
    store, key = _single(uri)
    return store.stat(key)


def read_text(uri: str, encoding: str = "utf-8") -> str:
    """The content of one object; :class:`FileNotFoundError` when it does not exist."""
    store, key = _single(uri)
    return store.read_bytes(key).decode(encoding)


def write_text(
    uri: str, text: str, *, if_generation_match: int | None = None, encoding: str = "utf-8"
) -> ObjectInfo:
    """Write one object atomically. ``if_generation_match=0`` creates it only if it does not exist yet and
    raises :class:`FileExistsError` otherwise (a create-only lock or claim)."""
    import io

    store, key = _single(uri)
    data = text.encode(encoding)
    c = _crc32c_new()
    c.update(data)
    return store.upload_stream(
        io.BytesIO(data), key, len(data), _b64_crc(c), time.time_ns(), if_generation_match
    )


def list_objects(uri: str) -> list[ObjectInfo]:
    """Every object under a folder location (keys relative to it), or the one object it names."""
    store, prefix = _open_location(uri)
    out = [
        ObjectInfo(_rel_of(prefix, key), i.size, i.crc32c, i.mtime_ns, i.generation)
        for key, i in sorted(_list_folder(store, prefix).items())
    ]
    if not out:
        single_store, key = _single(uri)
        info = single_store.stat(key)
        if info is not None:
            out.append(
                ObjectInfo(key.rsplit("/", 1)[-1], info.size, info.crc32c, info.mtime_ns, info.generation)
            )
    return out


# ------------------------------------------------------------------------------------------------------ CLI
def _log_err(msg: str) -> None:
    print(f"cloud_sync: {msg}", file=sys.stderr, flush=True)


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only files matching GLOB (repeatable; a GLOB without '/' matches any path component)",
    )
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip files matching GLOB")
    p.add_argument(
        "--marker",
        action="append",
        default=None,
        metavar="GLOB",
        help=f"commit-marker file names, sent last (default: {' '.join(DEFAULT_MARKERS)})",
    )
    p.add_argument(
        "--no-default-excludes", action="store_true", help=f"also send {' '.join(DEFAULT_EXCLUDES)}"
    )
    p.add_argument("--jobs", type=int, default=8, help="parallel transfers (default 8)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be transferred")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="name every file transferred")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.cloud_sync",
        description="Incremental, verified sync between local folders and gs:// (or a local folder "
        "standing in for a bucket). Exit: 0 ok, 1 transfer failed, 2 usage, 3 not found, "
        "4 exists (--if-absent).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("push", help="send a local folder to a location (incremental, markers last)")
    p.add_argument("src", help="local folder")
    p.add_argument("dest", help="gs://bucket/prefix or a local folder standing in for a bucket")
    _add_filters(p)
    p.add_argument(
        "--max-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="leave data files bigger than BYTES behind (then no marker is sent)",
    )
    p.add_argument("--delete", action="store_true", help="delete objects that no longer exist locally")
    p = sub.add_parser("pull", help="fetch a location into a local folder (incremental, markers last)")
    p.add_argument("src", help="gs://bucket/prefix or a local folder standing in for a bucket")
    p.add_argument("dest", help="local folder")
    _add_filters(p)
    p.add_argument("--into-empty", action="store_true", help="refuse unless the local folder holds no file")
    p = sub.add_parser("cp", help="copy one file: local -> location, location -> local (verified)")
    p.add_argument("src")
    p.add_argument("dest", help="ending in '/' means 'into this folder'")
    p.add_argument(
        "--if-absent", action="store_true", help="upload only if the object does not exist (exit 4)"
    )
    p.add_argument("--json", action="store_true", help="print the copy's size and crc32c as JSON")
    p = sub.add_parser("ls", help="list objects under a location")
    p.add_argument("uri")
    p.add_argument("-l", "--long", action="store_true", help="size, crc32c and mtime too")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("cat", help="print one object")
    p.add_argument("uri")
    p = sub.add_parser("put", help="write stdin to one object")
    p.add_argument("uri")
    p.add_argument("--if-absent", action="store_true", help="only if the object does not exist (exit 4)")
    p = sub.add_parser("exists", help="exit 0 when an object, or a folder holding objects, exists; else 1")
    p.add_argument("uri")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd in ("push", "pull"):
            markers = tuple(args.marker) if args.marker is not None else DEFAULT_MARKERS
            log = (lambda m: _log_err(m)) if args.verbose else None
            kw: dict[str, Any] = dict(include=args.include, exclude=args.exclude, markers=markers,
                                      default_excludes=not args.no_default_excludes, jobs=args.jobs,
                                      dry_run=args.dry_run, log=log)  # fmt: skip
            try:
                if args.cmd == "push":
                    res = push_dir(args.src, args.dest, max_size=args.max_size, delete=args.delete, **kw)
                else:
                    res = pull_dir(args.src, args.dest, into_empty=args.into_empty, **kw)
            except CloudSyncError as e:
                res = getattr(e, "result", None)
                if args.json and res is not None:
                    print(json.dumps(asdict(res)))
                _log_err(str(e))
                return 1
            _log_err(res.summary(args.cmd + (" (dry run)" if args.dry_run else "")))
            if args.json:
                print(json.dumps(asdict(res)))
            return 0
        if args.cmd == "cp":
            src_remote = is_gcs(args.src)
            dst_remote = is_gcs(args.dest)
            if src_remote and not dst_remote:
                info = download_file(args.src, args.dest)
            elif not src_remote:
                if not Path(_local_path(args.src)).is_file():
                    _log_err(f"cp: {args.src}: no such file")
                    return 3
                info = upload_file(_local_path(args.src), args.dest,
                                   if_generation_match=0 if args.if_absent else None)  # fmt: skip
            else:
                import tempfile

                with tempfile.TemporaryDirectory() as td:
                    tmp = Path(td) / "obj"
                    download_file(args.src, tmp)
                    info = upload_file(tmp, args.dest, if_generation_match=0 if args.if_absent else None)
            _log_err(f"cp: {args.src} -> {args.dest} ({info.size} bytes, crc32c {info.crc32c})")
            if args.json:
                print(json.dumps(asdict(info)))
            return 0
        if args.cmd == "ls":
            objs = list_objects(args.uri)
            if args.json:
                print(json.dumps([asdict(o) for o in objs]))
            else:
                for o in objs:
                    print(
                        f"{o.size}\t{o.crc32c or '-'}\t{o.mtime_ns or '-'}\t{o.key}" if args.long else o.key
                    )
            return 0
        if args.cmd == "cat":
            sys.stdout.write(read_text(args.uri))
            return 0
        if args.cmd == "put":
            write_text(args.uri, sys.stdin.read(), if_generation_match=0 if args.if_absent else None)
            return 0
        if args.cmd == "exists":
            return 0 if exists(args.uri) else 1
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
    return 2


if __name__ == "__main__":
    sys.exit(main())
