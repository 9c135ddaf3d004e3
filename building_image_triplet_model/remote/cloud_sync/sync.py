"""Our policy for a folder: push and pull.

* **What to sync.** Include/exclude globs; temporary, partial, lock and aria2 files are never sent
  (:data:`DEFAULT_EXCLUDES`). A file is sent again only when it differs: size plus the source mtime recorded
  on the object, else size plus CRC32C (only then is a file hashed).
* **Commit markers last.** Marker files are read when a push starts, before the data files are listed, and
  sent only after every data file was sent; a pull fetches them last, and only when all data arrived.
* **Never deleting what we did not write.** Only ``delete=True`` (``--delete``) deletes, only objects that
  match the filters.
* **Listing only what the includes name.** When every include starts with fixed folders, only those are
  listed (a worker publishing one archive's shards does not list the whole run).

A small thread pool, not ``transfer_manager``: each file's job decides (unchanged, too big, send) and then
transfers, one outcome per file, the same way for the local stand-in.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from building_image_triplet_model.io import names
from building_image_triplet_model.remote.cloud_sync.locations import (
    CloudSyncError,
    ObjectInfo,
    Store,
    crc32c_of_bytes,
    crc32c_of_file,
    open_location,
)

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
Outcome = tuple[str, str, int, str | None]  # ("skip" | "big" | "sent" | "fail", relative path, bytes, error)
Log = Callable[[str], None] | None


@dataclass
class SyncResult:
    """What a push or pull did. ``transferred`` is in the order of the transfers (markers last)."""

    transferred: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    too_big: list[str] = field(default_factory=list)
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self, verb: str) -> str:
        return (
            f"{verb}: {len(self.transferred)} transferred ({self.bytes} bytes), "
            f"{len(self.skipped)} unchanged, {len(self.too_big)} over the size limit, "
            f"{len(self.deleted)} deleted, {len(self.failed)} failed"
        )

    def run(
        self, items: Sequence[Any], one: Callable[[Any], Outcome], jobs: int, verb: str, log: Log
    ) -> None:
        """``one`` over ``items`` on ``jobs`` threads, each outcome recorded in the order of ``items``."""
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for kind, rel, n, err in pool.map(one, items):
                if kind == "sent":
                    self.transferred.append(rel)
                    self.bytes += n
                    if log:
                        log(f"{verb} {rel} ({n} bytes)")
                elif kind == "fail":
                    self.failed.append((rel, err or "failed"))
                else:
                    (self.skipped if kind == "skip" else self.too_big).append(rel)

    def error(self, what: str) -> CloudSyncError:
        return CloudSyncError(f"{what}: " + "; ".join(f"{r}: {e}" for r, e in self.failed[:5]), self)


# ------------------------------------------------------------------------------------------------ filters
def _match(rel: str, pattern: str) -> bool:
    """A pattern without '/' matches any path component; one with '/' the path or one of its folders."""
    pat = pattern.strip().rstrip("/")
    parts = rel.split("/")
    if "/" not in pat:
        return bool(pat) and any(fnmatch.fnmatchcase(p, pat) for p in parts)
    pat = pat.removeprefix("./").removesuffix("/**")
    return any(fnmatch.fnmatchcase("/".join(parts[: i + 1]), pat) for i in range(len(parts)))


class _Filter:
    def __init__(
        self, include: Sequence[str], exclude: Sequence[str], markers: Sequence[str], defaults: bool
    ):
        self.include, self.markers = tuple(include), tuple(markers)
        self.exclude = (*exclude, *(DEFAULT_EXCLUDES if defaults else ()))

    def wanted(self, rel: str) -> bool:
        if any(_match(rel, p) for p in self.exclude):
            return False
        return not self.include or any(_match(rel, p) for p in self.include)

    def is_marker(self, rel: str) -> bool:
        return any(fnmatch.fnmatchcase(rel if "/" in m else rel.rsplit("/", 1)[-1], m) for m in self.markers)


def list_folder(store: Store, prefix: str, include: Sequence[str] = ()) -> dict[str, ObjectInfo]:
    """The objects under folder ``prefix`` (not a sibling's that merely starts with the same text); only
    under the fixed leading folders of the includes when every include pattern has some."""
    base, heads = f"{prefix}/" if prefix else "", set()
    for pat in (p.strip().removeprefix("./") for p in include):
        if "/" not in pat.rstrip("/"):
            return store.list(base)  # it may match anywhere
        cut = min([i for i, ch in enumerate(pat) if ch in "*?["] + [len(pat)])
        heads.add(pat if cut == len(pat) else pat[: pat.rfind("/", 0, cut) + 1])
    if not heads:
        return store.list(base)
    out: dict[str, ObjectInfo] = {}
    for head in sorted(heads):
        out.update((k, i) for k, i in store.list(base + head).items() if k.startswith(base))
    return out


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def rel_of(prefix: str, key: str) -> str:
    return key[len(prefix) + 1 :] if prefix else key


def _same(size: int, mtime_ns: int, remote: ObjectInfo | None, crc: Callable[[], str]) -> bool:
    """Our change test: size plus the recorded mtime, else size plus CRC32C (only then is a file hashed)."""
    if remote is None or remote.size != size:
        return False
    if remote.mtime_ns is not None and remote.mtime_ns == mtime_ns:
        return True
    return remote.crc32c is not None and crc() == remote.crc32c


# -------------------------------------------------------------------------------------------------- push
@dataclass
class _LocalFile:
    rel: str
    path: Path
    size: int
    mtime_ns: int
    content: bytes | None = None  # a marker's, read when the push starts


def _walk_local(root: Path, flt: _Filter, markers: bool) -> Iterator[_LocalFile]:
    """The wanted data files, or the wanted markers with their content (unless over MARKER_MAX_BYTES)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if not (flt.wanted(rel) and flt.is_marker(rel) == markers and p.is_file()):
                continue
            with contextlib.suppress(FileNotFoundError):  # renamed away while we walked
                st = p.stat()
                if not markers or st.st_size > MARKER_MAX_BYTES:
                    yield _LocalFile(rel, p, st.st_size, st.st_mtime_ns)
                    continue
                with open(p, "rb") as f:
                    data, mtime_ns = f.read(), os.fstat(f.fileno()).st_mtime_ns
                yield _LocalFile(rel, p, len(data), mtime_ns, data)


def _upload_local_file(store: Store, lf: _LocalFile, key: str, if_generation_match: int | None = None) -> int:
    if lf.content is not None:
        store.upload(io.BytesIO(lf.content), key, len(lf.content), lf.mtime_ns, if_generation_match)
        return len(lf.content)
    with open(lf.path, "rb") as f:
        st = os.fstat(f.fileno())
        size = min(lf.size, st.st_size)  # a file that grew since the listing (a log) is sent as listed
        store.upload(f, key, size, st.st_mtime_ns, if_generation_match)
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
    log: Log = None,
) -> SyncResult:
    """Send local folder ``src`` to folder location ``dest`` (the module's policy). ``max_size`` leaves bigger
    data files behind, and then no marker is sent; ``delete`` removes objects under ``dest`` that match the
    filters and are gone locally (markers first). A failure raises :class:`CloudSyncError` (``.result``).
    """
    root = Path(src)
    if not root.is_dir():
        raise CloudSyncError(f"push: {root} is not a folder")
    store, prefix = open_location(dest)
    flt = _Filter(include, exclude, markers, default_excludes)
    # Markers first, their content as of now; then the data files, so a marker never runs ahead of its data.
    marker_files = list(_walk_local(root, flt, markers=True))
    data_files = [*_walk_local(root, flt, markers=False), *(m for m in marker_files if m.content is None)]
    marker_files = [m for m in marker_files if m.content is not None]
    remote = list_folder(store, prefix, include)

    def sync_one(lf: _LocalFile) -> Outcome:
        key, data = _join(prefix, lf.rel), lf.content
        try:
            crc = (lambda: crc32c_of_file(lf.path)) if data is None else (lambda: crc32c_of_bytes(data))
            if _same(lf.size, lf.mtime_ns, remote.get(key), crc):
                return ("skip", lf.rel, 0, None)
            if max_size is not None and lf.size > max_size:
                return ("big", lf.rel, 0, None)
            return ("sent", lf.rel, lf.size if dry_run else _upload_local_file(store, lf, key), None)
        except Exception as e:
            return ("fail", lf.rel, 0, f"{type(e).__name__}: {e}")

    res = SyncResult()
    res.run(data_files, sync_one, jobs, "sent", log)
    if res.failed:
        raise res.error(f"push to {store.name(prefix)}: {len(res.failed)} failed, no marker sent")
    if res.too_big:
        return res  # some data stayed behind (size limit): a marker may describe it, so none is sent
    res.run(marker_files, sync_one, 1, "sent", log)
    if res.failed:
        raise res.error(f"push to {store.name(prefix)}: markers failed")
    if delete:
        ours = {_join(prefix, lf.rel) for lf in [*marker_files, *data_files]}
        extra = [k for k in remote if k not in ours and flt.wanted(rel_of(prefix, k))]
        for k in sorted(extra, key=lambda k: (not flt.is_marker(rel_of(prefix, k)), k)):  # markers go first
            if not dry_run:
                store.delete(k)
            res.deleted.append(rel_of(prefix, k))
    return res


# -------------------------------------------------------------------------------------------------- pull
def _inside(root: Path, rel: str) -> None:
    """CloudSyncError when the file ``rel`` of ``root`` would land outside it (a linked folder on its way)."""
    real_root = os.path.realpath(root)
    where = os.path.realpath(root.joinpath(*rel.split("/")[:-1]))
    if os.path.commonpath([real_root, where]) != real_root:
        raise CloudSyncError(f"pull: {root / rel}: its folder leads outside {root} (to {where}); refusing")


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
    log: Log = None,
) -> SyncResult:
    """Fetch location ``src`` into local folder ``dest``; each file renamed into place once verified, markers
    last. ``into_empty`` refuses a folder that holds any file (a restore onto a fresh disk). Nothing is
    written outside ``dest``: an object whose folder there is a symbolic link leading out is refused before
    any transfer."""
    root = Path(dest)
    if into_empty and root.exists() and any(p.is_file() for p in root.rglob("*")):
        raise CloudSyncError(f"pull: {root} is not empty (a restore goes into an empty folder only)")
    store, prefix = open_location(src)
    flt = _Filter(include, exclude, markers, default_excludes)
    items = []
    for key, info in sorted(list_folder(store, prefix, include).items()):
        rel = rel_of(prefix, key)
        if rel and ("" in rel.split("/") or names.climbs(rel)):
            raise CloudSyncError(f"pull: refusing object name {key!r}")
        if rel and flt.wanted(rel):
            _inside(root, rel)
            items.append((rel, key, info))

    def sync_one(item: tuple[str, str, ObjectInfo]) -> Outcome:
        rel, key, info = item
        target = root.joinpath(*rel.split("/"))
        try:
            if target.is_file():
                st = target.stat()
                if _same(st.st_size, st.st_mtime_ns, info, lambda: crc32c_of_file(target)):
                    return ("skip", rel, 0, None)
            return ("sent", rel, info.size if dry_run else store.download(key, target).size, None)
        except Exception as e:
            return ("fail", rel, 0, f"{type(e).__name__}: {e}")

    if not dry_run:
        root.mkdir(parents=True, exist_ok=True)
    res = SyncResult()
    res.run([i for i in items if not flt.is_marker(i[0])], sync_one, jobs, "fetched", log)
    if not res.failed:
        res.run([i for i in items if flt.is_marker(i[0])], sync_one, 1, "fetched", log)
    if res.failed:
        raise res.error(f"pull from {store.name(prefix)}: {len(res.failed)} failed (markers not fetched)")
    return res
