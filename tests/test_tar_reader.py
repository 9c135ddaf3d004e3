"""The strict tar reader (tar_reader.py) against real archives written by GNU tar and Python's tarfile.

Python's tarfile is the reference for what a *complete* archive holds (names, offsets, sizes, data); GNU tar
(a real subprocess) is the reference for what must never be accepted.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import re
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from building_image_triplet_model.inputs import tar_reader
from building_image_triplet_model.inputs.tar_reader import BLOCK, DEFAULT_RECORD_BYTES, TarError, TarReader

REPO = Path(__file__).resolve().parents[1]
LONG_DIR = "a_folder_name_that_is_long/" * 3  # 81 characters
LONG_NAME = LONG_DIR + "and_a_file_name_that_makes_it_well_over_one_hundred.jpg"  # 136 characters
UNICODE_NAME = "straße/日本語_ü.txt"


# ------------------------------------------------------------------------------------------ helpers
def read_all(data: bytes, **kw) -> list[tar_reader.TarMember]:
    return list(TarReader(io.BytesIO(data), len(data), name="mem.tar", **kw))


def facts(members) -> list[tuple]:
    return [(m.name, m.type, m.offset, m.size, m.data, m.link) for m in members]


def reference(path: Path) -> list[tuple]:
    """(name, type, data offset, size, data, link target) of every member, from Python's tarfile."""
    out = []
    with tarfile.open(path, "r:") as tf:
        for ti in tf.getmembers():
            data = tf.extractfile(ti).read() if ti.isreg() else b""
            out.append((ti.name, ti.type, ti.offset_data, ti.size, data, ti.linkname))
    return out


def normalized(members) -> list[tuple]:
    """The reader's facts in tarfile's spelling: tarfile drops a folder name's trailing slash."""
    return [(f[0].rstrip("/") if f[1] == b"5" else f[0], *f[1:]) for f in facts(members)]


def populate(src: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def gnu_tar(out: Path, src: Path, *names: str, blocking: int | None = None, extra: tuple = ()) -> Path:
    args = ["tar", "--format=gnu", "--sort=name", "--owner=0", "--group=0", "--mtime=@0", *extra]
    if blocking:
        args += ["-b", str(blocking)]
    subprocess.run([*args, "-cf", str(out), "-C", str(src), *names], check=True, capture_output=True)
    return out


def tarfile_archive(path: Path, fmt: int, entries: list[tuple[str, str, bytes | str]]) -> Path:
    """entries: (name, kind, payload) with kind 'file' (bytes), 'dir', or 'symlink' (target)."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, kind, payload in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            if kind == "file":
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
            else:
                ti.type = tarfile.SYMTYPE
                ti.linkname = payload
                tf.addfile(ti)
    return path


def gnu_accepts(paths: list[Path]) -> dict[Path, bool]:
    """`tar -tf` on each file, in two parallel shell loops (one fork per file)."""
    halves = [paths[0::2], paths[1::2]]
    script = 'for f in "$@"; do tar -tf "$f" >/dev/null 2>&1; echo "$?"; done'
    procs = [
        subprocess.Popen(["bash", "-c", script, "bash", *map(str, h)], stdout=subprocess.PIPE, text=True)
        for h in halves
    ]
    result: dict[Path, bool] = {}
    for half, proc in zip(halves, procs, strict=True):
        out, _ = proc.communicate(timeout=120)
        codes = out.split()
        assert len(codes) == len(half)
        result.update({p: c == "0" for p, c in zip(half, codes, strict=True)})
    return result


def raw_header(name: bytes, size: int, typeflag: bytes) -> bytes:
    """A ustar header with a correct checksum (for archives tarfile refuses to write)."""
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax_record(key: str, value: str) -> bytes:
    """One pax record, "<length> key=value\n", where <length> counts its own digits too."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while length != len(body) + len(str(length)):
        length = len(body) + len(str(length))
    return str(length).encode() + body


def with_pax(pax: bytes, member: bytes = b"A", header_size: int | None = None) -> bytes:
    size = len(member) if header_size is None else header_size
    body = raw_header(b"PaxHeader", len(pax), b"x") + padded(pax)
    body += raw_header(b"a", size, b"0") + padded(member) + bytes(2 * BLOCK)
    return body + bytes(-len(body) % DEFAULT_RECORD_BYTES)


# ------------------------------------------------------------------------------ complete archives
@pytest.fixture(scope="module")
def gnu_archive(tmp_path_factory) -> Path:
    """GNU tar: a folder, a long name (> 100 chars), non-ASCII names, a symlink, an empty file."""
    tmp = tmp_path_factory.mktemp("gnu")
    src = tmp / "src"
    rng = random.Random(1)
    populate(
        src,
        {
            "0088/a.jpg": rng.randbytes(1500),
            "0088/a.txt": b"d 88 1 2 3 40.7 -73.9 1 0 1 0 40.7 -73.9 1 20 185 5 0\n",
            "0088/empty.txt": b"",
            LONG_NAME: rng.randbytes(700),
            UNICODE_NAME: "é".encode() * 300,
        },
    )
    os.symlink("a.jpg", src / "0088" / "link.jpg")
    return gnu_tar(tmp / "gnu.tar", src, "0088", LONG_DIR.split("/")[0], "straße")


def test_gnu_tar_archive_matches_tarfile_listing(gnu_archive):
    members = list(tar_reader.walk(gnu_archive))
    want = reference(gnu_archive)
    assert normalized(members) == want
    names = {m.name for m in members}
    assert {"0088/", "0088/a.jpg", "0088/link.jpg", LONG_NAME, UNICODE_NAME} <= names
    by_name = {m.name: m for m in members}
    assert by_name["0088/"].is_dir and not by_name["0088/"].is_regular
    link = by_name["0088/link.jpg"]
    assert link.type == b"2" and not link.is_regular and link.link == "a.jpg" and link.data == b""
    assert by_name[LONG_NAME].is_regular and by_name[LONG_NAME].size == 700
    assert by_name["0088/empty.txt"].size == 0 and by_name["0088/empty.txt"].data == b""
    raw = gnu_archive.read_bytes()
    for m in members:
        assert raw[m.offset : m.offset + m.size] == m.data
        assert m.offset % BLOCK == 0


def test_gnu_tar_names_match_gnu_tars_own_listing(gnu_archive):
    listed = subprocess.run(
        ["tar", "--quoting-style=literal", "-tf", str(gnu_archive)], capture_output=True, check=True
    ).stdout
    assert [m.name for m in tar_reader.walk(gnu_archive)] == listed.decode().splitlines()


def _entries(fmt: int) -> list[tuple[str, str, bytes | str]]:
    rng = random.Random(fmt)
    entries = [
        ("0003", "dir", b""),
        ("0003/x.jpg", "file", rng.randbytes(2000)),
        ("0003/x.txt", "file", b"d 3 1 2 3 1 1 1 0 0 1 1 1 1 1 1 1 1\n"),
        (LONG_NAME, "file", rng.randbytes(513)),  # ustar: split into the prefix and name fields
        ("0003/link", "symlink", "x.jpg"),
        ("0003/exact_block", "file", rng.randbytes(BLOCK)),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        entries.append((UNICODE_NAME, "file", "ü".encode() * 100))
        entries.append(("0003/long_link", "symlink", "t" * 150))
    else:
        entries.append(("0003/nicht_ascii_ä.txt", "file", b"x"))
    return entries


@pytest.mark.parametrize(
    "fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT], ids=["gnu", "pax", "ustar"]
)
def test_tarfile_archives_match_tarfile_listing(tmp_path, fmt):
    entries = _entries(fmt)
    path = tarfile_archive(tmp_path / "t.tar", fmt, entries)
    members = list(tar_reader.walk(path))
    assert normalized(members) == reference(path)
    assert [m.name.rstrip("/") for m in members] == [e[0] for e in entries]
    raw = path.read_bytes()
    for (_, kind, payload), m in zip(entries, members, strict=True):
        assert raw[m.offset : m.offset + m.size] == m.data
        if kind == "file":
            assert m.data == payload and m.is_regular
        if kind == "symlink":
            assert m.link == payload and m.type == b"2"  # a 150-char target: GNU ././@LongLink, pax linkpath
        assert m.is_dir == (kind == "dir")
    if fmt == tarfile.USTAR_FORMAT:  # the prefix field was really used
        assert any(len(m.name) > 100 for m in members)


def test_pax_size_overrides_the_header_size():
    record = pax_record("size", "3")
    assert record == b"9 size=3\n"
    data = with_pax(record, member=b"xyz", header_size=0)
    (m,) = read_all(data)
    assert (m.name, m.size, m.data) == ("a", 3, b"xyz")


def test_pax_path_overrides_the_header_name_for_one_member_only():
    record = pax_record("path", "long/one")
    assert record == b"17 path=long/one\n"
    body = raw_header(b"PaxHeader", len(record), b"x") + padded(record)
    body += raw_header(b"a", 1, b"0") + padded(b"1") + raw_header(b"b", 1, b"0") + padded(b"2")
    body += bytes(2 * BLOCK)
    assert [m.name for m in read_all(body)] == ["long/one", "b"]


def test_empty_archive_has_no_members(tmp_path):
    path = tmp_path / "empty.tar"
    tarfile.open(path, "w").close()
    assert path.stat().st_size == DEFAULT_RECORD_BYTES
    assert list(tar_reader.walk(path)) == []


# ------------------------------------------------------------------------------- truncation, bytewise
@pytest.fixture(scope="module")
def small_gnu(tmp_path_factory) -> tuple[Path, bytes]:
    """A 3 KiB GNU archive: two files, the end-of-archive marker, one block of record padding."""
    tmp = tmp_path_factory.mktemp("small")
    populate(tmp / "src", {"a.txt": b"0123456789", "b.txt": b""})
    path = gnu_tar(tmp / "small.tar", tmp / "src", "a.txt", "b.txt", blocking=6)
    raw = path.read_bytes()
    assert len(raw) == 3072 and raw[-1536:] == bytes(1536)
    return path, raw


def _verdicts(raw: bytes, lengths, tmp_path: Path, full: list[tuple], also=()) -> tuple[dict, dict]:
    """(reader accepts, GNU tar accepts) by prefix length; an accepted prefix must be complete.

    GNU tar runs on every prefix the reader accepts (what "never more lenient" needs) and on ``also``.
    """
    reader: dict[int, bool] = {}
    for n in lengths:
        try:
            got = read_all(raw[:n])
        except TarError:
            reader[n] = False
        else:
            assert facts(got) == full, n
            reader[n] = True
    cuts: dict[int, Path] = {}
    for n in sorted({n for n, ok in reader.items() if ok} | set(also)):
        cuts[n] = tmp_path / f"cut_{n:05d}.tar"
        cuts[n].write_bytes(raw[:n])
    gnu = gnu_accepts(list(cuts.values()))
    return reader, {n: gnu[c] for n, c in cuts.items()}


def test_every_prefix_is_refused_or_complete_and_never_more_lenient_than_gnu_tar(small_gnu, tmp_path):
    path, raw = small_gnu
    full = facts(tar_reader.walk(path))
    assert [m[0] for m in full] == ["a.txt", "b.txt"]
    end = len(raw) - 1536  # where the end-of-archive marker starts
    cases = (0, 100, 511, 512, 700, 1023, 1024, 1025, 1535, 1536, end - 1, end, end + 1, end + BLOCK)
    reader, gnu = _verdicts(raw, range(len(raw) + 1), tmp_path, full, also=cases)
    assert [n for n in gnu if reader[n] and not gnu[n]] == []  # never more lenient than GNU tar
    # the reader accepts exactly the prefixes that hold the whole marker (the record padding is optional)
    assert [n for n in reader if reader[n]] == list(range(end + 2 * BLOCK, len(raw) + 1))
    # GNU tar itself is more lenient: these are the cases the reader exists for
    lenient = [n for n in gnu if gnu[n] and not reader[n]]
    assert 1024 in lenient  # cut at the boundary after a.txt, no end marker at all
    assert end in lenient  # cut after the last member, no end marker at all
    assert end + BLOCK in lenient  # a lone zero block
    assert gnu[len(raw)] and not gnu[1023] and not gnu[700]  # (GNU tar does refuse a cut inside a block)


def test_prefixes_of_a_long_name_archive_at_block_edges(tmp_path):
    """GNU tar's long names: cuts at, before and after every block edge (inside the ././@LongLink header,
    its name data, the real header), checked the same way as the bytewise test (fewer tar runs)."""
    populate(tmp_path / "src", {LONG_NAME: b"abc", "z.txt": b"z"})
    path = gnu_tar(tmp_path / "long.tar", tmp_path / "src", LONG_NAME, "z.txt", blocking=8)
    raw = path.read_bytes()
    full = facts(tar_reader.walk(path))
    assert [m[0] for m in full] == [LONG_NAME, "z.txt"]
    lengths = sorted(
        {
            q
            for k in range(len(raw) // BLOCK + 1)
            for q in (k * BLOCK - 1, k * BLOCK, k * BLOCK + 1)
            if 0 <= q <= len(raw)
        }
        | {600, 1100, 1538}
    )
    reader, gnu = _verdicts(raw, lengths, tmp_path, full, also=lengths)
    assert [n for n in reader if reader[n] and not gnu[n]] == []
    assert not reader[2048] and gnu[2048]  # the long-named member complete, nothing after it
    assert not reader[1024] and not reader[1536]  # cut after the long name, or after the real header


def test_cut_at_member_boundary_and_lone_zero_block_are_refused(small_gnu):
    _, raw = small_gnu
    end = len(raw) - 1536
    with pytest.raises(TarError, match=r"truncated archive.*without the end-of-archive marker"):
        read_all(raw[:1024])
    with pytest.raises(TarError, match=rf"mem\.tar: truncated archive.*after {end} bytes"):
        read_all(raw[:end])
    with pytest.raises(TarError, match=f"end-of-archive marker at byte {end} is incomplete"):
        read_all(raw[: end + BLOCK])
    with pytest.raises(
        TarError, match=re.escape("truncated archive: member 'a.txt' ends at byte 522, the file has 515")
    ):
        read_all(raw[:515])
    with pytest.raises(TarError, match="not a tar archive"):
        read_all(raw[:100])
    with pytest.raises(TarError, match="not a tar archive"):
        read_all(b"")


def test_lone_zero_block_between_members_is_refused(small_gnu):
    _, raw = small_gnu
    holed = raw[:1024] + bytes(BLOCK) + raw[1024:]
    with pytest.raises(TarError, match="data after a zero block at byte 1024"):
        read_all(holed)
    # Python's tarfile stops there quietly, with a member missing: the reader must not
    with tarfile.open(fileobj=io.BytesIO(holed)) as tf:
        assert len(tf.getmembers()) == 1


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_every_prefix_of_a_tarfile_archive_is_refused_or_complete(tmp_path, fmt):
    path = tarfile_archive(tmp_path / "t.tar", fmt, _entries(fmt)[:5])
    raw = path.read_bytes()
    full = facts(tar_reader.walk(path))
    ok = []
    for n in range(len(raw) + 1):
        try:
            got = read_all(raw[:n])
        except TarError:
            continue
        assert facts(got) == full, n
        ok.append(n)
    content_end = len(raw.rstrip(b"\0"))  # the last member's data ends here (its padding is zeros)
    assert ok and ok[0] > content_end and ok[-1] == len(raw)
    assert ok == list(range(ok[0], len(raw) + 1))


# ---------------------------------------------------------------------------- zeros and damaged bytes
@pytest.fixture(scope="module")
def big_gnu(tmp_path_factory) -> tuple[bytes, list[int], int]:
    """~110 KiB of small members (GNU tar): raw bytes, header offsets, the end-of-archive offset."""
    tmp = tmp_path_factory.mktemp("big")
    rng = random.Random(7)
    files = {f"0009/img_{i:03d}.jpg": rng.randbytes(rng.randint(1, 2000)) for i in range(55)}
    populate(tmp / "src", files)
    path = gnu_tar(tmp / "big.tar", tmp / "src", "0009")
    raw = path.read_bytes()
    with tarfile.open(path) as tf:
        infos = tf.getmembers()
    headers = [ti.offset for ti in infos]
    end = infos[-1].offset_data + -(-infos[-1].size // BLOCK) * BLOCK
    assert raw[end : end + 2 * BLOCK] == bytes(2 * BLOCK) and raw[end - BLOCK : end] != bytes(BLOCK)
    assert len(raw) - end - 2 * BLOCK >= 1024  # record padding to put a byte into
    assert len(raw) >= 10 * DEFAULT_RECORD_BYTES and len(raw) % DEFAULT_RECORD_BYTES == 0
    assert len(read_all(raw)) == 56
    return raw, headers, end


def _zero_from(raw: bytes, p: int) -> bytes:
    return raw[:p] + bytes(len(raw) - p)


def _damaged_header(raw: bytes, headers: list[int], p: int) -> bool:
    """Whether zeroing from p changes a header's bytes (the header then fails its checksum)."""
    h = max((h for h in headers if h <= p), default=None)
    return h is not None and p < h + BLOCK and raw[p : h + BLOCK] != bytes(h + BLOCK - p)


def _zero_positions(raw: bytes, headers: list[int], end: int) -> list[int]:
    bounds = [*headers, end]
    max_span = max(b - a for a, b in itertools.pairwise(bounds))
    last = len(raw) - DEFAULT_RECORD_BYTES - 2 * BLOCK - max_span  # the next header >= p is then far enough
    picks = set(range(0, last, 29))
    for h in headers:
        picks.update(q for q in (h - 1, h, h + 1, h + 100, h + 511, h + 512) if 0 <= q <= last)
    return sorted(picks)


def test_zero_filled_tail_is_refused_as_an_unfinished_download(big_gnu):
    raw, headers, end = big_gnu
    positions = _zero_positions(raw, headers, end)
    assert len(positions) > 3000
    for p in positions:
        # the next header at or after p lies before the marker, with a record and more of zeros after it
        nxt = min(h for h in [*headers, end] if h >= p)
        assert nxt < end and len(raw) - nxt - 2 * BLOCK >= DEFAULT_RECORD_BYTES
        with pytest.raises(TarError) as err:
            read_all(_zero_from(raw, p))
        if not _damaged_header(raw, headers, p):
            msg = str(err.value)
            assert "zeros" in msg and "unfinished download" in msg, (p, msg)


def test_zero_filled_tail_starting_inside_a_header_says_unfinished_download(big_gnu):
    raw, headers, _ = big_gnu
    p = headers[10] + 5  # inside the name field of the 11th member's header
    assert _damaged_header(raw, headers, p)
    with pytest.raises(TarError, match="unfinished download"):
        read_all(_zero_from(raw, p))


def test_zeros_replacing_the_whole_file_are_refused(big_gnu):
    raw, _, _ = big_gnu
    with pytest.raises(TarError, match="zeros after the end-of-archive marker at byte 0"):
        read_all(bytes(len(raw)))


def test_complete_archive_and_its_record_padding_are_accepted(big_gnu):
    raw, _, end = big_gnu
    assert len(read_all(raw)) == 56
    assert len(read_all(raw[: end + 2 * BLOCK])) == 56  # without the record padding: still complete


def test_non_zero_byte_after_the_end_marker_is_refused(big_gnu):
    raw, _, end = big_gnu
    for at in (end + 2 * BLOCK, end + 2 * BLOCK + 777, len(raw) - 1):
        damaged = bytearray(raw)
        damaged[at] = 1
        with pytest.raises(TarError, match=f"data after the end-of-archive marker at byte {end}"):
            read_all(bytes(damaged))
    with pytest.raises(TarError, match="data after the end-of-archive marker"):
        read_all(raw[: end + 2 * BLOCK] + b"x")
    damaged = bytearray(raw)
    damaged[end + BLOCK + 3] = 7  # inside the second block of the marker
    with pytest.raises(TarError, match=f"data after a zero block at byte {end}"):
        read_all(bytes(damaged))


def test_damaged_header_checksum_in_the_middle_is_refused(big_gnu):
    raw, headers, _ = big_gnu
    for h, offset_in_header in ((headers[20], 5), (headers[30], 130), (headers[40], 300)):
        damaged = bytearray(raw)
        damaged[h + offset_in_header] ^= 0x20
        with pytest.raises(TarError, match=f"damaged archive: bad header checksum at byte {h}$"):
            read_all(bytes(damaged))
    damaged = bytearray(raw)
    damaged[0] ^= 0x01
    with pytest.raises(TarError, match="not a tar archive: bad header checksum at byte 0"):
        read_all(bytes(damaged))


def test_not_a_tar_at_all_is_refused(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"PK\x03\x04" + bytes(2000))
    with pytest.raises(TarError, match=re.escape(f"{path}: not a tar archive")):
        list(tar_reader.walk(path))


def test_member_data_beyond_the_file_is_refused_before_reading_it():
    body = raw_header(b"huge.jpg", 10**9, b"0") + bytes(4096)
    with pytest.raises(
        TarError, match=re.escape("member 'huge.jpg' ends at byte 1000000512, the file has 4608 bytes")
    ):
        read_all(body)


def test_oversized_long_name_extension_is_refused():
    size = (1 << 20) + 1
    body = raw_header(b"././@LongLink", size, b"L") + bytes(size + 2 * BLOCK + BLOCK)
    with pytest.raises(TarError, match="header extension of 1048577 bytes"):
        read_all(body)


# ------------------------------------------------------------------------------------- record_bytes
def test_padding_beyond_one_record_needs_record_bytes(tmp_path):
    path = tarfile_archive(tmp_path / "t.tar", tarfile.GNU_FORMAT, [("a.jpg", "file", b"x" * 100)])
    raw = path.read_bytes() + bytes(DEFAULT_RECORD_BYTES)  # a writer with blocking factor 40
    with pytest.raises(TarError, match=r"more than one 10240-byte record.*tar_record_bytes"):
        read_all(raw)
    assert [m.name for m in read_all(raw, record_bytes=2 * DEFAULT_RECORD_BYTES)] == ["a.jpg"]
    with pytest.raises(TarError, match="20480-byte record"):  # and the larger record is still a limit
        read_all(raw + bytes(DEFAULT_RECORD_BYTES), record_bytes=2 * DEFAULT_RECORD_BYTES)


def test_gnu_tar_with_blocking_factor_40(tmp_path):
    populate(tmp_path / "src", {"a.txt": b"hello"})
    path = gnu_tar(tmp_path / "b40.tar", tmp_path / "src", "a.txt", blocking=40)
    assert path.stat().st_size == 2 * DEFAULT_RECORD_BYTES
    with pytest.raises(TarError, match="unfinished download"):
        list(tar_reader.walk(path))
    (m,) = tar_reader.walk(path, record_bytes=40 * BLOCK)
    assert (m.name, m.data) == ("a.txt", b"hello")


# -------------------------------------------------------------------------------------------- checksum
def test_checksum_is_first_8_bytes_of_sha256_signed_big_endian():
    for data in (b"", b"abc", bytes(1000), os.urandom(5000)):
        digest = hashlib.sha256(data).digest()
        want = struct.unpack(">q", digest[:8])[0]
        assert tar_reader.checksum(data) == want
        assert tar_reader.checksum(data) == int.from_bytes(digest[:8], "big", signed=True)
    # both signs occur: it really is signed (an unsigned reading overflows int64 for half the inputs)
    values = [tar_reader.checksum(bytes([i])) for i in range(64)]
    assert any(v < 0 for v in values) and any(v > 0 for v in values)
    assert all(-(2**63) <= v < 2**63 for v in values)
    assert tar_reader.checksum(b"abc") == 0xBA7816BF8F01CFEA - 2**64  # SHA-256("abc") starts ba7816bf...
    assert len(set(values)) == 64
    assert tar_reader.checksum(b"image-1") != tar_reader.checksum(b"image-2")


# ------------------------------------------------------------------------------------------- known bugs
def test_gnu_incremental_archive_names_are_not_prefixed_with_atime(tmp_path):
    populate(tmp_path / "src", {"d/a.txt": b"hi"})
    path = gnu_tar(tmp_path / "inc.tar", tmp_path / "src", "d", extra=("-G",))
    listed = subprocess.run(["tar", "-tf", str(path)], capture_output=True, check=True, text=True).stdout
    assert listed.splitlines() == ["d/", "d/a.txt"]
    assert [m.name for m in tar_reader.walk(path)] == ["d/", "d/a.txt"]


def test_pax_record_of_length_zero_is_refused_not_a_hang(tmp_path):
    path = tmp_path / "pax0.tar"
    path.write_bytes(with_pax(b"0 path=b\n"))
    assert subprocess.run(["tar", "-tf", str(path)], capture_output=True).returncode != 0
    code = (
        "import sys\nfrom building_image_triplet_model.inputs import tar_reader\n"
        "try:\n    list(tar_reader.walk(sys.argv[1]))\nexcept tar_reader.TarError as e:\n"
        "    print('TarError', e)\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, timeout=5
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the reader hangs on a pax record of length 0")
    assert proc.stdout.startswith("TarError")


@pytest.mark.parametrize("pax", [b"99 path=b\n", b"8 pathb\n"], ids=["length_out_of_range", "no_equals"])
def test_malformed_pax_record_is_refused_like_gnu_tar_does(tmp_path, pax):
    path = tmp_path / "pax.tar"
    path.write_bytes(with_pax(pax))
    assert subprocess.run(["tar", "-tf", str(path)], capture_output=True).returncode != 0
    with pytest.raises(TarError, match="pax"):
        list(tar_reader.walk(path))
