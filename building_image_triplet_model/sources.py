"""The input: a folder of ``NNNN.tar`` archives read in place, or a folder of extracted files.

A *source* is one dataset: an archive ``NNNN.tar`` (name ``NNNN``) or, for extracted input, one top-level
subfolder (files lying directly in ``input_dir`` form the source ``_root``). Walking a source yields every
member with a locator: for an archive the byte offset of its data, so an image is read later with one
``pread`` and no scan; for a folder the path relative to the source.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT_SOURCE = "_root"
IMAGE_SUFFIXES = (".jpg", ".jpeg")
TXT_SUFFIX = ".txt"
MAX_TXT_BYTES = 64 * 1024  # a metadata file is ~150 bytes; anything far larger is not one


class InputError(RuntimeError):
    """The input cannot be used (missing folder, truncated archive, no valid pair): names the file."""


@dataclass(frozen=True)
class Source:
    name: str
    kind: Literal["tar", "dir"]
    path: Path

    def signature(self) -> dict[str, int | str]:
        """What says the source is unchanged: name, size and mtime (summed over files for a folder)."""
        if self.kind == "tar":
            st = self.path.stat()
            return {"name": self.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        size = count = mtime = 0
        for entry in _walk_files(self.path, top_only=self.name == ROOT_SOURCE):
            st = entry.stat(follow_symlinks=False)
            size += st.st_size
            count += 1
            mtime = max(mtime, st.st_mtime_ns)
        return {"name": self.name, "size": size, "files": count, "mtime_ns": mtime}


@dataclass(frozen=True, slots=True)
class Member:
    path: str  # member name in the archive, or path relative to the source folder
    kind: Literal["jpg", "txt", "other", "irregular"]
    offset: int  # byte offset of the data in the archive; -1 for a folder
    size: int
    data: bytes | None  # the text of a .txt member, else None


def list_sources(input_dir: str | os.PathLike[str]) -> list[Source]:
    """The sources of input_dir, sorted by name. A folder holding any ``*.tar`` is read as archives."""
    root = Path(input_dir)
    if not root.is_dir():
        raise InputError(f"{root}: input_dir does not exist or is not a folder")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    tars = [e for e in entries if e.name.endswith(".tar") and e.is_file()]
    if tars:
        return [Source(e.name[: -len(".tar")], "tar", Path(e.path)) for e in tars]
    sources = [
        Source(e.name, "dir", Path(e.path)) for e in entries if e.is_dir() and not e.name.startswith(".")
    ]
    if any(e.is_file() and _kind(e.name) in ("jpg", "txt") for e in entries):
        sources.insert(0, Source(ROOT_SOURCE, "dir", root))
    if not sources:
        raise InputError(f"{root}: no NNNN.tar archives and no image folders in input_dir")
    return sources


def _kind(name: str) -> Literal["jpg", "txt", "other"]:
    lower = name.lower()
    if lower.endswith(IMAGE_SUFFIXES):
        return "jpg"
    if lower.endswith(TXT_SUFFIX):
        return "txt"
    return "other"


def stem_of(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def walk(source: Source) -> Iterator[Member]:
    if source.kind == "tar":
        yield from _walk_tar(source.path)
    else:
        yield from _walk_dir(source)


def _walk_tar(path: Path) -> Iterator[Member]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                # tarfile keeps every TarInfo it has seen; an archive has ~10^6 members, so drop them.
                tar.members.clear()
                if info.isdir():
                    continue
                if info.offset_data + info.size > size:
                    raise InputError(
                        f"{path}: truncated archive: member {info.name} ends at byte "
                        f"{info.offset_data + info.size}, the file has {size} bytes"
                    )
                if not info.isreg():
                    yield Member(info.name, "irregular", info.offset_data, info.size, None)
                    continue
                kind = _kind(info.name)
                data = None
                if kind == "txt" and info.size <= MAX_TXT_BYTES:
                    raw.seek(info.offset_data)
                    data = raw.read(info.size)
                yield Member(info.name, kind, info.offset_data, info.size, data)
    except tarfile.TarError as exc:
        raise InputError(f"{path}: unreadable archive: {exc}") from None


def _walk_files(root: Path, top_only: bool = False) -> Iterator[os.DirEntry[str]]:
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    if not top_only:
                        stack.append(Path(entry.path))
                else:
                    yield entry


def _walk_dir(source: Source) -> Iterator[Member]:
    root = source.path
    for entry in _walk_files(root, top_only=source.name == ROOT_SOURCE):
        rel = os.path.relpath(entry.path, root).replace(os.sep, "/")
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            yield Member(rel, "irregular", -1, 0, None)
            continue
        kind = _kind(entry.name)
        data = None
        if kind == "txt" and st.st_size <= MAX_TXT_BYTES:
            try:
                data = Path(entry.path).read_bytes()
            except OSError:
                data = None  # reported as unreadable_txt by the index
        yield Member(rel, kind, -1, st.st_size, data)
