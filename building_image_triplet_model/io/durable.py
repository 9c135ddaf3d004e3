"""Durable files: the one way this project writes anything that must survive a kill.

A file is written under a temporary name beside its target, fsynced, renamed over the target, and its
folder is fsynced: a kill at any instant leaves the old file or the new one, never half of one. Temporary
names end in ``.tmp``; nothing reads them and checkpoints never send them.

Reading back is just as strict: a committed file that does not parse (cut short, bit-flipped, zeroed) is a
:class:`CorruptFileError` naming the file, which the engine answers by moving the file aside and computing
it again. npz files carry a CRC-32 per array, so damage inside them is found too.

Standard library only (numpy is imported by the npz functions when they are called): the bootstrap runs
this module with Debian's own python3.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from building_image_triplet_model.io import faults

if TYPE_CHECKING:
    import numpy as np

TMP_SUFFIX = ".tmp"


class CorruptFileError(RuntimeError):
    """A committed file that cannot be read back as what it should be."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; finished files get the mode a plain open() would give them.
FILE_MODE = 0o666 & ~_umask()


def _fsync(path: str | os.PathLike[str], flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    _fsync(path, os.O_DIRECTORY)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Make a file another library wrote (h5py) durable, and its name with it."""
    _fsync(path, 0)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, create_only: bool = False, mtime_ns: int | None = None
) -> Iterator[IO[Any]]:
    """A temporary file beside ``path``; on success it is fsynced and renamed over ``path``.

    ``create_only``: the rename fails with FileExistsError when ``path`` exists (a create-only claim).
    ``mtime_ns``: the finished file's modification time (a download keeps its source's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        faults.point(f"write:{path.name}")
        if create_only:
            os.link(tmp, path)  # atomic, and refuses an existing target
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes, *, create_only: bool = False) -> None:
    with atomic_open(path, "wb", create_only=create_only) as fh:
        fh.write(data)


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any, *, create_only: bool = False) -> None:
    write_bytes(path, dumps_json(obj).encode(), create_only=create_only)


def _json_default(obj: Any) -> Any:
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):
        return obj.item()  # numpy scalars
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """The JSON in ``path``; None when the file does not exist; CorruptFileError when it does not parse."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CorruptFileError(path, f"not valid JSON ({exc})") from None


def write_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Uncompressed npz, written atomically. Object arrays are refused (they would need pickle)."""
    import numpy as np

    for key, arr in arrays.items():
        if np.asarray(arr).dtype.hasobject:
            raise TypeError(f"{path}: array {key} has dtype object; only plain arrays are stored")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


_NPZ_ERRORS = (zipfile.BadZipFile, ValueError, EOFError, KeyError, OSError)


def read_npz(
    path: str | os.PathLike[str], keys: tuple[str, ...] | None = None, optional: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Every array of an npz file (or only ``keys``, and those of ``optional`` that it has). Never
    unpickles: files may come back from a bucket. A file that is missing an asked-for array or fails its
    CRC is a CorruptFileError."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            wanted = [*(keys if keys is not None else data.files), *(k for k in optional if k in data.files)]
            return {key: data[key] for key in wanted}
    except FileNotFoundError:
        raise
    except _NPZ_ERRORS as exc:
        raise CorruptFileError(path, f"unreadable npz ({type(exc).__name__}: {exc})") from None


class LazyNpz(Mapping[str, "np.ndarray"]):
    """An npz file whose arrays are read on first use: a resumed run reads only the columns it needs.
    A file that lacks one of ``required`` is a CorruptFileError at once, not a KeyError deep in a step."""

    def __init__(self, path: str | os.PathLike[str], required: tuple[str, ...] = ()) -> None:
        import numpy as np

        self.path = Path(path)
        try:
            self._npz = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except _NPZ_ERRORS as exc:
            raise CorruptFileError(path, f"unreadable npz ({type(exc).__name__}: {exc})") from None
        missing = [key for key in required if key not in self._npz.files]
        if missing:
            raise CorruptFileError(path, f"lacks the arrays {', '.join(missing)}")
        self._loaded: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._loaded:
            try:
                self._loaded[key] = self._npz[key]
            except KeyError:
                if key in self._npz.files:
                    raise CorruptFileError(self.path, f"array {key} unreadable") from None
                raise
            except _NPZ_ERRORS as exc:
                raise CorruptFileError(self.path, f"array {key}: {type(exc).__name__}: {exc}") from None
        return self._loaded[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._npz.files)

    def __len__(self) -> int:
        return len(self._npz.files)


def remove_tmp_files(root: str | os.PathLike[str]) -> int:
    """Delete leftovers of writes that a kill interrupted."""
    n = 0
    root = Path(root)
    if root.is_dir():
        for path in root.rglob(f"*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                n += 1
    return n
