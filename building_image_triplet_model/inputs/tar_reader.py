"""A strict, sequential reader of plain tar archives (ustar, GNU and pax headers).

Python's tarfile is lenient where this project cannot be: after the first member it ends the walk quietly
at a damaged header, at a file cut off between two members, at a lone zero block, or at zeros that an
unfinished preallocated download left behind, so an archive with members missing reads as a good one.
This reader walks the archive itself, header by header, and refuses an archive unless it ends the way a
complete one does. Each header's fields and checksum are tarfile's own parse (``TarInfo.frombuf``); only
the member's name is ours, because tarfile joins the ustar prefix field into GNU headers too, where those
bytes hold times:

* every header's checksum is right and every member's data lies inside the file;
* the members are followed by the end-of-archive marker (two zero blocks);
* after the marker there are only zeros, fewer than one record (``record_bytes``, 10240 for GNU tar,
  bsdtar and Python's tarfile): the record padding a tar writer adds. More zeros than that are what an
  interrupted download with preallocated space leaves; any other byte means data after the marker.

It reads every member's data (the index checksums each image), so one pass costs one sequential read.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
DEFAULT_RECORD_BYTES = 20 * BLOCK  # the default blocking factor of GNU tar, bsdtar and Python's tarfile
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL = b"L", b"K", b"x", b"g"
_MAX_META_BYTES = 1 << 20  # a long name or a pax header larger than this is not one


class TarError(ValueError):
    """The archive is not a complete, readable tar; the message says where and why."""


@dataclass(frozen=True, slots=True)
class TarMember:
    name: str
    type: bytes  # the typeflag: b"0" regular, b"5" folder, b"2" symlink, ...
    offset: int  # byte offset of the member's data in the archive
    size: int
    data: bytes  # the member's data (b"" for members without data)
    link: str = ""  # a link's target

    @property
    def is_regular(self) -> bool:
        return self.type in _REGULAR

    @property
    def is_dir(self) -> bool:
        return self.type == b"5"


def checksum(data: bytes) -> int:
    """The 64-bit member checksum stored in the index (the first 8 bytes of SHA-256, big-endian)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big", signed=True)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, at: int) -> dict[str, str]:
    """``<length> <key>=<value>\\n`` records; anything else is a damaged header (as GNU tar says)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        end = pos + length
        record = data[space + 1 : end]
        if length <= space - pos + 1 or end > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarError(f"bad pax header at byte {at}")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return out


class TarReader:
    """Iterate over the members of one archive: ``for m in TarReader(f, size): ...``."""

    def __init__(self, fh: BinaryIO, size: int, name: str = "", record_bytes: int = DEFAULT_RECORD_BYTES):
        self.fh = fh
        self.size = size
        self.name = name or getattr(fh, "name", "archive")
        self.record_bytes = record_bytes
        self.pos = 0

    def _read(self, n: int) -> bytes:
        data = self.fh.read(n)
        self.pos += len(data)
        return data

    def _fail(self, why: str) -> TarError:
        return TarError(f"{self.name}: {why}")

    def __iter__(self) -> Iterator[TarMember]:
        long_name: str | None = None
        long_link: str | None = None
        pax: dict[str, str] = {}
        while True:
            at = self.pos
            header = self._read(BLOCK)
            if len(header) < BLOCK:
                if at == 0:
                    raise self._fail(f"not a tar archive ({len(header)} bytes, less than one header)")
                raise self._fail(
                    f"truncated archive: the file ends at byte {self.size} without the end-of-archive "
                    f"marker (after {at} bytes of complete members)"
                )
            if header == _ZERO_BLOCK:
                self._check_end(at)
                return
            try:  # tarfile's parse: the checksum (signed or unsigned) and the octal or base-256 numbers
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:  # a wrong checksum, or a field that is not a number
                info, why = None, "bad header checksum" if str(exc) == "bad checksum" else "unreadable header"
            if info is None:
                start = at + len(header.rstrip(b"\0"))
                after = self._read(min(self.size - self.pos, 1 << 16))
                if at and not after.strip(b"\0") and self.size - start >= self.record_bytes:
                    raise self._fail(
                        f"zeros from byte {start} to the end ({self.size - start} bytes) where a header "
                        "should be: an unfinished download with preallocated space?"
                    )
                what = "not a tar archive" if at == 0 else "damaged archive"
                raise self._fail(f"{what}: {why} at byte {at}")
            size = info.size
            kind = header[156:157]  # as written: frombuf makes an old V7 folder ("0" and a trailing /) a "5"
            if "size" in pax and kind not in (_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL):
                try:  # a pax size overrides the header's (members over 8 GiB)
                    size = int(pax["size"])
                except ValueError:
                    raise self._fail(f"bad pax size {pax['size']!r} at byte {at}") from None
            data_at = self.pos
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
            if size < 0 or data_at + size > self.size:
                raise self._fail(
                    f"truncated archive: member {self._name(header, long_name, pax)!r} ends at byte "
                    f"{data_at + size}, the file has {self.size} bytes"
                )
            if kind in (_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL) and size > _MAX_META_BYTES:
                raise self._fail(f"header extension of {size} bytes at byte {at}")
            data = self._read(padded)[:size]
            if kind == _LONG_NAME:
                long_name = _text(data)
                continue
            if kind == _LONG_LINK:
                long_link = _text(data)
                continue
            if kind == _PAX:
                pax = _pax_records(data, at)
                continue
            if kind == _PAX_GLOBAL:
                continue
            name = self._name(header, long_name, pax)
            link = pax.get("linkpath") or long_link or info.linkname
            long_name, long_link, pax = None, None, {}
            yield TarMember(name, kind, data_at, size, data, link)

    @staticmethod
    def _name(header: bytes, long_name: str | None, pax: dict[str, str]) -> str:
        if "path" in pax:
            return pax["path"]
        if long_name is not None:
            return long_name
        name = _text(header[0:100])
        # Only POSIX ustar has a name prefix there; GNU headers ("ustar  ") keep times in those bytes.
        if header[257:263] == b"ustar\0" and header[345:346] != b"\0":
            prefix = _text(header[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        return name

    def _check_end(self, at: int) -> None:
        second = self._read(BLOCK)
        if second != _ZERO_BLOCK:
            if len(second) < BLOCK:
                raise self._fail(
                    f"truncated archive: the end-of-archive marker at byte {at} is incomplete "
                    f"(the file ends at byte {self.size})"
                )
            raise self._fail(f"data after a zero block at byte {at} (a hole in an incomplete download?)")
        tail = self.size - self.pos
        probe = self._read(min(tail, self.record_bytes + BLOCK))
        if probe.count(0) != len(probe):
            raise self._fail(
                f"data after the end-of-archive marker at byte {at} (a hole of zeros in an incomplete "
                "download?)"
            )
        if tail >= self.record_bytes:
            raise self._fail(
                f"{tail} bytes of zeros after the end-of-archive marker at byte {at}, more than one "
                f"{self.record_bytes}-byte record of padding: an unfinished download with preallocated "
                "space? (archives written with a larger blocking factor: set data.tar_record_bytes)"
            )


def walk(path: str | os.PathLike[str], record_bytes: int = DEFAULT_RECORD_BYTES) -> Iterator[TarMember]:
    """Every member of the archive at ``path``, strictly (see the module docstring)."""
    with open(path, "rb", buffering=1 << 20) as fh:
        size = os.fstat(fh.fileno()).st_size
        yield from TarReader(fh, size, os.fspath(path), record_bytes)
