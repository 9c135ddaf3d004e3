"""embed/store.py: one archive's embeddings as immutable chunks of disjoint rows, committed when full."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from building_image_triplet_model.engine.embed import store as emb_store
from building_image_triplet_model.engine.embed.store import EmbeddingStore
from building_image_triplet_model.io import durable, workdir


def emb_for(rows: np.ndarray, dim: int = 4) -> np.ndarray:
    """Embeddings that say which row they belong to."""
    return (rows[:, None] * 10 + np.arange(dim)[None, :]).astype(np.float32)


def put(store: EmbeddingStore, rows: list[int], codes: list[int] | None = None, dim: int = 4) -> Path:
    r = np.array(rows, np.int64)
    c = np.array(codes if codes is not None else [0] * len(rows), np.int8)
    return store.write(r, emb_for(r, dim), c)


def test_chunks_of_disjoint_rows_union_to_done_rows(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "0003-abc", 12)
    assert store.chunks() == [] and store.done_rows().tolist() == [] and store.done_rows().dtype == np.int64
    paths = [put(store, [5, 6, 9]), put(store, [0, 1, 2]), put(store, [3, 11])]
    assert [p.name for p in paths] == [
        "0000000005-0000000009.npz",
        "0000000000-0000000002.npz",
        "0000000003-0000000011.npz",
    ]
    assert store.chunks() == sorted(paths)
    assert store.done_rows().tolist() == [0, 1, 2, 3, 5, 6, 9, 11]
    assert store.name == "0003-abc"
    chunk = store.read(paths[0], dim=4)
    assert chunk["rows"].dtype == np.int64 and chunk["codes"].dtype == np.int8
    np.testing.assert_array_equal(chunk["emb"], emb_for(np.array([5, 6, 9])))


def test_chunk_names_are_unique_for_disjoint_row_sets(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = rng.permutation(500)
    cuts = np.sort(rng.choice(np.arange(1, 500), 60, replace=False))
    sets = [np.sort(part) for part in np.split(rows, cuts)]  # 61 disjoint sets, interleaved
    assert len({emb_store.chunk_name(s) for s in sets}) == len(sets)
    store = EmbeddingStore(tmp_path / "s", 500)
    for s in sets:
        store.write(s, emb_for(s), np.zeros(len(s), np.int8))
    assert len(store.chunks()) == len(sets)  # no chunk replaced another
    assert store.done_rows().tolist() == list(range(500))
    assert emb_store.chunk_name(np.array([7])) == "0000000007-0000000007.npz"


def test_float16_embeddings_are_stored_as_float16(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s", 4)
    path = store.write(np.arange(4), np.ones((4, 3), np.float16), np.zeros(4, np.int32))
    chunk = store.read(path)
    assert chunk["emb"].dtype == np.float16 and chunk["codes"].dtype == np.int8
    assert store.width() == 3


def write_raw(store: EmbeddingStore, name: str, rows: np.ndarray, emb: np.ndarray, codes: np.ndarray) -> Path:
    path = store.folder / name
    made_for = np.array([v.encode() for v in store.made_for], dtype="S")
    durable.write_npz(path, {"rows": rows, "emb": emb, "codes": codes, "made_for": made_for})
    return path


def test_read_refuses_a_chunk_whose_shapes_disagree(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s", 10)
    rows = np.arange(3, dtype=np.int64)
    name = emb_store.chunk_name(rows)
    cases = {
        "fewer embeddings than rows": (np.zeros((2, 4), np.float32), np.zeros(3, np.int8)),
        "one-dimensional embeddings": (np.zeros(3, np.float32), np.zeros(3, np.int8)),
        "fewer codes than rows": (np.zeros((3, 4), np.float32), np.zeros(2, np.int8)),
    }
    for what, (emb, codes) in cases.items():
        path = write_raw(store, name, rows, emb, codes)
        with pytest.raises(durable.CorruptFileError) as err:
            store.read(path)
        assert err.value.path == path, what
    path = write_raw(store, name, rows, np.zeros((3, 4), np.float32), np.zeros(3, np.int8))
    assert store.read(path, dim=4)["emb"].shape == (3, 4)
    with pytest.raises(durable.CorruptFileError, match="shape"):
        store.read(path, dim=8)  # another width than the store's
    durable.write_npz(path, {"rows": rows, "emb": np.zeros((3, 4), np.float32)})  # no codes
    with pytest.raises(durable.CorruptFileError, match="KeyError"):
        store.read(path)


def test_rows_outside_the_archive_or_a_name_that_does_not_match_are_corrupt(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s", 10)
    emb, codes = np.zeros((3, 4), np.float32), np.zeros(3, np.int8)
    beyond = write_raw(store, "0000000008-0000000010.npz", np.array([8, 9, 10]), emb, codes)
    with pytest.raises(durable.CorruptFileError, match="archive of 10 rows") as err:
        store.done_rows()
    assert err.value.path == beyond
    beyond.unlink()
    negative = write_raw(store, "-000000001-0000000001.npz", np.array([-1, 0, 1]), emb, codes)
    with pytest.raises(durable.CorruptFileError):
        store.read_rows(negative)
    negative.unlink()
    misnamed = write_raw(store, "0000000000-0000000005.npz", np.array([0, 1, 2]), emb, codes)
    with pytest.raises(durable.CorruptFileError) as err:
        store.done_rows()
    assert err.value.path == misnamed
    misnamed.unlink()
    empty = write_raw(store, "0000000000-0000000000.npz", np.zeros(0, np.int64), emb[:0], codes[:0])
    with pytest.raises(durable.CorruptFileError):
        store.read_rows(empty)


def test_read_checks_rows_against_the_archive_and_the_name(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s", 10)
    emb, codes = np.zeros((3, 4), np.float32), np.zeros(3, np.int8)
    beyond = write_raw(store, "0000000008-0000000010.npz", np.array([8, 9, 10]), emb, codes)
    with pytest.raises(durable.CorruptFileError):
        store.read(beyond)
    misnamed = write_raw(store, "0000000000-0000000005.npz", np.array([0, 1, 2]), emb, codes)
    with pytest.raises(durable.CorruptFileError):
        store.read(misnamed)


def test_commit_if_full_waits_for_every_row_and_counts_the_codes(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "0009-ck", 8)
    put(store, [0, 2, 4], codes=[0, 16, 0], dim=5)
    assert store.commit_if_full(store.done_rows()) is None
    assert not (store.folder / workdir.SUCCESS).exists()
    assert store.marker() is None
    assert store.width() == 5  # from a chunk, before the commit
    put(store, [1, 3, 5, 6], codes=[17, 0, 0, 0], dim=5)
    assert store.commit_if_full(store.done_rows()) is None  # row 7 is missing
    put(store, [7], codes=[0], dim=5)
    marker = store.commit_if_full(store.done_rows())
    assert marker == {
        "source": "",
        "content": "",
        "model_key": "",
        "rows": 8,
        "valid": 6,
        "failed": 2,
        "dim": 5,
        "chunks": 3,
    }
    assert durable.read_json(store.folder / workdir.SUCCESS) == marker
    assert store.marker() == marker and store.width() == 5
    before = (store.folder / workdir.SUCCESS).stat().st_mtime_ns
    assert store.commit_if_full(store.done_rows()) == marker  # committed once
    assert (store.folder / workdir.SUCCESS).stat().st_mtime_ns == before


def test_commit_if_full_trusts_only_a_full_row_set(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s", 3)
    put(store, [0, 1])
    assert store.commit_if_full(np.array([0, 1])) is None
    assert store.commit_if_full(np.array([0, 1, 2, 3])) is None  # too many is not full either
    assert not (store.folder / workdir.SUCCESS).exists()


def test_width_of_an_empty_store_is_zero(tmp_path: Path) -> None:
    assert EmbeddingStore(tmp_path / "none", 5).width() == 0
