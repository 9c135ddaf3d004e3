"""Inputs that lie, on the whole processor: unfinished, truncated or changed archives, names that look like
archives, empty archives, and committed files of the work folder that no longer read back."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import assert_same_arrays, load, stats, tiny_config

from building_image_triplet_model.engine import pipeline
from building_image_triplet_model.errors import InputError
from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.inputs import tar_reader
from building_image_triplet_model.io.workdir import Layout


def copy_archives(archives: tuple[Path, dict], tmp: Path) -> Path:
    dst = tmp / "archives"
    shutil.copytree(archives[0], dst)
    return dst


def members(path: Path) -> list[tar_reader.TarMember]:
    return list(tar_reader.walk(path))


def cut(path: Path, at: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(at)


def zero_from(path: Path, at: int) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(bytes(size - at))


def damage(kind: str, archive: Path) -> None:
    ms = members(archive)
    middle = ms[len(ms) // 2]
    if kind == "mid-member":
        cut(archive, middle.offset + middle.size // 2 + 1)
    elif kind == "at-member-boundary":
        cut(archive, middle.offset - tar_reader.BLOCK)  # right before a header: no end-of-archive blocks
    elif kind == "zero-filled-tail":
        zero_from(
            archive, middle.offset - tar_reader.BLOCK
        )  # what a preallocated, unfinished download leaves
    elif kind == "aria2-control-file":
        Path(f"{archive}.aria2").write_bytes(b"\0" * 64)


@pytest.mark.parametrize(
    "kind", ["mid-member", "at-member-boundary", "zero-filled-tail", "aria2-control-file"]
)
def test_an_archive_that_ends_early_is_an_input_error_naming_it(archives, tmp_path, kind):
    inputs = copy_archives(archives, tmp_path)
    damage(kind, inputs / "0004.tar")
    cfg, layout = load(tiny_config(tmp_path, inputs))
    assert pipeline.execute(cfg) == Exit.INPUT
    if kind == "aria2-control-file":  # found while listing, in the first seconds: nothing written
        assert not layout.work.exists()
    else:
        log = layout.log.read_text()
        assert "0004.tar" in log and "input error" in log
        assert not layout.output.exists()
        # The other archives are indexed and kept for the next run.
        assert layout.shard_marker("0003").exists() and layout.shard_marker("0009").exists()
        assert not layout.shard_marker("0004").exists()


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_a_name_that_looks_like_an_archive_but_is_not_a_file_is_named(archives, tmp_path, kind):
    inputs = copy_archives(archives, tmp_path)
    odd = inputs / "0012.tar"
    if kind == "folder":
        odd.mkdir()
    elif kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to("/dev/null")
    cfg, layout = load(tiny_config(tmp_path, inputs))
    assert pipeline.execute(cfg) == Exit.INPUT
    assert not layout.output.parent.exists()  # refused at listing, before anything is written


def test_empty_and_all_rejected_archives_complete_with_zero_rows(archives, tmp_path):
    inputs = copy_archives(archives, tmp_path)
    with tarfile.open(inputs / "0012.tar", "w", format=tarfile.GNU_FORMAT):
        pass  # no members: just the end-of-archive blocks
    with tarfile.open(inputs / "0014.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("0014/0014_orphan.txt")
        data = b"d 14 1 1 1 40.7 -73.9 1 0 0 1 40.7 -73.9 2 10 90 0 0\n"
        info.size = len(data)
        import io

        tar.addfile(info, io.BytesIO(data))
    cfg, layout = load(tiny_config(tmp_path, inputs))
    assert pipeline.execute(cfg) == 0
    s = stats(layout)
    assert s["source_rows"]["0012"] == 0 and s["source_rows"]["0014"] == 0
    assert "0014\t0014/0014_orphan.txt\torphan_txt" in layout.rejects.read_text()


def test_an_archive_changed_after_indexing_is_named_then_indexed_again(archives, tmp_path):
    inputs = copy_archives(archives, tmp_path)
    cfg, _layout = load(tiny_config(tmp_path, inputs))
    assert pipeline.execute(cfg) == 0
    # Change one image's bytes in place, then restore the size and mtime: the signature cannot tell.
    archive = inputs / "0003.tar"
    st = archive.stat()
    jpg = next(m for m in members(archive) if m.name.endswith(".jpg") and "_bad_" not in m.name)
    with open(archive, "r+b") as fh:
        fh.seek(jpg.offset + jpg.size // 2)
        byte = fh.read(1)
        fh.seek(jpg.offset + jpg.size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))
    # A new model has to read every image again: the changed one no longer matches the index.
    cfg2, layout2 = load(tiny_config(tmp_path, inputs, image_size=40))
    assert pipeline.execute(cfg2) == Exit.INPUT
    log = layout2.log.read_text()
    assert "archive 0003 changed after it was indexed" in log and jpg.name in log
    assert pipeline.execute(cfg2) == 0  # indexed again: its embeddings now come from its new bytes
    scratch_cfg, scratch = load(tiny_config(tmp_path / "scratch", inputs, image_size=40))
    assert pipeline.execute(scratch_cfg) == 0
    assert_same_arrays(layout2.output, scratch.output)


def quarantined(layout: Layout) -> list[str]:
    return sorted(p.name for p in layout.corrupt_dir.iterdir()) if layout.corrupt_dir.exists() else []


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt(kind: str, layout: Layout) -> str:
    """Damage one committed file the next run reads; returns its name."""
    if kind == "embedding-chunk":
        path = sorted(layout.emb_root.glob("*/0004-*/*-*.npz"))[0]
        cut(path, path.stat().st_size // 2)
    elif kind == "index-shard":
        layout.cache.unlink()  # so that the shards are read again
        path = layout.shard("0009")
        zero_from(path, 0)
    elif kind == "index-marker":
        path = layout.shard_marker("0003")
        path.write_text('{"version": 2, "sou')
    elif kind == "index-cache":
        for path in (layout.output, layout.stats, layout.plan):
            path.unlink()  # so that the plan is made again from the merged index
        path = layout.cache
        arrays = dict(np.load(path, allow_pickle=False))
        del arrays["checksum"]  # a readable file, with its header, that lacks a column
        np.savez(path, **arrays)
    elif kind == "knn-chunk":
        layout.output.unlink()  # so that the artifact is assembled again from the chunks
        layout.stats.unlink()
        path = sorted(layout.knn_root.glob("*/train/*-*.npz"))[0]
        flip_byte(path, path.stat().st_size // 2)  # inside an array: the zip CRC catches it
    else:  # plan
        layout.output.unlink()
        layout.stats.unlink()
        path = layout.plan
        flip_byte(path, path.stat().st_size // 2)
    return path.name


@pytest.mark.parametrize(
    "kind", ["embedding-chunk", "index-shard", "index-marker", "index-cache", "knn-chunk", "plan"]
)
def test_a_corrupt_committed_file_is_moved_aside_and_recomputed(reference, archives, tmp_path, kind):
    shutil.copytree(Layout(reference).output.parent, tmp_path / "out")
    cfg, layout = load(tiny_config(tmp_path, archives[0]))
    if kind == "embedding-chunk":
        cfg, layout = load(tiny_config(tmp_path, archives[0], knn_k=4))  # a new artifact from the stores
    name = corrupt(kind, layout)
    assert pipeline.execute(cfg) == 0, layout.log.read_text()[-3000:]
    assert any(q.startswith(name) or name in q for q in quarantined(layout)), quarantined(layout)
    assert f"{name}" in layout.log.read_text() and "is corrupt" in layout.log.read_text()
    if kind == "embedding-chunk":
        scratch_cfg, scratch = load(tiny_config(tmp_path / "scratch", archives[0], knn_k=4))
        assert pipeline.execute(scratch_cfg) == 0
        assert_same_arrays(layout.output, scratch.output)
    else:
        assert_same_arrays(layout.output, Layout(reference).output)
    moved = quarantined(layout)
    assert pipeline.execute(cfg) == 0  # and never the same error on the next run
    assert quarantined(layout) == moved


def test_zeros_over_the_last_members_are_refused_or_surface_as_rejects(tmp_path):
    """A zero-filled tail (a preallocated download cut short, its aria2c control file gone) starting at every
    128th byte over an archive's last members, images of the dataset's size (640x640). Zeros that begin in a
    member's data are refused (exit 3): the tar structure takes them for padding and the end-of-archive
    marker, the member's own bytes do not (a JPEG ends with FF D9, a .txt with text). Zeros that begin at a
    header (or in a data block's padding) and fit in one record of padding cannot be told from a complete
    archive by any byte: then what they removed is whole members, and every pair they reached is a reject
    (its partner is an orphan), never lost silently. No pair of the dataset's images fits in one record."""
    from building_image_triplet_model.engine import index
    from building_image_triplet_model.inputs.sources import list_sources
    from tools import sample_data

    record = tar_reader.DEFAULT_RECORD_BYTES
    folder = tmp_path / "clean"
    sample_data.generate(
        sample_data.Options(out=folder, archives=1, targets_per_archive=3, seed=3, bad=False)
    )
    [source] = list_sources(folder)
    raw = source.path.read_bytes()
    full, full_rejects = index.build_source_index(source, record)
    assert full_rejects == [] and len(full["stem"]) >= 6
    ms = members(source.path)
    cut_here = tmp_path / "cut"
    cut_here.mkdir()
    damaged_path = cut_here / source.path.name
    refused_by_bytes = accepted = 0
    for p in range(ms[-6].offset - tar_reader.BLOCK, len(raw) + 1, tar_reader.BLOCK // 4):
        damaged_path.write_bytes(raw[:p] + bytes(len(raw) - p))
        in_data = any(m.offset <= p < m.offset + m.size for m in ms)
        try:
            got, rejects = index.build_source_index(list_sources(cut_here)[0], record)
        except InputError as exc:
            message = str(exc)
        else:
            message = ""
        if message:
            assert str(damaged_path) in message
            refused_by_bytes += "ends in zero bytes" in message
            continue
        assert not in_data, (p, "zeros inside a member's data were accepted")
        accepted += 1
        rejected = {Path(path).stem for path, _reason, _detail in rejects}
        rows = {stem.decode() for stem in got["stem"]}
        for stem in (s.decode() for s in full["stem"]):
            assert stem in rows or stem in rejected, (p, stem, "lost without a reject")
    assert refused_by_bytes > 10 and accepted > 10  # both kinds of position were reached
