import os
import re
import tarfile
import threading

import numpy as np
import pytest

from building_image_triplet_model import index, records, sources
from building_image_triplet_model.decode import ImageReader
from building_image_triplet_model.sources import InputError


def extract(archives_dir, dest):
    """What extract_archives.sh produces: each archive into a folder named after it."""
    for tar_path in sorted(archives_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest / tar_path.stem, filter="data")
    return dest


def index_folder(input_dir, work):
    srcs = sources.list_sources(input_dir)
    markers = index.index_all(srcs, work, 2, threading.Event())
    names = [s.name for s in srcs]
    index.merge_cache(work, names, markers)
    return srcs, markers, index.load_cache(work)


def test_tar_and_folder_input_give_the_same_index(archives, tmp_path):
    folder, _ = archives
    _, m_tar, tar_cache = index_folder(folder, tmp_path / "w1")
    _, m_dir, dir_cache = index_folder(extract(folder, tmp_path / "x"), tmp_path / "w2")
    for col in index.COLUMNS[:1] + records.D_FIELDS + ("rej_reason",):
        np.testing.assert_array_equal(tar_cache[col], dir_cache[col], err_msg=col)
    np.testing.assert_array_equal(tar_cache["path"], dir_cache["path"])  # member name == relative path
    assert (dir_cache["offset"] == -1).all() and (tar_cache["offset"] > 0).all()
    assert {n: m["rejects"] for n, m in m_tar.items()} == {n: m["rejects"] for n, m in m_dir.items()}


def test_locators_read_the_exact_image_bytes_with_one_seek(archives, tmp_path):
    folder, _ = archives
    srcs, _, cache = index_folder(folder, tmp_path / "w")
    reader = ImageReader([str(s.path) for s in srcs], [True] * len(srcs))
    with tarfile.open(srcs[1].path) as tar:
        rows = np.flatnonzero(cache["source_idx"] == 1)
        for r in rows[:5]:
            expected = tar.extractfile(cache["path"][r].decode()).read()
            got = reader.read(1, cache["path"][r], int(cache["offset"][r]), int(cache["size"][r]))
            assert got == expected


def test_every_field_and_every_reject(archives, tmp_path):
    folder, summary = archives
    _, _, cache = index_folder(folder, tmp_path / "w")
    reasons = index.reject_reason_names(cache["rej_reason"])
    paths = [p.decode() for p in cache["rej_path"]]
    for kind in (
        "orphan_jpg",
        "orphan_txt",
        "empty_image",
        "no_d_line",
        "too_few_fields",
        "non_numeric_field",
        "non_finite_value",
        "lat_out_of_range",
        "lon_out_of_range",
        "duplicate_stem",
    ):
        hits = [p for p, r in zip(paths, reasons, strict=True) if r == kind]
        assert len(hits) == (12 if kind == "duplicate_stem" else 3), kind  # 3 archives; 2 jpg + 2 txt per dup
        assert all(f"_bad_{kind}" in p for p in hits)
    # Not-JPEG and undecodable images pass the index: they are found by the single decoding pass.
    stems = {s.decode() for s in cache["stem"]}
    assert "0003_bad_not_jpeg" in stems and "0003_bad_decode_error" in stems
    for name in records.D_FIELDS:
        assert len(cache[name]) == len(cache["stem"])
    assert cache["target_lat"].dtype == np.float64 and cache["heading"].dtype == np.float32
    good = summary["images"] + 2 * len(summary["archives"])
    assert len(cache["stem"]) == good


def test_index_cache_is_reused_and_rebuilt_when_an_archive_changes(archives, tmp_path):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    for p in archives[0].glob("*.tar"):
        (src_dir / p.name).write_bytes(p.read_bytes())
    work = tmp_path / "w"
    _, first, _ = index_folder(src_dir, work)
    shard = work / "index" / "0004.npz"
    before = shard.stat().st_mtime_ns
    _, again, _ = index_folder(src_dir, work)
    assert shard.stat().st_mtime_ns == before and again == first  # unchanged: reused, not re-read
    os.utime(src_dir / "0004.tar", ns=(1, 1))
    _, third, _ = index_folder(src_dir, work)
    assert shard.stat().st_mtime_ns != before
    assert third["0004"]["digest"] == first["0004"]["digest"]  # same bytes, same content digest
    assert third["0003"]["seconds"] == first["0003"]["seconds"]  # other archives untouched


def test_truncated_archive_names_the_file_and_keeps_the_others(archives, tmp_path):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    for p in archives[0].glob("*.tar"):
        (src_dir / p.name).write_bytes(p.read_bytes())
    data = (src_dir / "0004.tar").read_bytes()
    (src_dir / "0004.tar").write_bytes(data[: len(data) // 2])
    work = tmp_path / "w"
    with pytest.raises(InputError, match=r"0004\.tar: (truncated|unreadable) archive"):
        index.index_all(sources.list_sources(src_dir), work, 2, threading.Event())
    assert (work / "index" / "0003.json").exists() and (work / "index" / "0009.json").exists()
    assert not (work / "index" / "0004.json").exists()


def test_missing_and_empty_input_dir(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'nope'}: input_dir does not exist")):
        sources.list_sources(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no NNNN\.tar archives"):
        sources.list_sources(tmp_path / "empty")


def test_loose_files_form_the_root_source(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "a.txt").write_text("d 1 2 3 4 40 -70 1 0 1 0 40 -70 1 10 0 0 0\n")
    srcs = sources.list_sources(tmp_path)
    assert [s.name for s in srcs] == [sources.ROOT_SOURCE]
    arrays, rejects = index.build_source_index(srcs[0])
    assert arrays["stem"].tolist() == [b"a"] and not rejects


def test_links_and_unknown_members_are_rejected(tmp_path):
    import io

    tar_path = tmp_path / "in" / "0001.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("0001/link.jpg")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
        info = tarfile.TarInfo("0001/notes.md")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    arrays, rejects = index.build_source_index(sources.list_sources(tmp_path / "in")[0])
    assert sorted(r[1] for r in rejects) == ["not_a_regular_file", "unrecognized_file"]
    assert len(arrays["stem"]) == 0


def test_metadata_cache_uploaded_when_sync_uri_is_set(archives, tmp_path):
    folder, _ = archives
    work = tmp_path / "w"
    index_folder(folder, work)
    index.upload_cache(work, str(tmp_path / "bucket" / "caches"))
    uploaded = tmp_path / "bucket" / "caches" / index.CACHE_NAME
    assert uploaded.read_bytes() == (work / index.CACHE_NAME).read_bytes()


def test_cache_never_unpickles(tmp_path):
    from building_image_triplet_model import workdir

    with pytest.raises(TypeError, match="dtype object"):
        workdir.write_npz(tmp_path / "x.npz", {"a": np.array([{"x": 1}], dtype=object)})
    np.savez(tmp_path / "evil.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        workdir.read_npz(tmp_path / "evil.npz")
