"""The input: a folder of ``NNNN.tar`` archives read in place, or a folder of extracted files.

A *source* is one dataset: an archive ``NNNN.tar`` (name ``NNNN``) or, for extracted input, one top-level
subfolder (files lying directly in ``input_dir`` form the source ``_root``). Walking a source yields every
member with a locator (for an archive the byte offset of its data, so that an image is read later with one
``pread``; for a folder the path relative to the source) and, for an image, the checksum of its bytes.

Listing is strict, because a wrong input must never turn into an artifact with rows missing: a name that
looks like an archive but is not a regular file, and an archive whose aria2c control file (``.aria2``) is
still beside it (an unfinished download), are input errors naming the file.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from building_image_triplet_model.errors import InputError
from building_image_triplet_model.inputs import tar_reader

ROOT_SOURCE = "_root"
IMAGE_SUFFIXES = (".jpg", ".jpeg")
TXT_SUFFIX = ".txt"
ARCHIVE_SUFFIX = ".tar"
ARIA2_SUFFIX = ".aria2"
MAX_TXT_BYTES = 64 * 1024  # a metadata file is ~150 bytes; anything far larger is not one
# Source names become folder names in the work folder and object names in a bucket.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")


@dataclass(frozen=True)
class Source:
    name: str
    kind: Literal["tar", "dir"]
    path: Path

    def signature(self) -> dict[str, int | str]:
        """What says the source is unchanged without reading it: name, size and mtime (summed over files
        for a folder). The checksums in the index catch what this misses (see decode.py)."""
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
    checksum: int | None = None  # tar_reader.checksum of an image's bytes; None when they cannot be read


def _describe(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_archive_names(root: Path, entries: list[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    """The regular ``*.tar`` files of a folder; every suspicious name is an InputError naming it."""
    problems = []
    tars = []
    names = {e.name for e in entries}
    for e in entries:
        if e.name.endswith(ARCHIVE_SUFFIX + ARIA2_SUFFIX):
            tar_name = e.name[: -len(ARIA2_SUFFIX)]
            what = "is still downloading" if tar_name in names else "has not arrived yet"
            problems.append(f"{root / tar_name}: {what} (aria2c control file {e.name} beside it)")
        elif e.name.endswith(ARCHIVE_SUFFIX):
            try:
                mode = os.stat(e.path).st_mode  # follows a symlink: a link to an archive is fine
            except OSError as exc:
                problems.append(f"{e.path}: cannot be read ({exc.strerror})")
                continue
            if not stat.S_ISREG(mode):
                problems.append(f"{e.path}: looks like an archive but is {_describe(mode)}")
            elif not _NAME.match(e.name[: -len(ARCHIVE_SUFFIX)]):
                problems.append(f"{e.path}: archive names are letters, digits, '.', '_' and '-'")
            else:
                tars.append(e)
    if problems:
        raise InputError("; ".join(problems))
    return tars


def list_sources(input_dir: str | os.PathLike[str]) -> list[Source]:
    """The sources of input_dir, sorted by name. A folder holding any ``*.tar`` is read as archives."""
    root = Path(input_dir)
    if not root.is_dir():
        raise InputError(f"{root}: input_dir does not exist or is not a folder")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    tars = _check_archive_names(root, entries)
    if tars:
        return [Source(e.name[: -len(ARCHIVE_SUFFIX)], "tar", Path(e.path)) for e in tars]
    folders = [e for e in entries if e.is_dir() and not e.name.startswith(".")]  # .triplet-* is ours
    odd = [e.path for e in folders if not _NAME.match(e.name)]
    if odd:
        raise InputError(f"{'; '.join(odd)}: source folder names are letters, digits, '.', '_' and '-'")
    sources = [Source(e.name, "dir", Path(e.path)) for e in folders]
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


def walk(source: Source, record_bytes: int = tar_reader.DEFAULT_RECORD_BYTES) -> Iterator[Member]:
    if source.kind == "tar":
        yield from _walk_tar(source.path, record_bytes)
    else:
        yield from _walk_dir(source)


def _ends_cut_by_zeros(kind: str, data: bytes) -> bool:
    """A JPEG ends with its EOI marker (FF D9, perhaps padded after it) and a metadata file with text:
    neither ends in a zero byte unless zeros replaced its end."""
    if not data or data[-1] != 0 or kind not in ("jpg", "txt"):
        return False
    return kind == "txt" or not data.rstrip(b"\0").endswith(b"\xff\xd9")


def _members(path: Path, record_bytes: int) -> Iterator[tar_reader.TarMember]:
    """An archive's members but folders, read to its end: InputError naming it when it is not complete."""
    last: tar_reader.TarMember | None = None
    try:
        for m in tar_reader.walk(path, record_bytes):
            if not m.is_dir:
                last = m
                yield m
    except tar_reader.TarError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read: {exc}") from None
    # Zeros from inside the last member to the end read as its padding and the end-of-archive marker: the
    # tar structure cannot tell, the member's own bytes can (a preallocated download cut short).
    if last is not None and last.is_regular and _ends_cut_by_zeros(_kind(last.name), last.data):
        raise InputError(
            f"{path}: its last member {last.name} ends in zero bytes that run into the end-of-archive "
            "marker: a download cut short in preallocated space? Download the archive again"
        )


def check_archive(path: Path, record_bytes: int = tar_reader.DEFAULT_RECORD_BYTES) -> None:
    """Read an archive as the index will (without hashing its images): InputError when it is not complete."""
    for _ in _members(path, record_bytes):
        pass


def _walk_tar(path: Path, record_bytes: int) -> Iterator[Member]:
    for m in _members(path, record_bytes):
        if not m.is_regular:
            yield Member(m.name, "irregular", m.offset, m.size, None)
            continue
        kind = _kind(m.name)
        if kind == "jpg":
            yield Member(m.name, kind, m.offset, m.size, None, tar_reader.checksum(m.data))
        elif kind == "txt":
            yield Member(m.name, kind, m.offset, m.size, m.data if m.size <= MAX_TXT_BYTES else None)
        else:
            yield Member(m.name, kind, m.offset, m.size, None)


def _walk_files(root: Path, top_only: bool = False) -> Iterator[os.DirEntry[str]]:
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            raise InputError(f"{folder}: cannot be listed ({exc.strerror})") from None
        for entry in entries:
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
        if kind == "jpg" or (kind == "txt" and st.st_size <= MAX_TXT_BYTES):
            try:
                data = Path(entry.path).read_bytes()
            except OSError:
                data = None  # reported as unreadable by the index
        if kind == "jpg":
            yield Member(rel, kind, -1, st.st_size, None, None if data is None else tar_reader.checksum(data))
        else:
            yield Member(rel, kind, -1, st.st_size, data if kind == "txt" else None)
