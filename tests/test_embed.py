"""The embedding step's bookkeeping: which batches remain, and how results become chunk files."""

import numpy as np

from building_image_triplet_model import embed, workdir


def chunk(folder, a, b, dim=4):
    workdir.write_npz(folder / embed.chunk_name(a, b), {"emb": np.ones((b - a, dim), np.float32),
                                                        "codes": np.zeros(b - a, np.int8)})  # fmt: skip


def test_pending_batches_follow_the_fixed_grid(tmp_path):
    folder = tmp_path / "emb" / "0003"
    chunk(folder, 0, 16)
    chunk(folder, 16, 24)
    chunk(folder, 32, 35)  # a chunk that does not cover a whole batch covers no batch
    works = embed.plan_work(["0003", "0004"], [40, 10], tmp_path / "emb", 8)
    assert works[0].pending == [(24, 32), (32, 40)]
    assert works[1].pending == [(0, 8), (8, 10)]
    workdir.write_json(folder / workdir.SUCCESS, {"rows": 40})
    assert embed.plan_work(["0003"], [40], tmp_path / "emb", 8)[0].pending == []


def test_writer_joins_contiguous_batches_and_commits_a_source(tmp_path):
    works = [embed.SourceWork("a", 20, tmp_path / "a"), embed.SourceWork("b", 8, tmp_path / "b")]
    done = []
    writer = embed.ChunkWriter(works, interval_s=3600, dtype="float32", on_source_done=done.append)
    writer.start()
    for s, a, b in [(0, 0, 8), (0, 8, 16), (0, 16, 20), (1, 0, 8)]:
        writer.put(s, a, b, np.full((b - a, 3), a, np.float32), np.zeros(b - a, np.int8))
    writer.close()
    assert embed.done_chunks(tmp_path / "a") == [(0, 20)]  # one chunk: the source ended
    assert embed.done_chunks(tmp_path / "b") == [(0, 8)]
    assert [w.name for w in done] == ["a", "b"]
    marker = workdir.read_json(tmp_path / "a" / workdir.SUCCESS)
    assert marker["rows"] == 20 and marker["valid"] == 20 and marker["dim"] == 3


def test_writer_flushes_on_a_gap_and_on_close(tmp_path):
    works = [embed.SourceWork("a", 100, tmp_path / "a")]
    writer = embed.ChunkWriter(works, interval_s=3600, dtype="float16")
    writer.start()
    writer.put(0, 0, 8, np.zeros((8, 2), np.float32), np.zeros(8, np.int8))
    writer.put(0, 16, 24, np.zeros((8, 2), np.float32), np.array([0] * 7 + [17], np.int8))  # a gap at 8..16
    writer.close()  # a stop: what is buffered becomes durable, the source is not committed
    assert embed.done_chunks(tmp_path / "a") == [(0, 8), (16, 24)]
    assert not (tmp_path / "a" / workdir.SUCCESS).exists()
    data = workdir.read_npz(tmp_path / "a" / embed.chunk_name(16, 24))
    assert data["emb"].dtype == np.float16 and data["codes"][-1] == 17
