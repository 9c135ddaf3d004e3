"""durable.py: a write leaves the old file or the new one, never half; reads refuse damaged files and
pickles."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import REPO

from building_image_triplet_model.io import durable

# A child that writes new content over the target; the failpoint kills its whole process group between the
# temporary file's fsync and the rename.
WRITER = """
import sys
from building_image_triplet_model.io import durable
for name in sys.argv[2:]:
    durable.write_json(f"{sys.argv[1]}/{name}", {"version": "new", "name": name})
print("survived", flush=True)
"""


def write_in_child(folder: Path, names: list[str], failpoint: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRIPLET_FAILPOINT": failpoint}
    return subprocess.run(
        [sys.executable, "-c", WRITER, str(folder), *names],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # the failpoint kills the child's process group, never pytest's
    )


def tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(f"*{durable.TMP_SUFFIX}"))


# --------------------------------------------------------------------------------------- atomic writes
def test_kill_between_fsync_and_rename_leaves_the_old_file_and_one_tmp(tmp_path: Path) -> None:
    target = tmp_path / "target.json"
    durable.write_json(target, {"version": "old"})
    old_bytes = target.read_bytes()

    proc = write_in_child(tmp_path, ["target.json"], "write:target.json@1")

    assert proc.returncode == -9, proc.stdout + proc.stderr  # SIGKILLed, not finished
    assert "survived" not in proc.stdout
    assert target.read_bytes() == old_bytes
    leftovers = tmp_files(tmp_path)
    assert len(leftovers) == 1
    assert leftovers[0].name.startswith(".target.json.")
    # The temporary file was complete and fsynced before the kill: only the rename was missing.
    assert json.loads(leftovers[0].read_bytes()) == {"name": "target.json", "version": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([leftovers[0].name, "target.json"])

    assert durable.remove_tmp_files(tmp_path) == 1
    assert tmp_files(tmp_path) == []
    assert target.read_bytes() == old_bytes
    assert durable.remove_tmp_files(tmp_path) == 0


def test_the_failpoint_kills_at_the_nth_write_of_the_named_file_only(tmp_path: Path) -> None:
    proc = write_in_child(tmp_path, ["a.json", "b.json", "c.json"], "write:b.json@1")
    assert proc.returncode == -9
    assert durable.read_json(tmp_path / "a.json") == {"name": "a.json", "version": "new"}  # committed
    assert not (tmp_path / "b.json").exists()  # a new file: absent, never half there
    assert not (tmp_path / "c.json").exists()
    assert [p.name[:8] for p in tmp_files(tmp_path)] == [".b.json."]

    other = tmp_path / "other"
    proc = write_in_child(other, ["a.json"], "write:zzz.json@1")  # a pattern that matches nothing
    assert proc.returncode == 0 and "survived" in proc.stdout
    assert durable.read_json(other / "a.json") == {"name": "a.json", "version": "new"}
    assert tmp_files(other) == []


def test_remove_tmp_files_reaches_into_subfolders_and_keeps_everything_else(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / ".x.npz.1234.tmp").write_bytes(b"half")
    (tmp_path / ".y.json.99.tmp").write_bytes(b"half")
    (tmp_path / "a" / "keep.json").write_text("{}")
    (tmp_path / "a" / "tmp.json").write_text("{}")  # 'tmp' in the name, not the suffix
    assert durable.remove_tmp_files(tmp_path) == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "a/keep.json",
        "a/tmp.json",
    ]
    assert durable.remove_tmp_files(tmp_path / "absent") == 0


def test_an_exception_inside_atomic_open_leaves_the_target_alone(tmp_path: Path) -> None:
    target = tmp_path / "t.bin"
    durable.write_bytes(target, b"old")

    def write_then_fail() -> None:
        with durable.atomic_open(target) as fh:
            fh.write(b"new, half written")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_then_fail()
    assert target.read_bytes() == b"old"
    assert tmp_files(tmp_path) == []


def test_finished_files_get_the_normal_mode_and_the_asked_mtime(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "t.bin"  # the folder is created
    with durable.atomic_open(target, mtime_ns=1_234_567_890_000_000_000) as fh:
        fh.write(b"data")
    st = target.stat()
    assert st.st_mode & 0o777 == durable.FILE_MODE  # not mkstemp's 0600
    assert st.st_mtime_ns == 1_234_567_890_000_000_000
    assert target.read_bytes() == b"data"


def test_create_only_refuses_an_existing_target_and_leaves_it_untouched(tmp_path: Path) -> None:
    target = tmp_path / "claim.json"
    durable.write_json(target, {"owner": "first"}, create_only=True)  # absent: created
    before = target.stat()
    with pytest.raises(FileExistsError):
        durable.write_json(target, {"owner": "second"}, create_only=True)
    assert durable.read_json(target) == {"owner": "first"}
    assert target.stat().st_ino == before.st_ino and target.stat().st_mtime_ns == before.st_mtime_ns
    assert tmp_files(tmp_path) == []
    durable.write_json(target, {"owner": "second"})  # a plain write replaces it
    assert durable.read_json(target) == {"owner": "second"}


# ------------------------------------------------------------------------------------------------ JSON
def test_json_round_trip_with_numpy_scalars_and_paths(tmp_path: Path) -> None:
    durable.write_json(tmp_path / "a.json", {"n": np.int64(3), "x": np.float32(0.5), "p": Path("/x/y")})
    assert durable.read_json(tmp_path / "a.json") == {"n": 3, "x": 0.5, "p": "/x/y"}
    with pytest.raises(TypeError, match="not JSON serializable: set"):
        durable.write_json(tmp_path / "b.json", {"s": {1, 2}})
    assert not (tmp_path / "b.json").exists()


def test_read_json_missing_is_none_and_damage_is_corrupt_file_error(tmp_path: Path) -> None:
    assert durable.read_json(tmp_path / "absent.json") is None
    good = durable.dumps_json({"key": "value", "rows": list(range(20))}).encode()
    for name, data in [
        ("truncated.json", good[: len(good) // 2]),
        ("garbage.json", b"\x00\x17\xff not json"),
        ("empty.json", b""),
        ("zeros.json", bytes(64)),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(durable.CorruptFileError) as err:
            durable.read_json(path)
        assert err.value.path == path
        assert str(path) in str(err.value) and "not valid JSON" in str(err.value)


# ------------------------------------------------------------------------------------------------- npz
def arrays() -> dict[str, np.ndarray]:
    return {
        "rows": np.arange(1000, dtype=np.int64),
        "emb": np.linspace(0, 1, 4000, dtype=np.float32).reshape(1000, 4),
        "name": np.array([b"abc", b"de"]),
    }


def test_npz_round_trip_keeps_dtypes_and_values(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    durable.write_npz(path, arrays())
    back = durable.read_npz(path)
    assert sorted(back) == ["emb", "name", "rows"]
    for key, arr in arrays().items():
        assert back[key].dtype == arr.dtype
        np.testing.assert_array_equal(back[key], arr)
    assert list(durable.read_npz(path, ("rows",))) == ["rows"]
    lazy = durable.LazyNpz(path)
    assert len(lazy) == 3 and sorted(lazy) == ["emb", "name", "rows"]
    np.testing.assert_array_equal(lazy["emb"], arrays()["emb"])


def member_data_range(path: Path, member: str) -> tuple[int, int]:
    """The byte range of one stored (uncompressed) member's data inside a zip file."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    raw = path.read_bytes()
    name_len, extra_len = np.frombuffer(raw[info.header_offset + 26 : info.header_offset + 30], "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len)
    return start, start + info.compress_size


def damaged_copies(src: Path, folder: Path) -> dict[str, Path]:
    raw = src.read_bytes()
    a, b = member_data_range(src, "emb.npy")
    flipped = bytearray(raw)
    flipped[(a + b) // 2] ^= 0x01  # one bit of one float inside the array's data: only the CRC sees it
    out = {
        "truncated": raw[: len(raw) // 2],
        "zeroed": bytes(len(raw)),
        "flipped": bytes(flipped),
        "empty": b"",
    }
    paths = {}
    for name, data in out.items():
        paths[name] = folder / f"{name}.npz"
        paths[name].write_bytes(data)
    return paths


def test_read_npz_refuses_truncated_zeroed_and_bit_flipped_files(tmp_path: Path) -> None:
    src = tmp_path / "good.npz"
    durable.write_npz(src, arrays())
    for name, path in damaged_copies(src, tmp_path).items():
        with pytest.raises(durable.CorruptFileError) as err:
            durable.read_npz(path)
        assert err.value.path == path, name
        assert str(path) in str(err.value)
    # The flipped byte lies in emb: asking only for the other arrays reads fine (CRC per array).
    np.testing.assert_array_equal(
        durable.read_npz(tmp_path / "flipped.npz", ("rows",))["rows"], np.arange(1000)
    )


def test_lazy_npz_refuses_damage_when_opened_or_when_the_array_is_read(tmp_path: Path) -> None:
    src = tmp_path / "good.npz"
    durable.write_npz(src, arrays())
    paths = damaged_copies(src, tmp_path)
    for name in ("truncated", "zeroed", "empty"):
        with pytest.raises(durable.CorruptFileError) as err:
            durable.LazyNpz(paths[name])
        assert err.value.path == paths[name]
    lazy = durable.LazyNpz(paths["flipped"])  # the directory is intact
    np.testing.assert_array_equal(lazy["rows"], np.arange(1000))
    with pytest.raises(durable.CorruptFileError, match=r"flipped\.npz: array emb") as err:
        lazy["emb"]
    assert err.value.path == paths["flipped"]


def test_a_missing_asked_for_array(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    durable.write_npz(path, arrays())
    with pytest.raises(durable.CorruptFileError, match=r"a\.npz: unreadable npz \(KeyError"):
        durable.read_npz(path, ("rows", "codes"))
    # LazyNpz is a Mapping: an array the file never had is a KeyError (so `in` works), not damage.
    lazy = durable.LazyNpz(path)
    assert "codes" not in lazy and "rows" in lazy
    with pytest.raises(KeyError):
        lazy["codes"]
    # ...unless the reader says which arrays the file must hold: then it is damage, found on opening.
    with pytest.raises(durable.CorruptFileError, match=r"a\.npz: lacks the arrays codes"):
        durable.LazyNpz(path, ("rows", "codes"))


def test_missing_npz_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        durable.read_npz(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError):
        durable.LazyNpz(tmp_path / "absent.npz")


def test_object_arrays_are_refused_on_write(tmp_path: Path) -> None:
    path = tmp_path / "o.npz"
    with pytest.raises(TypeError, match=r"o\.npz: array meta has dtype object"):
        durable.write_npz(path, {"rows": np.arange(3), "meta": np.array([{"a": 1}, None], dtype=object)})
    assert not path.exists() and tmp_files(tmp_path) == []


class _Payload:
    """Unpickling this creates a folder: the proof that a load ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_files_never_unpickle(tmp_path: Path) -> None:
    marker = tmp_path / "pickle_ran"
    path = tmp_path / "evil.npz"
    buf = io.BytesIO()
    np.savez(buf, rows=np.arange(3), evil=np.array([_Payload(marker)], dtype=object))  # numpy itself
    path.write_bytes(buf.getvalue())

    with pytest.raises(durable.CorruptFileError, match=r"evil\.npz"):
        durable.read_npz(path)
    with pytest.raises(durable.CorruptFileError, match=r"evil\.npz: array evil"):
        durable.LazyNpz(path)["evil"]
    assert not marker.exists()

    # The control: numpy with pickle allowed does run the payload (so the file is a real threat).
    with np.load(path, allow_pickle=True) as data:
        data["evil"]
    assert marker.is_dir()
