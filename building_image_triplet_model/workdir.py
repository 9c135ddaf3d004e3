"""Durable files: atomic writes (temporary name, fsync, rename, fsync the folder), markers, the run lock.

Everything the processor keeps between runs is written through this module, so a kill at any instant
leaves either the old file or the new one, never half of one. Temporary names end in ``.tmp`` and are
never read; the cloud sync skips them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import faults

TMP_SUFFIX = ".tmp"
SUCCESS = "_SUCCESS.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; finished files get the mode a plain open() would give them.
FILE_MODE = 0o666 & ~_umask()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        faults.point(f"write:{path.name}")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """The JSON in ``path``, or None when the file does not exist."""
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Uncompressed npz, written atomically. Object arrays are refused (they would need pickle)."""
    for key, arr in arrays.items():
        if np.asarray(arr).dtype.hasobject:
            raise TypeError(f"{path}: array {key} has dtype object; only plain arrays are stored")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load every array of an npz file. Never unpickles: files may come back from a bucket."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


class LazyNpz(Mapping[str, np.ndarray]):
    """An npz file whose arrays are read on first use: a resumed run reads only the columns it needs."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._npz = np.load(path, allow_pickle=False)
        self._loaded: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._loaded:
            self._loaded[key] = self._npz[key]
        return self._loaded[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._npz.files)

    def __len__(self) -> int:
        return len(self._npz.files)


def range_name(start: int, stop: int) -> str:
    """The file of rows [start, stop) of a chunked step (KNN rows, embeddings)."""
    return f"{start:010d}-{stop:010d}.npz"


def done_ranges(folder: Path) -> list[tuple[int, int]]:
    """The (start, stop) of every completed chunk file in folder, sorted."""
    out = []
    if folder.is_dir():
        for path in folder.glob("*-*.npz"):
            a, b = path.stem.split("-")
            out.append((int(a), int(b)))
    return sorted(out)


def remove_tmp_files(root: Path) -> int:
    """Delete leftovers of writes that a kill interrupted."""
    n = 0
    if root.is_dir():
        for path in root.rglob(f"*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                n += 1
    return n


class LockedError(RuntimeError):
    pass


class RunLock:
    """A POSIX record lock on ``<work>/lock``.

    POSIX (lockf) locks belong to the process and are not inherited across fork, so decode workers that
    outlive a killed parent for a moment never keep the next run out; the kernel drops the lock the
    instant the holder dies, however it dies.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                holder = self.path.read_text().strip() or "unknown"
                raise LockedError(
                    f"{self.path}: another processor (pid {holder}) is running on this output"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
