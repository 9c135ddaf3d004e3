"""Trust no file by its name alone: shards forged in a work folder or a scale-out run folder.

Every file a later run reuses says what it was made for (archive, content key, model key, KNN key, split,
rows), and its commit marker says what its files hold. Here real runs make real shards, and the tests copy,
cut and rewrite them the way a careless copy or an old release would: a store of another model (another
image size) under this model's key, a chunk overlapping another, a store with a gap under its marker, a
marker whose counts disagree, an index shard of another archive, KNN chunks of other rows or another key,
and chunks of an earlier release (no keys inside). A local run moves the file aside and computes it again
(the artifact equals a clean run's); a merge, which has no archives, stops with exit 3 naming the file.
Never exit 0 with rows of another model or range, never a traceback, never the same failure on a rerun.
Slow: about 2 minutes on a 2-core machine (16 tests, 4 of them start a merge process twice).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import assert_same_arrays, load, manifest_of, stats, tiny_config
from test_scale_out import processor, worker_input

from building_image_triplet_model.engine import pipeline, scale_out
from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.io import durable, workdir
from building_image_triplet_model.io.workdir import Layout

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------- helpers
def model_key_of(layout: Layout) -> str:
    (model_json,) = layout.emb_root.glob("*/model.json")
    return model_json.parent.name


def store_dir(layout: Layout, source: str) -> Path:
    (folder,) = layout.emb_root.glob(f"{model_key_of(layout)}/{source}-*")
    return folder


def chunks(folder: Path) -> list[Path]:
    return sorted(folder.glob("*-*.npz"))


def strip_keys(path: Path) -> None:
    """What today's release wrote: the same arrays without the keys (a plain numpy write)."""
    arrays = dict(np.load(path, allow_pickle=False))
    for key in ("made_for", "rows") if "indices" in arrays else ("made_for",):
        arrays.pop(key, None)
    np.savez(path, **arrays)


def replace_store(dst: Path, src: Path) -> None:
    """Copy another store's files into this store's folder (the name says this model; the files do not)."""
    shutil.rmtree(dst)
    shutil.copytree(src, dst)


def quarantined(layout: Layout) -> list[str]:
    return sorted(p.name for p in layout.corrupt_dir.iterdir()) if layout.corrupt_dir.exists() else []


def rebuild_from_stores(layout: Layout) -> None:
    """Only the artifact goes: the next run assembles it again from what the work folder holds."""
    layout.output.unlink()
    layout.stats.unlink()


def assert_recomputed(cfg, layout: Layout, reference, moved_name: str) -> None:
    assert pipeline.execute(cfg) == Exit.OK, layout.log.read_text()[-3000:]
    assert_same_arrays(layout.output, Layout(reference).output)
    moved = quarantined(layout)
    assert any(moved_name in q for q in moved), moved
    assert moved_name in layout.log.read_text()
    rebuild_from_stores(layout)
    assert pipeline.execute(cfg) == Exit.OK  # and the next run finds nothing wrong again
    assert quarantined(layout) == moved
    assert_same_arrays(layout.output, Layout(reference).output)


@pytest.fixture(scope="module")
def other_model(archives, tmp_path_factory) -> Layout:
    """The same archives embedded by another model: the tiny model at 48 px instead of 32 (same width)."""
    cfg, layout = load(tiny_config(tmp_path_factory.mktemp("other"), archives[0], image_size=48))
    assert pipeline.execute(cfg) == Exit.OK
    return layout


@pytest.fixture
def local(reference, archives, tmp_path):
    """A copy of the reference run's complete output and work folder."""
    shutil.copytree(Layout(reference).output.parent, tmp_path / "out")
    return load(tiny_config(tmp_path, archives[0]))


# ---------------------------------------------------------------------------------------- local runs
def test_a_store_of_another_model_under_this_models_key_is_embedded_again(reference, other_model, local):
    cfg, layout = local
    replace_store(store_dir(layout, "0004"), store_dir(other_model, "0004"))
    rebuild_from_stores(layout)
    assert pipeline.execute(cfg) == Exit.OK, layout.log.read_text()[-3000:]
    assert_same_arrays(layout.output, Layout(reference).output)
    assert "made for another store: model key" in layout.log.read_text()
    assert stats(layout)["images_embedded"] > 0
    rebuild_from_stores(layout)
    moved = quarantined(layout)
    assert pipeline.execute(cfg) == Exit.OK and quarantined(layout) == moved
    assert stats(layout)["images_embedded"] == 0


def test_an_earlier_releases_store_of_another_model_is_found_by_a_probe(reference, other_model, local):
    cfg, layout = local
    folder = store_dir(layout, "0004")
    replace_store(folder, store_dir(other_model, "0004"))
    for path in chunks(folder):
        strip_keys(path)  # nothing inside says which model made them: only embedding a row again tells
    marker = json.loads((folder / workdir.SUCCESS).read_text())
    for key in ("source", "content", "model_key"):
        marker.pop(key, None)
    (folder / workdir.SUCCESS).write_text(json.dumps(marker))
    rebuild_from_stores(layout)
    assert pipeline.execute(cfg) == Exit.OK, layout.log.read_text()[-3000:]
    assert_same_arrays(layout.output, Layout(reference).output)
    assert "differs from the stored one" in layout.log.read_text()
    assert any("0004-" in q for q in quarantined(layout)), quarantined(layout)


def test_an_earlier_releases_store_of_this_model_is_proven_and_kept(reference, local):
    """Today's files, without keys: a day of GPU time is not thrown away for a missing field."""
    cfg, layout = local
    for folder in [*layout.emb_root.glob("*/*-*"), *layout.knn_root.glob("*/*")]:
        for path in chunks(folder):
            strip_keys(path)
        marker = json.loads((folder / workdir.SUCCESS).read_text())
        for key in ("source", "content", "model_key", "key", "split"):
            marker.pop(key, None)
        (folder / workdir.SUCCESS).write_text(json.dumps(marker))
    for path in layout.index_dir.glob("*.npz"):
        strip_keys(path)
    layout.cache.unlink()
    rebuild_from_stores(layout)
    assert pipeline.execute(cfg) == Exit.OK, layout.log.read_text()[-3000:]
    assert_same_arrays(layout.output, Layout(reference).output)
    assert stats(layout)["images_embedded"] == 0  # every store proven by a probe, none embedded again
    assert not [q for q in quarantined(layout) if "emb__" in q or "index__" in q]
    for folder in layout.emb_root.glob("*/*-*"):
        assert all("made_for" in np.load(p).files for p in chunks(folder))  # now keyed
        assert json.loads((folder / workdir.SUCCESS).read_text())["model_key"] == folder.parent.name
    assert all("made_for" in np.load(p).files for p in layout.index_dir.glob("*.npz"))


def test_a_chunk_overlapping_another_is_moved_aside(reference, local):
    cfg, layout = local
    first = chunks(store_dir(layout, "0004"))[0]
    chunk = dict(np.load(first, allow_pickle=False))
    keep = slice(1, 3)  # two rows of the first chunk, with other numbers
    forged = first.with_name(f"{int(chunk['rows'][1]):010d}-{int(chunk['rows'][2]):010d}.npz")
    np.savez(
        forged,
        rows=chunk["rows"][keep],
        emb=chunk["emb"][keep] * 2 + 1,
        codes=chunk["codes"][keep],
        **({"made_for": chunk["made_for"]} if "made_for" in chunk else {}),
    )
    rebuild_from_stores(layout)
    assert_recomputed(cfg, layout, reference, forged.name)
    assert "overlaps another chunk" in layout.log.read_text()


def test_a_gap_under_a_marker_is_embedded_again(reference, local):
    cfg, layout = local
    folder = store_dir(layout, "0004")
    chunks(folder)[1].unlink()  # the marker still claims every row
    rebuild_from_stores(layout)
    assert_recomputed(cfg, layout, reference, workdir.SUCCESS)
    assert "claims" in layout.log.read_text()


def test_a_marker_whose_counts_disagree_with_its_chunks_is_written_again(reference, local):
    cfg, layout = local
    path = store_dir(layout, "0004") / workdir.SUCCESS
    marker = json.loads(path.read_text())
    right = dict(marker)
    marker["valid"] += 1
    marker["failed"] -= 1
    path.write_text(json.dumps(marker))
    rebuild_from_stores(layout)
    assert_recomputed(cfg, layout, reference, workdir.SUCCESS)
    assert json.loads(path.read_text()) == right


def test_an_index_shard_of_another_archive_is_indexed_again(reference, local):
    cfg, layout = local
    shutil.copyfile(layout.shard("0003"), layout.shard("0004"))  # 0004.json stays
    layout.cache.unlink()  # so that the shards are read again
    rebuild_from_stores(layout)
    assert_recomputed(cfg, layout, reference, "0004.npz")


@pytest.mark.parametrize("forged", ["other-rows", "other-key", "earlier-release"])
def test_a_knn_chunk_of_other_rows_or_another_key_is_computed_again(reference, local, forged):
    cfg, layout = local
    (split,) = [p for p in layout.knn_root.glob("*/train")]
    parts = sorted(split.glob("*-*.npz"))
    assert len(parts) >= 2
    last = parts[-1]
    a, b = (int(x) for x in last.stem.split("-"))
    first = dict(np.load(parts[0], allow_pickle=False))
    chunk = {"indices": first["indices"][: b - a], "distances": first["distances"][: b - a]}
    if forged == "other-rows":  # rows 0.. of the split, under the name of the last chunk
        chunk.update(made_for=first["made_for"], rows=first["rows"]) if "made_for" in first else None
    elif forged == "other-key":  # says the right rows, but another KNN key made it
        chunk.update(made_for=np.array([b"0123456789abcdef", b"train"]), rows=np.array([a, b]))
    np.savez(last, **chunk)
    rebuild_from_stores(layout)
    assert_recomputed(cfg, layout, reference, last.name)


# ------------------------------------------------------------------------------------ scale-out merge
@pytest.fixture(scope="module")
def run_folder(archives, tmp_path_factory) -> tuple[Path, Path]:
    """Three workers' shards in a run folder (their own processes' work, in this process)."""
    tmp = tmp_path_factory.mktemp("scale")
    manifest = manifest_of(tmp / "manifest.txt", archives[0])
    run_uri = tmp / "bucket" / "run"
    for i in range(3):
        cfg, _ = load(
            tiny_config(
                tmp / f"vm{i}", worker_input(tmp, archives[0], manifest, i, 3), manifest=str(manifest)
            )
        )
        assert scale_out.worker(cfg, str(run_uri), (i, 3), fresh=False, follow=False) == Exit.OK
    return run_uri, manifest


@pytest.fixture
def shards(run_folder, tmp_path) -> tuple[Path, Path]:
    run_uri, manifest = run_folder
    copy = tmp_path / "bucket" / "run"
    shutil.copytree(run_uri, copy)
    return copy, manifest


def merge(tmp: Path, run_uri: Path, manifest: Path, name: str = "merge"):
    cfg = tiny_config(tmp / name, tmp / "no-archives-here", manifest=str(manifest))
    return processor(cfg, "--merge", "--run-uri", str(run_uri), "--wait-timeout-s", "0"), load(cfg)[1]


def run_store(run_uri: Path, source: str) -> Path:
    (folder,) = (run_uri / "shards" / "emb").glob(f"*/{source}-*")
    return folder


def assert_refused(tmp: Path, run_uri: Path, manifest: Path, names: str) -> None:
    for attempt in ("merge", "merge"):  # a rerun: the same clear line, never a traceback
        out, layout = merge(tmp, run_uri, manifest, attempt)
        assert out.returncode == Exit.INPUT, out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        assert names in out.stderr and "a merge cannot compute it again" in out.stderr, out.stderr[-2000:]
        assert not layout.output.exists()


def test_the_merge_refuses_a_store_of_another_model_under_this_models_key(shards, other_model, tmp_path):
    run_uri, manifest = shards
    folder = run_store(run_uri, "0004")
    replace_store(folder, store_dir(other_model, "0004"))
    assert_refused(tmp_path, run_uri, manifest, f"{folder.name}/0000000000-")


def test_the_merge_refuses_an_overlapping_chunk(shards, tmp_path):
    run_uri, manifest = shards
    first = chunks(run_store(run_uri, "0009"))[0]
    chunk = dict(np.load(first, allow_pickle=False))
    forged = first.with_name(f"{int(chunk['rows'][1]):010d}-{int(chunk['rows'][1]):010d}.npz")
    np.savez(
        forged,
        **{**chunk, "rows": chunk["rows"][1:2], "emb": chunk["emb"][1:2] + 1, "codes": chunk["codes"][1:2]},
    )
    assert_refused(tmp_path, run_uri, manifest, forged.name)


def test_the_merge_refuses_a_store_with_a_gap_under_its_marker(shards, tmp_path):
    run_uri, manifest = shards
    folder = run_store(run_uri, "0003")
    chunks(folder)[1].unlink()
    assert_refused(tmp_path, run_uri, manifest, f"{folder.name}/{workdir.SUCCESS}")


def test_the_merge_refuses_an_index_shard_of_another_archive(shards, tmp_path):
    run_uri, manifest = shards
    index = run_uri / "shards" / "index"
    shutil.copyfile(index / "0003.npz", index / "0004.npz")
    assert_refused(tmp_path, run_uri, manifest, "0004.npz")


def test_the_merge_refuses_an_earlier_releases_store_it_cannot_prove(shards, tmp_path):
    run_uri, manifest = shards
    folder = run_store(run_uri, "0004")
    for path in chunks(folder):
        strip_keys(path)
    out, layout = merge(tmp_path, run_uri, manifest)
    assert out.returncode == Exit.INPUT and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "written by an earlier release" in out.stderr and "0004" in out.stderr
    assert not layout.output.exists()
    assert durable.read_json(run_uri / "run_settings.json")  # the run folder is left as it was


def test_a_workers_rerun_proves_an_earlier_releases_store_then_the_merge_completes(
    shards, reference, archives, tmp_path
):
    """What the merge's refusal says to do: the worker of the archive proves the store (one probe row per
    chunk, nothing embedded again), publishes it with its keys, and the merge then equals a single run."""
    run_uri, manifest = shards
    folder = run_store(run_uri, "0004")
    for path in chunks(folder):
        strip_keys(path)
    out, _ = merge(tmp_path, run_uri, manifest)
    assert out.returncode == Exit.INPUT and "run the worker of archive 0004 again" in out.stderr
    cfg, layout = load(
        tiny_config(
            tmp_path / "vm1b", worker_input(tmp_path, archives[0], manifest, 1, 3), manifest=str(manifest)
        )
    )
    assert scale_out.worker(cfg, str(run_uri), (1, 3), fresh=False, follow=False) == Exit.OK
    assert "proving" in layout.log.read_text() and not quarantined(layout)
    assert all("made_for" in np.load(p).files for p in chunks(folder))  # published again, keyed
    out, merged = merge(tmp_path, run_uri, manifest)
    assert out.returncode == Exit.OK, out.stderr[-3000:]
    assert_same_arrays(Layout(reference).output, merged.output)
