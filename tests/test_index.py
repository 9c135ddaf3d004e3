"""index.py (with sources.py as it uses them): shards, markers, checksums, reuse, merge, and bad archives."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import tar_of
from PIL import Image

from building_image_triplet_model import config
from building_image_triplet_model.engine import index
from building_image_triplet_model.errors import InputError
from building_image_triplet_model.inputs import records, sources
from building_image_triplet_model.inputs.records import REJECT_REASONS
from building_image_triplet_model.inputs.tar_reader import DEFAULT_RECORD_BYTES, checksum
from building_image_triplet_model.io import durable
from building_image_triplet_model.io.workdir import INDEX_VERSION, Layout
from tools import sample_data


def layout_for(tmp: Path, input_dir: Path) -> Layout:
    return Layout(config.from_mapping({"input_dir": str(input_dir), "hdf5_path": str(tmp / "out" / "d.h5")}))


def index_folder(
    input_dir: Path, tmp: Path, done: list | None = None
) -> tuple[list[sources.Source], dict[str, dict], Layout]:
    srcs = sources.list_sources(input_dir)
    lay = layout_for(tmp, input_dir)
    markers = index.index_all(
        srcs, lay, 2, DEFAULT_RECORD_BYTES, threading.Event(), done.append if done is not None else None
    )
    return srcs, markers, lay


def copy_archives(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in sorted(src.glob("*.tar")):
        shutil.copy2(p, dst / p.name)  # same size and mtime: the same signature
    return dst


def extract(archives_dir: Path, dest: Path) -> Path:
    """What extract_archives.sh produces: each archive into a folder named after it."""
    for tar_path in sorted(archives_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest / tar_path.stem, filter="data")
    return dest


@pytest.fixture(scope="module")
def tar_index(archives: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The sample archives indexed once (read-only)."""
    srcs, markers, lay = index_folder(archives[0], tmp_path_factory.mktemp("tar_index"))
    return srcs, markers, lay, {s.name: index.load_shard(lay, s.name, markers[s.name]) for s in srcs}


# ------------------------------------------------------------------------------------- tar and folder
def test_tar_and_folder_input_give_the_same_index(
    archives: tuple[Path, dict], tar_index: tuple, tmp_path: Path
) -> None:
    srcs, m_tar, _, shards = tar_index
    d_srcs, m_dir, d_lay = index_folder(extract(archives[0], tmp_path / "x"), tmp_path)
    assert [s.name for s in d_srcs] == [s.name for s in srcs] == ["0003", "0004", "0009"]
    assert {s.kind for s in d_srcs} == {"dir"} and {s.kind for s in srcs} == {"tar"}
    for name in m_tar:
        t, d = shards[name], index.load_shard(d_lay, name, m_dir[name])
        assert sorted(t) == sorted(d)
        for col in t:
            if col == "offset":
                continue
            np.testing.assert_array_equal(t[col], d[col], err_msg=f"{name} {col}")
        assert (d["offset"] == -1).all() and (t["offset"] > 0).all()
        assert m_tar[name]["content"] == m_dir[name]["content"]
        assert m_tar[name]["digest"] != m_dir[name]["digest"]  # the offsets differ
        for key in ("images", "image_bytes", "targets", "rejects"):
            assert m_tar[name][key] == m_dir[name][key], key
        assert m_dir[name]["kind"] == "dir" and m_tar[name]["kind"] == "tar"


# ------------------------------------------------------------------------------------- rejects, fields
def test_every_planted_reject_is_found_with_its_reason(archives: tuple[Path, dict], tar_index: tuple) -> None:
    _, markers, _, shards = tar_index
    summary = archives[1]
    found: Counter[str] = Counter()
    for a in summary["archives"]:
        name = a["archive"].removesuffix(".tar")
        shard = shards[name]
        rejected = [
            (p.decode(), REJECT_REASONS[c])
            for p, c in zip(shard["rej_path"], shard["rej_reason"], strict=True)
        ]
        stems = {s.decode() for s in shard["stem"]}
        for item in a["planted"]:
            kind, stem = item["kind"], item["stem"]
            if kind in sample_data.EMBED_TIME_KINDS:
                assert stem in stems, (name, kind)  # the index passes it: the decoder finds it
                continue
            hits = [reason for path, reason in rejected if sources.stem_of(path) == stem]
            assert hits and set(hits) == {kind}, (name, kind, hits)
            assert stem not in stems
        assert len(stems) == a["images"] + len(sample_data.EMBED_TIME_KINDS)  # no good pair rejected
        assert markers[name]["rejects"] == dict(sorted(Counter(r for _, r in rejected).items()))
        found.update(r for _, r in rejected)
    index_kinds = {
        k: v for k, v in summary["expected_rejects"].items() if k not in sample_data.EMBED_TIME_KINDS
    }
    assert dict(found) == index_kinds
    assert found["duplicate_stem"] == 4 * len(summary["archives"])  # two images and two txt per archive


def test_reject_details(tar_index: tuple) -> None:
    shard = tar_index[3]["0003"]
    details = {
        REJECT_REASONS[c]: d.decode() for c, d in zip(shard["rej_reason"], shard["rej_detail"], strict=True)
    }
    assert details["too_few_fields"] == "5 of 17"
    assert details["duplicate_stem"] == "2 images, 2 txt"
    assert details["conflicting_d_lines"] == "2 different d lines"
    assert "target_lat=91.5" in details["lat_out_of_range"]
    assert details["orphan_jpg"] == ""


def test_fields_and_locators(tar_index: tuple) -> None:
    srcs, _, _, shards = tar_index
    for src in srcs:
        shard = shards[src.name]
        n = len(shard["stem"])
        for name in index.COLUMNS:
            assert len(shard[name]) == n, name
            if name in records.FIELD_DTYPES:
                assert shard[name].dtype == records.FIELD_DTYPES[name], name
        assert shard["checksum"].dtype == np.int64 and shard["offset"].dtype == np.int64
        assert list(shard["stem"]) == sorted(shard["stem"])  # rows sorted by stem
        assert all(
            sources.stem_of(p.decode()) == s.decode()
            for p, s in zip(shard["path"], shard["stem"], strict=True)
        )
        with tarfile.open(src.path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for r in range(n):
                member = members[shard["path"][r].decode()]
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                assert shard["offset"][r] == member.offset_data
                assert shard["size"][r] == member.size == len(data)
                assert shard["checksum"][r] == checksum(data)
        # The d line's values, for one row read back from its txt.
        with tarfile.open(src.path) as tar:
            txt = tar.extractfile(shard["path"][0].decode()[:-4] + ".txt").read()  # type: ignore[union-attr]
        ids = records.parse_d_line(txt)
        assert [int(shard[f][0]) for f in records.ID_FIELDS] == list(ids[:4])
        assert float(shard["target_lat"][0]) == ids[4][0]


def test_the_marker(tar_index: tuple) -> None:
    srcs, markers, lay, shards = tar_index
    for src in srcs:
        m, shard = markers[src.name], shards[src.name]
        assert m == durable.read_json(lay.shard_marker(src.name))
        assert m["version"] == INDEX_VERSION and m["source"] == src.name and m["kind"] == "tar"
        assert m["signature"] == src.signature()
        assert m["digest"] == index.digest_arrays(shard)
        assert m["content"] == index.content_key(shard) and len(m["content"]) == 16
        assert m["images"] == len(shard["stem"])
        assert m["image_bytes"] == int(shard["size"].sum())
        assert m["targets"] == len(np.unique(records.target_key(shard["DatasetID"], shard["TargetID"])))
        assert m["targets"] == 10 + 3  # ten good targets, three of the planted embed-time rejects
        assert sum(m["rejects"].values()) == len(shard["rej_path"])
        assert m["seconds"] >= 0
        assert lay.index_marker(src.name, src.signature()) == m


# ------------------------------------------------------------------------------------------ reuse
def test_a_shard_is_reused_when_unchanged_and_rebuilt_when_its_signature_changes(
    archives: tuple[Path, dict], tmp_path: Path
) -> None:
    src_dir = copy_archives(archives[0], tmp_path / "in")
    done: list[dict] = []
    _, first, lay = index_folder(src_dir, tmp_path, done)
    assert sorted(m["source"] for m in done) == ["0003", "0004", "0009"]
    mtimes = {n: lay.shard(n).stat().st_mtime_ns for n in first}

    done.clear()
    _, again, _ = index_folder(src_dir, tmp_path, done)
    assert done == [] and again == first  # nothing read again
    assert {n: lay.shard(n).stat().st_mtime_ns for n in first} == mtimes

    os.utime(src_dir / "0004.tar", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    done.clear()
    _, third, _ = index_folder(src_dir, tmp_path, done)
    assert [m["source"] for m in done] == ["0004"]
    assert lay.shard("0004").stat().st_mtime_ns != mtimes["0004"]
    assert third["0004"]["signature"]["mtime_ns"] == 1_500_000_000_000_000_000
    assert third["0004"]["digest"] == first["0004"]["digest"]  # same bytes, same content
    assert third["0003"] == first["0003"] and third["0009"] == first["0009"]

    # A marker flagged stale (its bytes changed under the embedder) is indexed again.
    durable.write_json(lay.shard_marker("0009"), {**third["0009"], "stale": "row 3 changed"})
    done.clear()
    _, fourth, _ = index_folder(src_dir, tmp_path, done)
    assert [m["source"] for m in done] == ["0009"] and "stale" not in fourth["0009"]


def test_bad_archives_are_all_named_after_the_good_ones_are_indexed(
    archives: tuple[Path, dict], tmp_path: Path
) -> None:
    src_dir = copy_archives(archives[0], tmp_path / "in")
    for name in ("0004.tar", "0009.tar"):
        data = (src_dir / name).read_bytes()
        (src_dir / name).write_bytes(data[: len(data) // 2])
    lay = layout_for(tmp_path, src_dir)
    done: list[dict] = []
    with pytest.raises(InputError) as err:
        index.index_all(
            sources.list_sources(src_dir), lay, 2, DEFAULT_RECORD_BYTES, threading.Event(), done.append
        )
    message = str(err.value)
    assert f"{src_dir / '0004.tar'}: truncated archive" in message
    assert f"{src_dir / '0009.tar'}: truncated archive" in message
    assert message.count("truncated archive") == 2
    assert [m["source"] for m in done] == ["0003"]
    assert lay.index_marker("0003", sources.list_sources(src_dir)[0].signature()) is not None
    for name in ("0004", "0009"):
        assert not lay.shard_marker(name).exists() and not lay.shard(name).exists()


# ------------------------------------------------------------------------------------------ content key
def small_jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), np.uint8)).save(
        buf, format="JPEG"
    )
    return buf.getvalue()


def write_tar(path: Path, prefix: str, images: dict[str, bytes], heading: float, extra: bool = False) -> None:
    files = {f"{prefix}README.md": b"x" * 3000} if extra else {}  # moves every offset
    for i, (stem, data) in enumerate(sorted(images.items(), reverse=extra)):
        values = [3, i + 1, i + 1, 7, 40.0 + i / 1000, -74.0, 10.0, 1.0, 0.0, 0.0, 40.0, -74.0, 2.0, 20.0]
        files[f"{prefix}{stem}.jpg"] = data
        files[f"{prefix}{stem}.txt"] = sample_data.d_line([*values, heading, 0.0, 0.0]).encode()
    tar_of(path, files)


def content_of(path: Path) -> tuple[str, str]:
    arrays, _ = index.build_source_index(sources.Source(path.stem, "tar", path), DEFAULT_RECORD_BYTES)
    return index.content_key(arrays), index.digest_arrays(arrays)


def test_content_key_ignores_metadata_and_locators_but_not_image_bytes(tmp_path: Path) -> None:
    images = {f"0003_{i:03d}": small_jpeg(i) for i in range(4)}
    write_tar(tmp_path / "a" / "0003.tar", "0003/", images, heading=90.0)
    write_tar(tmp_path / "b" / "0003.tar", "x/y/0003/", images, heading=45.5, extra=True)
    changed = dict(images)
    data = bytearray(changed["0003_002"])
    data[len(data) // 2] ^= 0x01  # one byte of one image, same size
    changed["0003_002"] = bytes(data)
    write_tar(tmp_path / "c" / "0003.tar", "0003/", changed, heading=90.0)
    (ka, da), (kb, db), (kc, dc) = (content_of(tmp_path / f / "0003.tar") for f in "abc")
    assert ka == kb  # other d-line values, paths and offsets: the same images
    assert da != db  # ... though the index itself differs
    assert kc != ka and dc != da


def test_content_key_depends_on_the_rows_only() -> None:
    base = {
        "stem": np.array([b"a", b"b"]),
        "size": np.array([10, 20], np.int64),
        "checksum": np.array([1, 2], np.int64),
        "target_lat": np.array([1.0, 2.0]),
        "offset": np.array([512, 2048], np.int64),
    }
    key = index.content_key(base)
    assert index.content_key({**base, "target_lat": np.array([5.0, 6.0]), "offset": np.array([0, 1])}) == key
    assert index.content_key({**base, "checksum": np.array([1, 3], np.int64)}) != key
    assert index.content_key({**base, "size": np.array([10, 21], np.int64)}) != key
    assert index.content_key({**base, "stem": np.array([b"a", b"c"])}) != key


# ------------------------------------------------------------------------------------------- the merge
def test_merge_cache_is_rebuilt_only_when_a_digest_changes(
    archives: tuple[Path, dict], tmp_path: Path
) -> None:
    src_dir = copy_archives(archives[0], tmp_path / "in")
    srcs, markers, lay = index_folder(src_dir, tmp_path)
    names = [s.name for s in srcs]
    index.merge_cache(lay, names, markers)
    cache = index.load_cache(lay)
    total = sum(m["images"] for m in markers.values())
    assert len(cache["stem"]) == total
    assert cache["source_idx"].tolist() == [
        i for i, n in enumerate(names) for _ in range(markers[n]["images"])
    ]
    assert [n.decode() for n in cache["source_names"]] == names
    assert index.read_cache_header(lay) == (names, [markers[n]["digest"] for n in names])
    assert (
        len(cache["rej_source_idx"])
        == len(cache["rej_path"])
        == sum(sum(m["rejects"].values()) for m in markers.values())
    )
    first = lay.cache.stat()

    os.utime(src_dir / "0003.tar", ns=(1_600_000_000_000_000_000,) * 2)  # re-indexed, same digest
    _, markers2, _ = index_folder(src_dir, tmp_path)
    index.merge_cache(lay, names, markers2)
    assert (lay.cache.stat().st_ino, lay.cache.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    # Other content in one archive: a new digest, a new cache.
    opts = sample_data.Options(out=src_dir, archives=3, targets_per_archive=8, seed=9, bad=False)
    sample_data.write_archive(opts, 1, [])
    _, markers3, _ = index_folder(src_dir, tmp_path)
    assert markers3["0004"]["digest"] != markers["0004"]["digest"]
    index.merge_cache(lay, names, markers3)
    assert lay.cache.stat().st_ino != first.st_ino
    assert index.read_cache_header(lay) == (names, [markers3[n]["digest"] for n in names])
    assert len(index.load_cache(lay)["stem"]) == sum(m["images"] for m in markers3.values())

    # Another order of the same sources is another cache too.
    index.merge_cache(lay, names[::-1], markers3)
    assert index.read_cache_header(lay) == (names[::-1], [markers3[n]["digest"] for n in names[::-1]])


def test_a_damaged_cache_is_rebuilt(archives: tuple[Path, dict], tmp_path: Path) -> None:
    srcs, markers, lay = index_folder(archives[0], tmp_path)
    names = [s.name for s in srcs]
    index.merge_cache(lay, names, markers)
    good = index.load_cache(lay)["checksum"].copy()
    lay.cache.write_bytes(lay.cache.read_bytes()[:1000])
    assert index.read_cache_header(lay) is None
    index.merge_cache(lay, names, markers)
    np.testing.assert_array_equal(index.load_cache(lay)["checksum"], good)


def test_a_txt_with_a_byte_order_mark_indexes_as_one_without(tmp_path: Path) -> None:
    """A .txt saved by an editor that writes a UTF-8 byte-order mark holds the same d line."""
    images = {f"0003_{i:03d}": small_jpeg(i) for i in range(2)}
    write_tar(tmp_path / "plain" / "0003.tar", "0003/", images, heading=90.0)
    members = {}
    with tarfile.open(tmp_path / "plain" / "0003.tar") as tf:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            members[m.name] = b"\xef\xbb\xbf" + data if m.name.endswith(".txt") else data
    tar_of(tmp_path / "bom" / "0003.tar", members)
    plain, bom = (
        index.build_source_index(
            sources.Source("0003", "tar", tmp_path / f / "0003.tar"), DEFAULT_RECORD_BYTES
        )[0]
        for f in ("plain", "bom")
    )
    assert len(bom["rej_path"]) == 0 and len(bom["stem"]) == 2
    for key in records.D_FIELDS:
        np.testing.assert_array_equal(bom[key], plain[key], err_msg=key)
