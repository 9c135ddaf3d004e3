"""assemble.py: the skeleton, the pwrite copy of every store's embeddings to its artifact rows, resume and
verify."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from engine_helpers import read_artifact

from building_image_triplet_model import config
from building_image_triplet_model.engine import geo_knn, index, plan
from building_image_triplet_model.engine.artifact import assemble
from building_image_triplet_model.engine.artifact.assemble import Part
from building_image_triplet_model.engine.embed.store import EmbeddingStore
from building_image_triplet_model.inputs import records
from building_image_triplet_model.io import durable
from building_image_triplet_model.io.workdir import Layout

DIM = 6
NOT_JPEG, DECODE_ERROR = records.REASON_CODE["not_jpeg"], records.REASON_CODE["decode_error"]


# ------------------------------------------------------------------------------------------------ place
def test_place_maps_chunk_rows_to_artifact_rows() -> None:
    part = Part("0003", EmbeddingStore(Path("/nonexistent"), 20), np.array([2, 5, 7, 9]), 100)
    sel, dest = part.place(np.array([0, 2, 3, 7, 9, 12, 19]))
    assert sel.tolist() == [1, 3, 4]  # chunk entries 2, 7, 9; 0, 3, 12 and 19 are not in the artifact
    assert dest.tolist() == [100, 102, 103]
    sel, dest = part.place(np.array([5]))
    assert sel.tolist() == [0] and dest.tolist() == [101]
    sel, dest = part.place(np.array([10, 11]))  # beyond every row of the part
    assert sel.tolist() == [] and dest.tolist() == []
    empty = Part("0004", EmbeddingStore(Path("/nonexistent"), 20), np.zeros(0, np.int64), 104)
    sel, dest = empty.place(np.array([0, 1, 2]))
    assert sel.tolist() == [] and dest.tolist() == []


# ------------------------------------------------------------------------------------- synthetic run
def value(source: int, rows: np.ndarray) -> np.ndarray:
    """The embedding of a row: says which source and row it is (exact in float16 too)."""
    return (source * 256 + rows[:, None] + np.arange(DIM)[None, :] / 8).astype(np.float32)


def fake_cache(sizes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    cols: dict[str, list[Any]] = {n: [] for n in (*records.D_FIELDS, "stem", "path", "source_idx")}
    for s, n in enumerate(sizes):
        for r in range(n):
            t = r // 3 + 1  # three images per target
            lat, lon = 40.7 + t * 0.001 + s * 0.01, -74.0 + rng.uniform(-0.01, 0.01)
            for name in records.D_FIELDS:
                cols[name].append(0.0)
            cols["DatasetID"][-1], cols["TargetID"][-1] = [3, 4, 9][s], t
            cols["target_lat"][-1], cols["target_lon"][-1] = lat, lon
            cols["stem"].append(f"{s}_{r:04d}".encode())
            cols["path"].append(f"{s:04d}/{s}_{r:04d}.jpg".encode())
            cols["source_idx"].append(s)
    out = {name: np.array(cols[name], records.FIELD_DTYPES[name]) for name in records.D_FIELDS}
    n_all = sum(sizes)
    out.update(
        stem=np.array(cols["stem"]),
        path=np.array(cols["path"]),
        offset=np.arange(n_all, dtype=np.int64) * 1024,
        size=np.full(n_all, 1000, np.int64),
        checksum=np.arange(n_all, dtype=np.int64) - 7,
        source_idx=np.array(cols["source_idx"], np.int32),
        source_names=np.array([f"{d:04d}".encode() for d in (3, 4, 9)[: len(sizes)]]),
    )
    return out


class Synthetic:
    """Two archives; their stores hold every row (made for a bigger selection than this plan's) in
    interleaved chunks, so that one chunk's artifact rows are not contiguous."""

    def __init__(self, tmp: Path, dtype: str = "float32", sizes: tuple[int, ...] = (30, 24)) -> None:
        self.tmp = tmp
        self.dtype = dtype
        self.cache = fake_cache(sizes)
        self.cfg = config.from_mapping({"input_dir": "i", "hdf5_path": str(tmp / "o.h5"), "n_samples": 14})
        self.plan = plan.make_plan(self.cache, self.cfg)
        self.first = np.concatenate([[0], np.cumsum(sizes)])
        self.knn: dict[str, tuple[Path, int]] = {}
        for split in plan.SPLITS:
            pos = plan.split_targets(self.plan, split)
            k = plan.knn_k(3, len(pos))
            folder = tmp / "knn" / split
            lat, lon = self.plan["target_lat"][pos], self.plan["target_lon"][pos]
            assert geo_knn.run_split(folder, lat, lon, k, threading.Event(), 1, 4)
            self.knn[split] = (folder, k)
        self.codes_by_row: list[np.ndarray] = []
        self.parts = []
        for s, n in enumerate(sizes):
            store = EmbeddingStore(tmp / "emb" / f"s{s}", n)
            rows = np.arange(n)
            codes = np.zeros(n, np.int8)
            codes[rows % 11 == 4] = NOT_JPEG
            codes[rows % 13 == 6] = DECODE_ERROR
            emb = value(s, rows)
            emb[codes != 0] = 0
            for sel in (rows % 2 == 0, rows % 2 == 1):  # evens, then odds
                for chunk in np.array_split(np.flatnonzero(sel), 2):
                    store.write(rows[chunk], emb[chunk].astype(dtype), codes[chunk])
            self.codes_by_row.append(codes)
            local = plan.source_rows(self.plan, self.first, s)
            self.parts.append(Part(f"s{s}", store, local, int(self.plan["src_start"][s])))
        self.n = len(self.plan["rows"])

    def expected(self) -> tuple[np.ndarray, np.ndarray]:
        emb = np.zeros((self.n, DIM), np.float32)
        codes = np.zeros(self.n, np.int8)
        for s, part in enumerate(self.parts):
            dest = part.start + np.arange(len(part.rows))
            codes[dest] = self.codes_by_row[s][part.rows]
            emb[dest] = np.where(codes[dest, None] == 0, value(s, part.rows), 0)
        return emb.astype(self.dtype), codes

    def skeleton(self, name: str) -> tuple[Path, int]:
        path = self.tmp / name
        codes = assemble.gather_codes(self.parts, self.n)
        offset = assemble.write_skeleton(
            path, self.cache, self.plan, self.knn, codes, DIM, self.dtype, {"run_key": "R", "extra": [1, 2]}
        )
        return path, offset

    def copy(
        self, path: Path, offset: int, progress: dict, stop: threading.Event, on_rows: Any = None
    ) -> bool:
        marker = self.tmp / f"{path.name}.assemble.json"
        return assemble.copy_embeddings(
            path,
            offset,
            DIM,
            self.dtype,
            self.parts,
            lambda m: durable.write_json(marker, m),
            progress,
            stop,
            on_rows,
        )


def test_the_synthetic_selection_is_what_the_copy_must_handle(tmp_path: Path) -> None:
    syn = Synthetic(tmp_path)
    assert all(len(p.rows) < p.store.n_rows for p in syn.parts)  # the stores hold more than the artifact
    assert all(len(p.rows) > 2 for p in syn.parts)
    chunk = syn.parts[0].store.read(syn.parts[0].store.chunks()[0])
    _, dest = syn.parts[0].place(chunk["rows"])
    assert len(dest) > 1 and np.any(np.diff(dest) != 1)  # one chunk, scattered artifact rows


def test_gather_codes(tmp_path: Path) -> None:
    syn = Synthetic(tmp_path)
    codes = assemble.gather_codes(syn.parts, syn.n)
    np.testing.assert_array_equal(codes, syn.expected()[1])
    assert {NOT_JPEG, DECODE_ERROR} <= set(codes.tolist()) and (codes == 0).any()


def test_gather_codes_raises_when_a_row_has_no_embedding(tmp_path: Path) -> None:
    syn = Synthetic(tmp_path)
    part = syn.parts[1]
    missing_local = int(part.rows[2])
    for path in part.store.chunks():
        chunk = part.store.read(path)
        if missing_local in chunk["rows"]:
            keep = chunk["rows"] != missing_local
            path.unlink()
            part.store.write(chunk["rows"][keep], chunk["emb"][keep], chunk["codes"][keep])
    with pytest.raises(
        RuntimeError, match=rf"^1 rows of the artifact have no embedding \(first: row {part.start + 2}\)"
    ):
        assemble.gather_codes(syn.parts, syn.n)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_copy_and_verify_give_exactly_the_stored_embeddings_at_their_rows(tmp_path: Path, dtype: str) -> None:
    syn = Synthetic(tmp_path, dtype)
    path, offset = syn.skeleton("a.h5.partial")
    copied: list[int] = []
    assert syn.copy(path, offset, {}, threading.Event(), copied.append)
    assert sum(copied) == syn.n
    assemble.verify(path, syn.parts, syn.n, DIM)
    emb, codes = syn.expected()
    with h5py.File(path, "r") as f:
        ds = f["backbone_embeddings"]
        assert ds.dtype == np.dtype(dtype).newbyteorder("<") and ds.shape == (syn.n, DIM)
        np.testing.assert_array_equal(ds[()], emb)
        np.testing.assert_array_equal(f["images/reject_reason"][()], codes)
    assert durable.read_json(tmp_path / "a.h5.partial.assemble.json") == {"next": [2, 0]}


def test_the_skeleton_has_contiguous_embeddings_at_the_returned_offset(tmp_path: Path) -> None:
    syn = Synthetic(tmp_path)
    path, offset = syn.skeleton("s.h5")
    with h5py.File(path, "r") as f:
        ds = f["backbone_embeddings"]
        assert ds.chunks is None and ds.compression is None  # contiguous
        assert ds.id.get_offset() == offset
        assert ds.id.get_storage_size() == syn.n * DIM * 4  # allocated already, never filled
    assert syn.copy(path, offset, {}, threading.Event())
    emb, _ = syn.expected()
    raw = path.read_bytes()
    for i in (0, syn.n // 2, syn.n - 1):  # the bytes where the offset says, little-endian float32
        assert raw[offset + i * DIM * 4 : offset + (i + 1) * DIM * 4] == emb[i].astype("<f4").tobytes()


def test_the_skeletons_small_arrays(tmp_path: Path) -> None:
    syn = Synthetic(tmp_path)
    path, _ = syn.skeleton("s.h5")
    _, codes = syn.expected()
    rows, p = syn.plan["rows"], syn.plan
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["images/valid_indices"][()], np.flatnonzero(codes == 0))
        np.testing.assert_array_equal(f["images/source"][()], syn.cache["source_idx"][rows])
        np.testing.assert_array_equal(f["images/checksum"][()], syn.cache["checksum"][rows])
        keys = records.target_key(syn.cache["DatasetID"][rows], syn.cache["TargetID"][rows])
        np.testing.assert_array_equal(f["metadata/TargetID"][()], keys)
        np.testing.assert_array_equal(f["metadata/TargetID_raw"][()], syn.cache["TargetID"][rows])
        np.testing.assert_array_equal(f["targets/key"][()], p["target_keys"])
        valid = [int(((keys == k) & (codes == 0)).sum()) for k in p["target_keys"]]
        assert f["targets/n_valid_images"][()].tolist() == valid
        for split in plan.SPLITS:
            pos = plan.split_targets(p, split)
            np.testing.assert_array_equal(f[f"splits/{split}"][()], p["target_keys"][pos])
            idx, dist = geo_knn.load_split(*syn.knn[split][:1], len(pos), syn.knn[split][1])
            np.testing.assert_array_equal(f[f"metadata/knn_indices_geo_{split}"][()], idx)
            np.testing.assert_array_equal(f[f"metadata/knn_distances_geo_{split}"][()], dist)
        assert f.attrs["run_key"] == "R" and f.attrs["extra"] == "[1, 2]"
        assert f.attrs["backbone_output_size"] == DIM


def test_a_stop_mid_copy_is_durable_and_a_rerun_gives_the_same_bytes(tmp_path: Path) -> None:
    syn = Synthetic(tmp_path)
    whole, w_off = syn.skeleton("whole.h5")
    assert syn.copy(whole, w_off, {}, threading.Event())

    path, offset = syn.skeleton("cut.h5")
    stop = threading.Event()
    first: list[int] = []

    def stop_after_one_chunk(n: int) -> None:
        first.append(n)
        stop.set()

    assert syn.copy(path, offset, {}, stop, stop_after_one_chunk) is False
    assert len(first) == 1
    saved = durable.read_json(tmp_path / "cut.h5.assemble.json")
    assert saved == {"next": [0, 1]}  # the first chunk of the first archive is durable
    emb, _ = syn.expected()
    chunk = syn.parts[0].store.read(syn.parts[0].store.chunks()[0])
    _, dest = syn.parts[0].place(chunk["rows"])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["backbone_embeddings"][dest.tolist()], emb[dest])

    rest: list[int] = []
    assert syn.copy(path, offset, saved, threading.Event(), rest.append)
    assert sum(first) + sum(rest) == syn.n  # what was durable was not copied again
    assemble.verify(path, syn.parts, syn.n, DIM)
    a, b = read_artifact(whole), read_artifact(path)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert offset == w_off
    assert (
        path.read_bytes()[offset : offset + syn.n * DIM * 4]
        == whole.read_bytes()[w_off : w_off + syn.n * DIM * 4]
    )


def test_verify_finds_a_wrong_row_and_a_wrong_shape(tmp_path: Path) -> None:
    syn = Synthetic(tmp_path)
    path, offset = syn.skeleton("v.h5")
    assert syn.copy(path, offset, {}, threading.Event())
    with pytest.raises(RuntimeError, match=r"has shape \(\d+, 6\), expected"):
        assemble.verify(path, syn.parts, syn.n + 1, DIM)
    part = syn.parts[1]
    chunk_path = part.store.chunks()[-1]
    chunk = part.store.read(chunk_path)
    _, dest = part.place(chunk["rows"])
    row = int(dest[-1])  # the last artifact row of one chunk
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, np.full(DIM, 1e9, "<f4").tobytes(), offset + row * DIM * 4)
    finally:
        os.close(fd)
    with pytest.raises(RuntimeError, match=rf"row {row} differs from .*{chunk_path.name}"):
        assemble.verify(path, syn.parts, syn.n, DIM)


# ------------------------------------------------------------------------------- the reference's stores
def test_the_reference_work_folder_assembles_into_the_reference_artifact(
    reference: config.DataConfig, tmp_path: Path
) -> None:
    lay = Layout(reference)
    stats = durable.read_json(lay.stats)
    names, model_key = stats["sources"], stats["model_key"]
    markers = {n: lay.index_marker(n, None) for n in names}
    cache = index.load_cache(lay)
    p = durable.read_npz(lay.plan)
    first = np.cumsum([0] + [int(markers[n]["images"]) for n in names])
    parts = [
        Part(
            n,
            EmbeddingStore(
                lay.store_dir(model_key, n, markers[n]["content"]),
                int(markers[n]["images"]),
                (n, markers[n]["content"], model_key),
            ),
            plan.source_rows(p, first, s),
            int(p["src_start"][s]),
        )
        for s, n in enumerate(names)
    ]
    knn = {
        s: (lay.knn_split(stats["knn_key"], s), plan.knn_k(reference.knn_k, len(plan.split_targets(p, s))))
        for s in plan.SPLITS
    }
    dim = int(durable.read_json(lay.model_json(model_key))["dim"])
    n = len(p["rows"])
    codes = assemble.gather_codes(parts, n)
    assert int((codes == 0).sum()) == stats["valid_images"]
    out = tmp_path / "again.h5"
    offset = assemble.write_skeleton(out, cache, p, knn, codes, dim, reference.embedding_dtype, {})
    assert assemble.copy_embeddings(out, offset, dim, "float32", parts, lambda m: None, {}, threading.Event())
    assemble.verify(out, parts, n, dim)
    mine, theirs = read_artifact(out), read_artifact(lay.output)
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        np.testing.assert_array_equal(mine[name], theirs[name], err_msg=name)
