"""embed/loader.py: the chunk writer's bookkeeping, embed_all on real archives with the tiny timm model."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from building_image_triplet_model import config
from building_image_triplet_model.engine import index
from building_image_triplet_model.engine.embed import loader as embed
from building_image_triplet_model.engine.embed.decode import ImageReader
from building_image_triplet_model.engine.embed.loader import ChunkWriter, Work
from building_image_triplet_model.engine.embed.store import EmbeddingStore
from building_image_triplet_model.errors import InputError
from building_image_triplet_model.inputs.records import REASON_CODE
from building_image_triplet_model.io import durable, workdir
from building_image_triplet_model.io.workdir import Layout


# ------------------------------------------------------------------------------------ the chunk writer
def work(tmp: Path, name: str, n_rows: int, rows: np.ndarray | None = None, done: list | None = None) -> Work:
    store = EmbeddingStore(tmp / name, n_rows)
    pending = np.arange(n_rows) if rows is None else rows
    return Work(
        0, name, store, pending.astype(np.int64), {}, on_done=done.append if done is not None else None
    )


def batch(rows: Any, dim: int = 3, code: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.asarray(rows, np.int64)
    emb = (r[:, None] + np.arange(dim) / 4).astype(np.float32)
    return r, emb, np.full(len(r), code, np.int8)


def names(w: Work) -> list[str]:
    return [p.name for p in w.store.chunks()]


def test_an_archives_results_become_one_chunk_when_its_rows_are_all_delivered(tmp_path: Path) -> None:
    done: list[Work] = []
    chunks: list[str] = []
    a = work(tmp_path, "a", 20, done=done)
    writer = ChunkWriter([a], interval_s=3600, dtype="float32", on_chunk=lambda w: chunks.append(w.name))
    writer.start()
    for rows in (range(0, 8), range(8, 16)):
        writer.put(0, *batch(list(rows)))
    writer.put(0, *batch([16, 17, 18, 19], code=REASON_CODE["decode_error"]))
    deadline = time.monotonic() + 30
    while not done and time.monotonic() < deadline:  # written as soon as the archive is complete,
        time.sleep(0.01)  # long before the interval and without a close
    assert [w.name for w in done] == ["a"]
    writer.close()
    assert names(a) == ["0000000000-0000000019.npz"]
    assert chunks == ["a"]
    assert a.delivered == 20
    chunk = a.store.read(a.store.chunks()[0], 3)
    np.testing.assert_array_equal(chunk["rows"], np.arange(20))
    np.testing.assert_array_equal(chunk["emb"], batch(range(20))[1])
    assert durable.read_json(a.store.folder / workdir.SUCCESS) == {
        "source": "",
        "content": "",
        "model_key": "",
        "rows": 20,
        "valid": 16,
        "failed": 4,
        "dim": 3,
        "chunks": 1,
    }


def test_pending_rows_complete_a_store_that_already_held_the_others(tmp_path: Path) -> None:
    done: list[Work] = []
    store_rows = np.arange(30)
    earlier = store_rows[::3]  # a subset run embedded these
    w = work(tmp_path, "a", 30, rows=np.setdiff1d(store_rows, earlier), done=done)
    w.store.write(*batch(earlier))
    writer = ChunkWriter([w], interval_s=3600, dtype="float32")
    writer.start()
    writer.put(0, *batch(w.rows[:10]))
    writer.put(0, *batch(w.rows[10:]))
    writer.close()
    assert len(done) == 1
    assert w.store.marker() == {
        **dict.fromkeys(("source", "content", "model_key"), ""),
        **{"rows": 30, "valid": 30, "failed": 0, "dim": 3, "chunks": 2},
    }
    assert w.store.done_rows().tolist() == list(range(30))


def test_a_close_makes_buffered_results_durable_without_committing(tmp_path: Path) -> None:
    done: list[Work] = []
    chunks: list[str] = []
    a = work(tmp_path, "a", 100, done=done)
    writer = ChunkWriter([a], interval_s=3600, dtype="float16", on_chunk=lambda w: chunks.append(w.name))
    writer.start()
    writer.put(0, *batch(range(0, 8)))
    writer.put(0, *batch(range(8, 16), code=REASON_CODE["not_jpeg"]))
    time.sleep(0.2)
    assert a.store.chunks() == []  # buffered: the interval is an hour
    writer.close()  # a stop request
    assert names(a) == ["0000000000-0000000015.npz"]
    assert chunks == ["a"] and done == []
    assert not (a.store.folder / workdir.SUCCESS).exists()
    chunk = a.store.read(a.store.chunks()[0])
    assert chunk["emb"].dtype == np.float16
    assert chunk["codes"].tolist() == [0] * 8 + [REASON_CODE["not_jpeg"]] * 8


def test_two_archives_each_get_their_own_chunks_and_commit(tmp_path: Path) -> None:
    done: list[Work] = []
    a, b = work(tmp_path, "a", 10, done=done), work(tmp_path, "b", 6, done=done)
    writer = ChunkWriter([a, b], interval_s=3600, dtype="float32")
    writer.start()
    # One batch of 8 spanning both archives arrives as one put per archive.
    writer.put(0, *batch(range(0, 8)))
    writer.put(0, *batch([8, 9]))
    writer.put(1, *batch(range(0, 6)))
    writer.close()
    assert names(a) == ["0000000000-0000000009.npz"] and names(b) == ["0000000000-0000000005.npz"]
    assert sorted(w.name for w in done) == ["a", "b"]
    assert a.store.marker()["rows"] == 10 and b.store.marker()["rows"] == 6


def test_interval_zero_writes_every_delivery_at_once(tmp_path: Path) -> None:
    a = work(tmp_path, "a", 40)
    chunks: list[str] = []
    writer = ChunkWriter([a], interval_s=0, dtype="float32", on_chunk=lambda w: chunks.append(w.name))
    writer.start()
    for start in (0, 8, 16):
        writer.put(0, *batch(range(start, start + 8)))
    writer.close()
    assert names(a) == ["0000000000-0000000007.npz", "0000000008-0000000015.npz", "0000000016-0000000023.npz"]
    assert len(chunks) == 3 and a.store.marker() is None


def test_an_old_buffer_is_flushed_by_the_interval_alone(tmp_path: Path) -> None:
    a = work(tmp_path, "a", 40)
    writer = ChunkWriter([a], interval_s=0.5, dtype="float32")
    writer.start()
    t0 = time.monotonic()
    writer.put(0, *batch(range(0, 8)))
    writer.put(0, *batch(range(8, 16)))
    while len(a.store.done_rows()) < 16 and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    # Written with no further put and no close, and not before the interval.
    assert a.store.done_rows().tolist() == list(range(16))
    assert names(a)[0].startswith("0000000000-")
    assert elapsed >= 0.49
    writer.put(0, *batch(range(16, 24)))
    writer.close()
    assert names(a)[-1] == "0000000016-0000000023.npz"
    assert a.store.marker() is None


def test_a_buffer_of_max_chunk_rows_is_written_whatever_the_interval(tmp_path: Path) -> None:
    n = embed.MAX_CHUNK_ROWS + 30_000
    a = work(tmp_path, "a", n + 10)
    writer = ChunkWriter([a], interval_s=3600, dtype="float32")
    writer.start()
    writer.put(0, *batch(range(0, 40_000), dim=1))
    writer.put(0, *batch(range(40_000, n), dim=1))
    t0 = time.monotonic()
    while not a.store.chunks() and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    assert names(a) == [f"0000000000-{n - 1:010d}.npz"]
    writer.close()
    assert len(a.store.chunks()) == 1


def test_a_failing_writer_is_reported_to_the_producer(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    bad = Work(0, "bad", EmbeddingStore(blocker / "store", 8), np.arange(8), {})
    writer = ChunkWriter([bad], interval_s=0, dtype="float32")
    writer.start()
    writer.put(0, *batch(range(8)))
    with pytest.raises(RuntimeError, match="the chunk writer failed"):
        writer.close()
    assert isinstance(writer.error, OSError)


# ---------------------------------------------------------------------------- embed_all, the real model
@pytest.fixture(scope="module")
def tiny(reference: config.DataConfig) -> Any:
    from building_image_triplet_model.engine import preflight
    from building_image_triplet_model.engine.embed import backbone

    return backbone.load(reference, preflight.resolve(reference))


class Ref:
    """The reference run's archives, shards and stores."""

    def __init__(self, cfg: config.DataConfig) -> None:
        self.cfg = cfg
        self.layout = Layout(cfg)
        stats = durable.read_json(self.layout.stats)
        self.names: list[str] = stats["sources"]
        self.model_key = stats["model_key"]
        self.markers = {n: self.layout.index_marker(n, None) for n in self.names}
        self.shards = {n: index.load_shard(self.layout, n, self.markers[n]) for n in self.names}
        self.reader = ImageReader([str(Path(cfg.input_dir) / f"{n}.tar") for n in self.names], [True] * 3)

    def images(self, name: str) -> int:
        return int(self.markers[name]["images"])

    def row_of(self, name: str, stem: str) -> int:
        return int(np.flatnonzero(self.shards[name]["stem"] == stem.encode())[0])

    def work(self, tmp: Path, name: str, rows: np.ndarray, **kw: Any) -> Work:
        s = self.names.index(name)
        shard = self.shards[name]
        loc = {k: shard[k][rows] for k in ("path", "offset", "size", "checksum")}
        store = EmbeddingStore(tmp / f"{name}-store", self.images(name))
        return Work(s, name, store, np.asarray(rows, np.int64), loc, **kw)

    def stored(self, name: str) -> dict[int, tuple[np.ndarray, int]]:
        content = self.markers[name]["content"]
        store = EmbeddingStore(
            self.layout.store_dir(self.model_key, name, content),
            self.images(name),
            (name, content, self.model_key),
        )
        return by_row(store)


def by_row(store: EmbeddingStore) -> dict[int, tuple[np.ndarray, int]]:
    out = {}
    for path in store.chunks():
        chunk = store.read(path)
        for r, e, c in zip(chunk["rows"].tolist(), chunk["emb"], chunk["codes"].tolist(), strict=True):
            out[r] = (e, c)
    return out


@pytest.fixture(scope="module")
def ref(reference: config.DataConfig) -> Ref:
    return Ref(reference)


def test_embeddings_do_not_depend_on_the_batch_companions(ref: Ref, tiny: Any, tmp_path: Path) -> None:
    assert ref.cfg.batch_size == 8 and ref.cfg.embedding_chunk_interval_s == 0
    bad = [ref.row_of("0003", f"0003_bad_{k}") for k in ("not_jpeg", "decode_error", "truncated_scan")]
    rows_3 = np.union1d(np.arange(0, 16, 2), bad)  # 11 rows: a batch of 8 splits them
    rows_9 = np.arange(1, 25, 2)  # 12 rows
    results = []
    for order, folder in ((("0009", "0003"), "one"), (("0003", "0009"), "two")):
        batches: list[int] = []
        chunks: list[str] = []
        works = [ref.work(tmp_path / folder, n, rows_3 if n == "0003" else rows_9) for n in order]
        complete = embed.embed_all(
            works,
            tiny,
            ref.reader,
            ref.cfg,
            threading.Event(),
            batches.append,
            lambda w, sink=chunks: sink.append(w.name),
        )
        assert complete is True
        assert batches == [8, 8, 7]  # 23 rows; the second batch spans both archives
        for w in works:
            expected = rows_3 if w.name == "0003" else rows_9
            assert w.store.done_rows().tolist() == expected.tolist()  # each archive's rows in its own store
            assert w.store.marker() is None  # a part of the archive only: not committed
            assert set(chunks) == {"0003", "0009"}
        results.append({w.name: by_row(w.store) for w in works})
    for name, rows in (("0003", rows_3), ("0009", rows_9)):
        reference_rows = ref.stored(name)
        for r in rows.tolist():
            e_ref, c_ref = reference_rows[r]
            for got in results:
                e, c = got[name][r]
                assert c == c_ref, (name, r)
                assert e.tobytes() == e_ref.tobytes(), (name, r)  # bit for bit, on the CPU
    codes_3 = {r: results[0]["0003"][r][1] for r in bad}
    assert codes_3 == {
        bad[0]: REASON_CODE["not_jpeg"],
        bad[1]: REASON_CODE["decode_error"],
        bad[2]: REASON_CODE["truncated_scan"],
    }
    assert not results[0]["0003"][bad[0]][0].any()  # a rejected image has a zero embedding
    assert results[0]["0003"][0][0].any()


def test_a_whole_archive_is_committed_with_the_reference_counts(ref: Ref, tiny: Any, tmp_path: Path) -> None:
    done: list[str] = []
    n = ref.images("0009")
    w = ref.work(tmp_path, "0009", np.arange(n), on_done=lambda w: done.append(w.name))
    assert embed.embed_all([w], tiny, ref.reader, ref.cfg, threading.Event())
    assert done == ["0009"]
    ref_store = EmbeddingStore(
        ref.layout.store_dir(ref.model_key, "0009", ref.markers["0009"]["content"]), n
    ).marker()
    mine = w.store.marker()
    assert ref_store is not None and mine is not None
    assert {k: mine[k] for k in ("rows", "valid", "failed", "dim")} == {
        k: ref_store[k] for k in ("rows", "valid", "failed", "dim")
    }
    assert mine["failed"] == 3  # the planted not_jpeg, decode_error and truncated_scan


def test_a_changed_image_stops_with_an_input_error_naming_the_archive(
    ref: Ref, tiny: Any, tmp_path: Path
) -> None:
    w = ref.work(tmp_path, "0004", np.arange(24))
    w.locators["checksum"] = w.locators["checksum"].copy()
    w.locators["checksum"][13] ^= 1  # the index saw other bytes for row 13
    path = w.locators["path"][13].decode()
    seen: list[tuple[str, int]] = []
    with pytest.raises(InputError, match=rf"archive 0004 changed after it was indexed: the bytes of {path}"):
        embed.embed_all(
            [w],
            tiny,
            ref.reader,
            ref.cfg,
            threading.Event(),
            on_changed=lambda wk, r: seen.append((wk.name, r)),
        )
    assert seen == [("0004", 13)]
    done = w.store.done_rows().tolist()
    assert done == list(range(8))  # the batch before it is kept; the changed one is not stored
    assert w.store.marker() is None


def test_a_stop_keeps_the_batches_computed_and_returns_false(ref: Ref, tiny: Any, tmp_path: Path) -> None:
    stop = threading.Event()
    w = ref.work(tmp_path, "0004", np.arange(40))
    assert embed.embed_all([w], tiny, ref.reader, ref.cfg, stop, lambda n: stop.set()) is False
    done = w.store.done_rows().tolist()
    assert done == list(range(16))  # the batch that asked to stop and the one already computed
    assert w.store.marker() is None
    reference_rows = ref.stored("0004")
    for r in done:
        assert by_row(w.store)[r][0].tobytes() == reference_rows[r][0].tobytes()


def test_nothing_to_embed_is_done_at_once(ref: Ref, tiny: Any, tmp_path: Path) -> None:
    w = ref.work(tmp_path, "0003", np.zeros(0, np.int64))
    assert embed.embed_all([w], tiny, ref.reader, ref.cfg, threading.Event()) is True
    assert not w.store.folder.exists()


def test_the_model_runs_with_its_thread_count_in_the_thread_that_runs_it(tiny: Any) -> None:
    """torch.set_num_threads is per thread: the pipeline loads the model in a loader thread and runs it in
    another, which must still get the configured count (here 1), not torch's default."""
    import torch

    assert tiny.cpu_threads == 1
    seen: list[int] = []
    hook = tiny.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:

        def other_thread() -> None:
            torch.set_num_threads(2)
            tiny.embed(torch.zeros((1, 32, 32, 3), dtype=torch.uint8))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    finally:
        hook.remove()
        torch.set_num_threads(before)
    assert seen == [1]
