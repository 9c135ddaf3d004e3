"""The input (sources.py): strict listing of archive folders, extracted folders, and walking a source."""

from __future__ import annotations

import io
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import tar_of
from PIL import Image

from building_image_triplet_model.errors import InputError
from building_image_triplet_model.inputs import sources, tar_reader
from building_image_triplet_model.inputs.sources import ROOT_SOURCE, list_sources, walk

REPO = Path(__file__).resolve().parents[1]
D_LINE = b"d 88 1 2 3 40.75 -73.98 12.5 0.1 0.99 0.0 40.7501 -73.9801 2.5 20.0 185.0 5.0 0.0\n"
IS_ROOT = os.geteuid() == 0


def jpeg(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def small_tar(path: Path) -> Path:
    return tar_of(path, {"0001/a.jpg": jpeg((200, 10, 10)), "0001/a.txt": D_LINE})


def input_error(input_dir: Path) -> str:
    with pytest.raises(InputError) as err:
        list_sources(input_dir)
    return str(err.value)


# --------------------------------------------------------------------------------------- list_sources
def test_folder_of_archives(tmp_path):
    for name in ("0009", "0003", "0088", "a-b_c.d"):
        small_tar(tmp_path / f"{name}.tar")
    (tmp_path / "notes.md").write_text("not an archive")
    (tmp_path / "Readme.txt").write_text("the upstream readme")
    (tmp_path / "sub").mkdir()
    found = list_sources(tmp_path)
    assert [s.name for s in found] == ["0003", "0009", "0088", "a-b_c.d"]
    assert all(s.kind == "tar" for s in found)
    assert [s.path for s in found] == [tmp_path / f"{n}.tar" for n in ("0003", "0009", "0088", "a-b_c.d")]


def test_signature_of_an_archive_is_name_size_mtime(tmp_path):
    path = small_tar(tmp_path / "0003.tar")
    (src,) = list_sources(tmp_path)
    sig = src.signature()
    assert sig == {"name": "0003", "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
    os.utime(path, ns=(1, 2_000_000_000))
    assert src.signature()["mtime_ns"] == 2_000_000_000


def test_folder_named_like_an_archive(tmp_path):
    small_tar(tmp_path / "0003.tar")
    (tmp_path / "0004.tar").mkdir()
    msg = input_error(tmp_path)
    assert f"{tmp_path / '0004.tar'}: looks like an archive but is a folder" in msg
    assert "0003.tar" not in msg


def test_fifo_named_like_an_archive_is_refused_without_opening_it(tmp_path):
    small_tar(tmp_path / "0003.tar")
    fifo = tmp_path / "0004.tar"
    os.mkfifo(fifo)
    # A real subprocess: opening a FIFO for reading blocks until a writer comes, so a hang is a timeout.
    code = (
        "import sys\nfrom building_image_triplet_model import errors\n"
        "from building_image_triplet_model.inputs import sources\n"
        "try:\n    sources.list_sources(sys.argv[1])\nexcept errors.InputError as e:\n    print(e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{fifo}: looks like an archive but is a FIFO"
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_device_reached_through_a_symlink(tmp_path):
    small_tar(tmp_path / "0003.tar")
    os.symlink("/dev/null", tmp_path / "0005.tar")
    assert input_error(tmp_path) == f"{tmp_path / '0005.tar'}: looks like an archive but is a device"


def test_device_node_named_like_an_archive(tmp_path):
    path = tmp_path / "0006.tar"
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here: {exc}")
    assert input_error(tmp_path) == f"{path}: looks like an archive but is a device"


def test_socket_named_like_an_archive(tmp_path):
    path = tmp_path / "0007.tar"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        assert input_error(tmp_path) == f"{path}: looks like an archive but is a socket"


def test_broken_symlink(tmp_path):
    small_tar(tmp_path / "0003.tar")
    os.symlink(tmp_path / "gone" / "0008.tar", tmp_path / "0008.tar")
    msg = input_error(tmp_path)
    assert msg.startswith(f"{tmp_path / '0008.tar'}: cannot be read") and "No such file" in msg


def test_symlink_to_a_folder_named_like_an_archive(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "in").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "0003.tar")
    assert "looks like an archive but is a folder" in input_error(tmp_path / "in")


def test_symlink_to_a_regular_archive_is_fine(tmp_path):
    real = small_tar(tmp_path / "store" / "real.tar")
    (tmp_path / "in").mkdir()
    os.symlink(real, tmp_path / "in" / "0003.tar")
    (src,) = list_sources(tmp_path / "in")
    assert (src.name, src.kind, src.path) == ("0003", "tar", tmp_path / "in" / "0003.tar")
    assert [m.path for m in walk(src)] == ["0001/a.jpg", "0001/a.txt"]


def test_aria2_control_file_beside_an_archive(tmp_path):
    small_tar(tmp_path / "0003.tar")
    small_tar(tmp_path / "0004.tar")
    (tmp_path / "0004.tar.aria2").write_bytes(b"\0" * 16)
    assert input_error(tmp_path) == (
        f"{tmp_path / '0004.tar'}: is still downloading (aria2c control file 0004.tar.aria2 beside it)"
    )


def test_aria2_control_file_alone(tmp_path):
    small_tar(tmp_path / "0003.tar")
    (tmp_path / "0009.tar.aria2").write_bytes(b"\0")
    msg = input_error(tmp_path)
    assert msg.startswith(f"{tmp_path / '0009.tar'}: has not arrived yet") and "0009.tar.aria2" in msg


def test_aria2_control_file_in_an_otherwise_extracted_folder(tmp_path):
    (tmp_path / "0001").mkdir()
    (tmp_path / "0001" / "a.jpg").write_bytes(jpeg((1, 2, 3)))
    (tmp_path / "0002.tar.aria2").write_bytes(b"\0")
    assert f"{tmp_path / '0002.tar'}: has not arrived yet" in input_error(tmp_path)


def test_every_problem_is_named_at_once(tmp_path):
    small_tar(tmp_path / "0003.tar")
    (tmp_path / "0004.tar").mkdir()
    os.mkfifo(tmp_path / "0005.tar")
    (tmp_path / "0006.tar.aria2").write_bytes(b"\0")
    msg = input_error(tmp_path)
    for name in ("0004.tar", "0005.tar", "0006.tar"):
        assert str(tmp_path / name) in msg
    assert msg.count("; ") == 2


@pytest.mark.parametrize(
    "name", ["bad name.tar", "-x.tar", ".hidden.tar", "caf\u00e9.tar", "x" * 101 + ".tar"]
)
def test_archive_names_that_cannot_be_source_names(tmp_path, name):
    small_tar(tmp_path / "0003.tar")
    small_tar(tmp_path / name)
    msg = input_error(tmp_path)
    assert msg == f"{tmp_path / name}: archive names are letters, digits, '.', '_' and '-'"


def test_missing_input_dir_and_a_file_as_input_dir(tmp_path):
    missing = tmp_path / "nope"
    assert input_error(missing) == f"{missing}: input_dir does not exist or is not a folder"
    small_tar(tmp_path / "0003.tar")
    assert "input_dir does not exist or is not a folder" in input_error(tmp_path / "0003.tar")


def test_empty_input_dir(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / ".cache").mkdir()
    assert input_error(tmp_path) == f"{tmp_path}: no NNNN.tar archives and no image folders in input_dir"


# ---------------------------------------------------------------------------------- extracted folders
@pytest.fixture
def extracted(tmp_path) -> Path:
    root = tmp_path / "extracted"
    files = {
        "0001/a.jpg": jpeg((255, 0, 0)),
        "0001/a.txt": D_LINE,
        "0001/deeper/b.JPEG": jpeg((0, 255, 0)),
        "0001/deeper/b.txt": D_LINE.replace(b" 1 2 3 ", b" 7 2 3 "),
        "0002/c.jpg": jpeg((0, 0, 255)),
        "0002/notes.md": b"other",
        "top.jpg": jpeg((9, 9, 9)),
        "top.txt": D_LINE,
        "readme.md": b"not a source file",
        ".cache/x.jpg": jpeg((1, 1, 1)),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_extracted_folder_sources(extracted):
    found = list_sources(extracted)
    assert {s.name: (s.kind, s.path) for s in found} == {
        ROOT_SOURCE: ("dir", extracted),
        "0001": ("dir", extracted / "0001"),
        "0002": ("dir", extracted / "0002"),
    }
    assert [s.name for s in found if s.name != ROOT_SOURCE] == ["0001", "0002"]


def test_root_source_only_when_top_level_images_or_txt(extracted):
    for name in ("top.jpg", "top.txt"):
        (extracted / name).unlink()
    assert [s.name for s in list_sources(extracted)] == ["0001", "0002"]
    (extracted / "solo.TXT").write_bytes(D_LINE)
    assert ROOT_SOURCE in [s.name for s in list_sources(extracted)]


def test_walk_of_a_folder_source(extracted):
    by_name = {s.name: s for s in list_sources(extracted)}
    members = {m.path: m for m in walk(by_name["0001"])}
    assert set(members) == {"a.jpg", "a.txt", "deeper/b.JPEG", "deeper/b.txt"}
    a = members["a.jpg"]
    raw = (extracted / "0001" / "a.jpg").read_bytes()
    assert (a.kind, a.offset, a.size, a.data) == ("jpg", -1, len(raw), None)
    assert a.checksum == tar_reader.checksum(raw)
    assert members["deeper/b.JPEG"].kind == "jpg"
    assert members["deeper/b.JPEG"].checksum != a.checksum
    assert members["a.txt"].kind == "txt" and members["a.txt"].data == D_LINE
    assert members["a.txt"].checksum is None
    other = {m.path: m for m in walk(by_name["0002"])}
    assert other["notes.md"].kind == "other" and other["notes.md"].data is None


def test_root_source_walks_only_the_top_level(extracted):
    root = next(s for s in list_sources(extracted) if s.name == ROOT_SOURCE)
    assert sorted(m.path for m in walk(root)) == ["readme.md", "top.jpg", "top.txt"]


def test_folder_signature_changes_when_a_file_is_added(extracted):
    src = next(s for s in list_sources(extracted) if s.name == "0001")
    before = src.signature()
    assert before["files"] == 4 and before["name"] == "0001"
    assert before["size"] == sum(p.stat().st_size for p in (extracted / "0001").rglob("*") if p.is_file())
    (extracted / "0001" / "deeper" / "new.jpg").write_bytes(b"x")
    after = src.signature()
    assert after["files"] == 5 and after["size"] == before["size"] + 1


def test_irregular_files_in_a_folder_are_not_opened(extracted):
    os.mkfifo(extracted / "0001" / "pipe.jpg")
    os.symlink(extracted / "0001" / "a.jpg", extracted / "0001" / "link.jpg")
    code = (
        "import sys\nfrom building_image_triplet_model.inputs import sources\n"
        "src = [s for s in sources.list_sources(sys.argv[1]) if s.name == '0001'][0]\n"
        "for m in sorted(sources.walk(src), key=lambda m: m.path):\n    print(m.path, m.kind)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(extracted)], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "a.jpg jpg",
        "a.txt txt",
        "deeper/b.JPEG jpg",
        "deeper/b.txt txt",
        "link.jpg irregular",
        "pipe.jpg irregular",
    ]


def test_large_txt_in_a_folder_is_not_read(extracted):
    big = extracted / "0002" / "big.txt"
    big.write_bytes(D_LINE + b"#" * sources.MAX_TXT_BYTES)
    (m,) = [
        m for m in walk(next(s for s in list_sources(extracted) if s.name == "0002")) if m.path == "big.txt"
    ]
    assert (m.kind, m.size, m.data) == ("txt", len(D_LINE) + sources.MAX_TXT_BYTES, None)


@pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 file anyway")
def test_unreadable_jpg_in_a_folder_has_no_checksum(extracted):
    path = extracted / "0001" / "a.jpg"
    path.chmod(0)
    try:
        members = {m.path: m for m in walk(next(s for s in list_sources(extracted) if s.name == "0001"))}
    finally:
        path.chmod(0o644)
    assert members["a.jpg"].kind == "jpg" and members["a.jpg"].checksum is None
    assert members["a.jpg"].size == path.stat().st_size
    assert members["deeper/b.JPEG"].checksum is not None


@pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 folder anyway")
def test_unreadable_subfolder_is_an_input_error(extracted):
    folder = extracted / "0001" / "deeper"
    folder.chmod(0)
    try:
        with pytest.raises(InputError, match="deeper"):
            list(walk(next(s for s in list_sources(extracted) if s.name == "0001")))
    finally:
        folder.chmod(0o755)


def test_subfolder_with_an_unusable_name_is_not_dropped_silently(extracted):
    (extracted / "my photos").mkdir()
    (extracted / "my photos" / "x.jpg").write_bytes(jpeg((5, 5, 5)))
    (extracted / "my photos" / "x.txt").write_bytes(D_LINE)
    try:
        found, problem = list_sources(extracted), ""
    except InputError as exc:
        found, problem = [], str(exc)
    assert str(extracted / "my photos") in problem or any(s.path == extracted / "my photos" for s in found)


# ------------------------------------------------------------------------------------------- walk tar
def test_walk_of_an_archive(tmp_path):
    img = jpeg((10, 200, 30))
    img2 = jpeg((11, 12, 13), size=32)
    big_txt = b"#" * (sources.MAX_TXT_BYTES + 1)
    path = tar_of(
        tmp_path / "0003.tar",
        {
            "0003/x.jpg": img,
            "0003/x.txt": D_LINE,
            "0003/y.JPEG": img2,
            "0003/notes.md": b"hello",
            "0003/huge.txt": big_txt,
            "0003/limit.txt": b"#" * sources.MAX_TXT_BYTES,
        },
        dirs=["0003"],
        symlinks={"0003/link.jpg": "x.jpg"},
    )
    (src,) = list_sources(tmp_path)
    members = list(walk(src))
    assert [m.path for m in members] == [
        "0003/x.jpg",
        "0003/x.txt",
        "0003/y.JPEG",
        "0003/notes.md",
        "0003/huge.txt",
        "0003/limit.txt",
        "0003/link.jpg",
    ]  # the folder member is skipped
    by = {m.path: m for m in members}
    raw = path.read_bytes()
    x = by["0003/x.jpg"]
    assert (x.kind, x.size, x.data) == ("jpg", len(img), None)
    assert raw[x.offset : x.offset + x.size] == img
    assert x.checksum == tar_reader.checksum(img) and by["0003/y.JPEG"].checksum == tar_reader.checksum(img2)
    t = by["0003/x.txt"]
    assert (t.kind, t.data, t.checksum) == ("txt", D_LINE, None)
    assert raw[t.offset : t.offset + t.size] == D_LINE
    assert (by["0003/notes.md"].kind, by["0003/notes.md"].data) == ("other", None)
    assert (by["0003/huge.txt"].kind, by["0003/huge.txt"].data) == ("txt", None)
    assert by["0003/limit.txt"].data == b"#" * sources.MAX_TXT_BYTES
    assert (by["0003/link.jpg"].kind, by["0003/link.jpg"].checksum) == ("irregular", None)


def test_truncated_archive_is_an_input_error_naming_it(tmp_path):
    path = small_tar(tmp_path / "0003.tar")
    raw = path.read_bytes()
    path.write_bytes(raw[:1024])  # a.jpg's header and part of its data
    (src,) = list_sources(tmp_path)
    with pytest.raises(InputError) as err:
        list(walk(src))
    assert str(err.value).startswith(f"{path}: truncated archive")
    files = {"0001/a.jpg": jpeg((1, 2, 3)), "0001/a.txt": D_LINE, "0001/z.bin": os.urandom(25_000)}
    raw = tar_of(path, files).read_bytes()
    assert len(list(walk(src))) == 3
    path.write_bytes(raw[:512] + bytes(len(raw) - 512))  # the tail an unfinished download leaves
    with pytest.raises(InputError, match=re.escape(f"{path}: ") + ".*unfinished download"):
        list(walk(src))


def test_walk_passes_record_bytes_on(tmp_path):
    path = small_tar(tmp_path / "0003.tar")
    path.write_bytes(path.read_bytes() + bytes(tar_reader.DEFAULT_RECORD_BYTES))
    (src,) = list_sources(tmp_path)
    with pytest.raises(InputError, match="tar_record_bytes"):
        list(walk(src))
    assert len(list(walk(src, record_bytes=2 * tar_reader.DEFAULT_RECORD_BYTES))) == 2


def test_archive_removed_after_listing_is_an_input_error(tmp_path):
    path = small_tar(tmp_path / "0003.tar")
    (src,) = list_sources(tmp_path)
    path.unlink()
    with pytest.raises(InputError, match=re.escape(f"{path}: cannot be read")):
        list(walk(src))


def test_stem_of():
    assert sources.stem_of("0003/0003/abc.def.jpg") == "abc.def"
    assert sources.stem_of("0003/abc.txt") == "abc"
    assert sources.stem_of("abc") == "abc"
    assert sources.stem_of("a.b/noext") == "noext"


# ------------------------------------------------------------------- the last member's own bytes
@pytest.mark.parametrize(
    ("last", "data", "refused"),
    [
        ("0001/b.jpg", jpeg((1, 2, 3)), False),
        ("0001/b.jpg", jpeg((1, 2, 3)) + b"\0\0\0", False),  # padded after its EOI marker: complete
        ("0001/b.jpg", jpeg((1, 2, 3))[:-40] + bytes(40), True),  # zeros where its end was
        ("0001/b.txt", D_LINE, False),
        ("0001/b.txt", D_LINE[:30] + bytes(len(D_LINE) - 30), True),
        ("0001/Readme", b"other files may end in zeros\0", False),
    ],
)
def test_a_last_member_whose_end_is_zeros_is_an_unfinished_download(tmp_path, last, data, refused):
    path = tar_of(
        tmp_path / "in" / "0001.tar", {"0001/a.jpg": jpeg((9, 9, 9)), "0001/a.txt": D_LINE, last: data}
    )
    [source] = list_sources(path.parent)
    if refused:
        with pytest.raises(InputError, match=f"{re.escape(str(path))}: its last member {last} ends in zero"):
            list(walk(source))
    else:
        assert [m.path for m in walk(source)][-1] == last
