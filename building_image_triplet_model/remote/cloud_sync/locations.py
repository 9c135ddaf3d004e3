"""Locations: ``gs://bucket/prefix`` (Cloud Storage, through google-cloud-storage) or a local path (``/abs``,
``rel``, ``file:///abs``) standing in for a bucket, its objects plain files written atomically (``durable``).

google-cloud-storage does the work: ``retry=_retry()`` is the one retry layer (a create-only write,
``if_generation_match=0``, is idempotent, so it is retried too); with ``checksum="crc32c"`` the server or the
library compares, and its ``DataCorruption`` surfaces as :class:`ChecksumMismatchError`. It is imported only
when a ``gs://`` location is used (``STORAGE_EMULATOR_HOST`` works, with anonymous credentials).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from building_image_triplet_model.io import durable, names

if TYPE_CHECKING:
    from building_image_triplet_model.remote.cloud_sync.sync import SyncResult

_META_MTIME = "triplet-src-mtime-ns"
_CHUNK = 8 * 1024 * 1024
_UPLOAD_CHUNK = 32 * 1024 * 1024  # held in memory per job: the library's 100 MiB x 8 jobs is too much
_TIMEOUT_S = 300


class CloudSyncError(RuntimeError):
    """A transfer failed; the message names the file or object. A failed push or pull attaches ``result``."""

    def __init__(self, message: str, result: SyncResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class ChecksumMismatchError(CloudSyncError):
    """What arrived differs from what was sent (the library's ``DataCorruption``)."""


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
        """Same as ``key`` (relative to the folder location for ``list_objects``)."""
        return self.key


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def crc32c_of_file(path: str | os.PathLike[str]) -> str:
    """Base64 CRC32C of a file, in the form Cloud Storage reports (``blob.crc32c``)."""
    import google_crc32c

    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for _ in c.consume(f, _CHUNK):
            pass
    return _b64(c.digest())


def crc32c_of_bytes(data: bytes) -> str:
    import google_crc32c

    return _b64(google_crc32c.value(data).to_bytes(4, "big"))


# ------------------------------------------------------------------------------------------- local folder
def _copy(src: IO[bytes], dest: Path, size: int, mtime_ns: int | None, create_only: bool = False) -> str:
    """Copy ``size`` bytes (a log may grow meanwhile) to ``dest``; the CRC32C (no server reports one)."""
    import google_crc32c

    c = google_crc32c.Checksum()
    with durable.atomic_open(dest, "wb", create_only=create_only, mtime_ns=mtime_ns) as out:
        while size > 0:
            block = src.read(min(_CHUNK, size))
            if not block:
                raise CloudSyncError(f"{dest}: the source shrank while being copied")
            c.update(block)
            out.write(block)
            size -= len(block)
    return _b64(c.digest())


class LocalStore:
    """A folder standing in for a bucket."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def name(self, key: str) -> str:
        return str(self.root / key) if key else str(self.root)

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if names.climbs(key):
            raise CloudSyncError(f"refusing key with '.' or '..': {key!r}")
        return self.root.joinpath(*parts)

    @staticmethod
    def _info(key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(key=key, size=st.st_size, mtime_ns=st.st_mtime_ns)

    def stat(self, key: str) -> ObjectInfo | None:
        p = self._path(key)
        return self._info(key, p) if p.is_file() else None

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        base = self._path(prefix)
        if prefix and base.is_file():  # an include naming one file
            return {prefix: self._info(prefix, base)}
        out = {}
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.startswith(".") and fn.endswith(durable.TMP_SUFFIX):
                    continue  # a write still in flight
                key = (Path(dirpath) / fn).relative_to(self.root).as_posix()
                with contextlib.suppress(FileNotFoundError):
                    out[key] = self._info(key, Path(dirpath) / fn)
        return out

    def has_objects(self, prefix: str) -> bool:
        p = self._path(prefix)
        return p.is_file() or (p.is_dir() and any(q.is_file() for q in p.rglob("*")))

    def upload(self, f: IO[bytes], key: str, size: int, mtime_ns: int, gen: int | None) -> ObjectInfo:
        if gen not in (None, 0):
            raise CloudSyncError("a local location supports only if_generation_match=0 (create only)")
        crc = _copy(f, self._path(key), size, mtime_ns, create_only=gen == 0)
        return ObjectInfo(key=key, size=size, crc32c=crc, mtime_ns=mtime_ns)

    def download(self, key: str, dest: Path) -> ObjectInfo:
        with open(self._path(key), "rb") as f:
            st = os.fstat(f.fileno())
            crc = _copy(f, dest, st.st_size, st.st_mtime_ns)
        return ObjectInfo(key=key, size=st.st_size, crc32c=crc, mtime_ns=st.st_mtime_ns)

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ Cloud Storage
@functools.lru_cache(maxsize=4)
def _client(emulator: str | None, project: str | None) -> Any:
    """One client per endpoint, shared by the worker threads."""
    from google.cloud import storage

    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "test-project", credentials=AnonymousCredentials())
    return storage.Client(project=project or None)


def _retry() -> Any:
    """The library's policy, the one retry layer (a function, so that a test can make it give up sooner)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY


@contextlib.contextmanager
def _errors(name: str) -> Iterator[None]:
    """The library's errors as those our callers handle."""
    from google.api_core import exceptions as gexc

    try:
        from google.cloud.storage.exceptions import DataCorruption
    except ImportError:  # google-cloud-storage 2.x
        from google.resumable_media.common import DataCorruption  # type: ignore[no-redef]
    try:
        yield
    except gexc.NotFound as e:
        raise FileNotFoundError(name) from e
    except gexc.PreconditionFailed as e:
        raise FileExistsError(f"{name} already exists") from e
    except DataCorruption as e:
        raise ChecksumMismatchError(f"{name}: {e}") from e


class GCSStore:
    def __init__(self, bucket: str) -> None:
        self.client = _client(os.environ.get("STORAGE_EMULATOR_HOST"), os.environ.get("GOOGLE_CLOUD_PROJECT"))
        self.bucket = self.client.bucket(bucket)

    def name(self, key: str) -> str:
        return f"gs://{self.bucket.name}/{key}"

    @staticmethod
    def _info(blob: Any) -> ObjectInfo:
        mtime = (blob.metadata or {}).get(_META_MTIME, "")
        mtime_ns = int(mtime) if mtime.isdigit() else None
        return ObjectInfo(blob.name, int(blob.size or 0), blob.crc32c, mtime_ns, blob.generation)

    def stat(self, key: str) -> ObjectInfo | None:
        blob = self.bucket.get_blob(key, retry=_retry())
        return None if blob is None else self._info(blob)

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        blobs = self.client.list_blobs(self.bucket, prefix=prefix or None, retry=_retry())
        return {b.name: self._info(b) for b in blobs if not b.name.endswith("/")}  # not "folder" placeholders

    def has_objects(self, prefix: str) -> bool:
        blobs = self.client.list_blobs(self.bucket, prefix=prefix or None, max_results=1, retry=_retry())
        return any(True for _ in blobs)

    def upload(self, f: IO[bytes], key: str, size: int, mtime_ns: int, gen: int | None) -> ObjectInfo:
        blob = self.bucket.blob(key, chunk_size=_UPLOAD_CHUNK)
        blob.metadata = {
            _META_MTIME: str(mtime_ns),
            "triplet-src-size": str(size),
            "goog-reserved-file-mtime": str(mtime_ns // 10**9),  # what gcloud rsync reads as the mtime
        }
        with _errors(self.name(key)):
            blob.upload_from_file(
                f, size=size, checksum="crc32c", if_generation_match=gen, retry=_retry(), timeout=_TIMEOUT_S
            )
        return self._info(blob)

    def download(self, key: str, dest: Path) -> ObjectInfo:
        with _errors(self.name(key)):
            blob = self.bucket.get_blob(key, retry=_retry())  # pins the generation whose mtime we keep
            if blob is None:
                raise FileNotFoundError(self.name(key))
            info = self._info(blob)
            with durable.atomic_open(dest, "wb", mtime_ns=info.mtime_ns) as out:
                blob.download_to_file(out, checksum="crc32c", retry=_retry(), timeout=_TIMEOUT_S)
        return info

    def read_bytes(self, key: str) -> bytes:
        with _errors(self.name(key)):
            return bytes(self.bucket.blob(key).download_as_bytes(checksum="crc32c", retry=_retry()))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError), _errors(self.name(key)):
            self.bucket.delete_blob(key, retry=_retry())


# ------------------------------------------------------------------------------------------------- parsing
Store = LocalStore | GCSStore


def is_gcs(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("gs://")


def local_path(uri: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(uri).removeprefix("file://"))


def open_location(uri: str | os.PathLike[str]) -> tuple[Store, str]:
    """(store, key) for a location: the key is the object name or the folder prefix (no trailing '/')."""
    text = os.fspath(uri)
    if not is_gcs(text):
        return LocalStore(local_path(text)), ""
    bucket, _, key = text.removeprefix("gs://").partition("/")
    if not bucket:
        raise CloudSyncError(f"no bucket in {text!r}")
    return GCSStore(bucket), key.strip("/")


def open_object(uri: str) -> tuple[Store, str]:
    """(store, key) for one object; a local file's store is its folder."""
    store, key = open_location(uri)
    if isinstance(store, LocalStore):
        return LocalStore(store.root.parent), store.root.name
    if not key:
        raise CloudSyncError(f"no object name in {uri!r}")
    return store, key
