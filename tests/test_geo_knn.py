"""geo_knn.py: exact great-circle KNN per split (cKDTree on unit vectors), in resumable chunks."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from building_image_triplet_model.engine import geo_knn, plan
from building_image_triplet_model.io import durable, workdir


def brute(lat: np.ndarray, lon: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair's haversine distance; the k nearest others of each row, ties by index."""
    n = len(lat)
    d = geo_knn.haversine_m(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
    np.fill_diagonal(d, np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(n), d.shape), d), axis=-1)[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


def run(folder: Path, lat: np.ndarray, lon: np.ndarray, k: int, chunk_rows: int = 7) -> tuple:
    assert geo_knn.run_split(folder, lat, lon, k, threading.Event(), 2, chunk_rows=chunk_rows)
    return geo_knn.load_split(folder, len(lat), k)


def city(n: int, seed: int, lat0: float = 40.75, lon0: float = -73.98, span: float = 0.05) -> tuple:
    rng = np.random.default_rng(seed)
    lat = lat0 + rng.uniform(-span, span, n)
    lon = (lon0 + rng.uniform(-span, span, n) + 180) % 360 - 180
    return lat, lon


# ------------------------------------------------------------------------------------------ distances
def test_haversine_known_values() -> None:
    # One degree of latitude on the mean sphere, and a quarter of the equator.
    one_deg = 2 * np.pi * geo_knn.EARTH_RADIUS_M / 360
    assert geo_knn.haversine_m(np.array(0.0), np.array(0.0), np.array(1.0), np.array(0.0)) == pytest.approx(
        one_deg, abs=1e-6
    )
    quarter = geo_knn.haversine_m(np.array(0.0), np.array(0.0), np.array(0.0), np.array(90.0))
    assert quarter == pytest.approx(np.pi / 2 * geo_knn.EARTH_RADIUS_M, abs=1e-6)
    chord = np.linalg.norm(geo_knn.unit_vectors(np.array([0.0]), np.array([0.0]))[0] - [0, 1, 0])
    assert geo_knn.chord_to_metres(np.array(chord)) == pytest.approx(quarter, abs=1e-6)


@pytest.mark.parametrize("where", [(40.75, -73.98), (0.0, 179.99), (89.95, 10.0), (-33.9, 18.4)])
def test_distances_equal_haversine_within_5_cm_and_are_sorted(tmp_path: Path, where: tuple) -> None:
    lat, lon = city(80, 1, *where)
    idx, dist = run(tmp_path / "knn", lat, lon, 6)
    assert idx.dtype == np.int32 and dist.dtype == np.float32 and idx.shape == dist.shape == (80, 6)
    exact = geo_knn.haversine_m(lat[:, None], lon[:, None], lat[idx], lon[idx])
    assert np.abs(dist - exact).max() < 0.05
    assert np.all(np.diff(dist, axis=1) >= 0)
    assert not np.any(idx == np.arange(80)[:, None])


def test_distances_across_the_globe_are_right_to_float32_precision(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 150)))
    lon = rng.uniform(-180, 180, 150)
    idx, dist = run(tmp_path / "knn", lat, lon, 4)
    exact = geo_knn.haversine_m(lat[:, None], lon[:, None], lat[idx], lon[idx])
    np.testing.assert_allclose(dist, exact, rtol=2e-7, atol=0.05)
    b_idx, _ = brute(lat, lon, 4)
    np.testing.assert_array_equal(idx, b_idx)


# ---------------------------------------------------------------------------------------- neighbours
@pytest.mark.parametrize("k", [1, 3, 10, 38, 39])
def test_equals_brute_force_for_several_k(tmp_path: Path, k: int) -> None:
    n = 40
    lat, lon = city(n, k)
    idx, dist = run(tmp_path / "knn", lat, lon, k)
    b_idx, b_dist = brute(lat, lon, k)
    np.testing.assert_array_equal(idx, b_idx)
    np.testing.assert_allclose(dist, b_dist, atol=0.05)
    if k == n - 1:  # every other target, each once
        assert all(sorted(row) == [j for j in range(n) if j != i] for i, row in enumerate(idx.tolist()))


def test_k_larger_than_the_split_is_capped_by_the_plan(tmp_path: Path) -> None:
    lat, lon = city(6, 3)
    k = plan.knn_k(50, len(lat))
    assert k == 5
    idx, _ = run(tmp_path / "knn", lat, lon, k, chunk_rows=4)
    np.testing.assert_array_equal(idx, brute(lat, lon, 5)[0])
    assert plan.knn_k(50, 1) == 0 and plan.knn_k(50, 0) == 0 and plan.knn_k(3, 10) == 3


def test_the_row_itself_is_excluded_when_more_than_k_plus_1_share_its_point(tmp_path: Path) -> None:
    lat = np.array([1.0] * 10 + [1.01, 1.02])
    lon = np.array([2.0] * 12)
    idx, dist = run(tmp_path / "knn", lat, lon, 3, chunk_rows=5)
    for r in range(12):
        assert r not in idx[r].tolist(), r
        assert len(set(idx[r].tolist())) == 3
    assert np.all(dist[:10] == 0)  # nine others share the point: the three nearest are at 0 m
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_ties_are_ordered_by_index_within_the_k(tmp_path: Path) -> None:
    # Four targets on one point, k = 3: for each of them every candidate is in the tree's answer, so only
    # the order matters.
    lat = np.array([5.0, 5.0, 5.0, 5.0, 5.5])
    lon = np.array([7.0, 7.0, 7.0, 7.0, 7.0])
    idx, _ = run(tmp_path / "knn", lat, lon, 3, chunk_rows=2)
    assert idx[:4].tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_ties_beyond_k_are_resolved_by_index(tmp_path: Path) -> None:
    lat = np.array([1.0] * 10 + [1.01, 1.02])
    lon = np.array([2.0] * 12)
    idx, _ = run(tmp_path / "knn", lat, lon, 3, chunk_rows=5)
    np.testing.assert_array_equal(idx, brute(lat, lon, 3)[0])
    # The same for a target that is not on the shared point: four at one distance, room for three.
    lat, lon = np.array([5.0, 5.0, 5.0, 5.0, 5.5]), np.array([7.0] * 5)
    idx, _ = run(tmp_path / "knn2", lat, lon, 3, chunk_rows=2)
    assert idx[4].tolist() == [0, 1, 2]


def test_neighbours_drops_the_farthest_when_the_row_is_not_among_the_candidates() -> None:
    dist = np.array([[0.0, 0.0, 0.1, 0.2], [0.0, 0.0, 0.0, 0.3]])
    idx = np.array([[9, 4, 7, 8], [3, 5, 6, 1]])  # rows 5 and 6 of a split
    out_idx, out_m, unsure = geo_knn.neighbours(dist, idx, np.array([5, 6]), 3)
    # Row 5: its own index is not there, so the farthest (8) goes, and the row is unsure (more targets may
    # share its point: the caller asks the tree again); row 6: its own index goes, and as its k-th (1, at
    # 0.3) is the farthest the tree returned, another target at 0.3 may have been cut off: unsure too.
    assert out_idx.tolist() == [[4, 9, 7], [3, 5, 1]]
    assert unsure.tolist() == [True, True]
    dist[1, 3] = 0.2
    sure = geo_knn.neighbours(np.c_[dist, [0.5, 0.5]], np.c_[idx, [2, 0]], np.array([5, 6]), 3)[2]
    assert sure.tolist() == [True, False]  # one farther candidate returned: row 6's k nearest are certain
    np.testing.assert_allclose(out_m[0], geo_knn.chord_to_metres(np.array([0.0, 0.0, 0.1])), rtol=1e-6)


# ---------------------------------------------------------------------------------------- chunks, resume
def test_resumes_inside_a_split_after_a_chunk_is_lost(tmp_path: Path) -> None:
    lat, lon = city(50, 2)
    folder = tmp_path / "knn"
    whole = run(folder, lat, lon, 4, chunk_rows=10)
    assert workdir.ranges_done(folder) == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 50)]
    assert workdir.committed(folder) == {
        "key": tmp_path.name,
        "split": "knn",
        "rows": 50,
        "k": 4,
        "chunks": 5,
    }

    (folder / workdir.SUCCESS).unlink()
    (folder / workdir.range_name(20, 30)).unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    rows = []
    assert geo_knn.run_split(folder, lat, lon, 4, threading.Event(), 1, 10, on_rows=rows.append)
    assert rows == [10]  # only the missing chunk was computed
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz") if p.name in mtimes} == mtimes
    again = geo_knn.load_split(folder, 50, 4)
    np.testing.assert_array_equal(again[0], whole[0])
    np.testing.assert_array_equal(again[1], whole[1])


def test_a_stop_leaves_whole_chunks_and_no_commit(tmp_path: Path) -> None:
    lat, lon = city(50, 4)
    folder = tmp_path / "knn"
    stop = threading.Event()
    rows: list[int] = []

    def count(n: int) -> None:
        rows.append(n)
        if len(rows) == 2:
            stop.set()

    assert not geo_knn.run_split(folder, lat, lon, 4, stop, 1, 10, on_rows=count)
    assert workdir.ranges_done(folder) == [(0, 10), (10, 20)]
    assert workdir.committed(folder) is None
    rows.clear()
    assert geo_knn.run_split(folder, lat, lon, 4, threading.Event(), 1, 10, on_rows=rows.append)
    assert rows == [10, 10, 10]
    np.testing.assert_array_equal(geo_knn.load_split(folder, 50, 4)[0], brute(lat, lon, 4)[0])
    rows.clear()
    assert geo_knn.run_split(folder, lat, lon, 4, threading.Event(), 1, 10, on_rows=rows.append)
    assert rows == []  # committed: nothing to do


def test_k_zero_writes_empty_tables(tmp_path: Path) -> None:
    one = tmp_path / "one"
    idx, dist = run(one, np.array([1.0]), np.array([2.0]), 0)
    assert idx.shape == (1, 0) and dist.shape == (1, 0) and idx.dtype == np.int32
    assert workdir.committed(one) == {"key": tmp_path.name, "split": "one", "rows": 1, "k": 0, "chunks": 1}
    lat, lon = city(9, 5)
    idx, _ = run(tmp_path / "nine", lat, lon, 0, chunk_rows=4)
    assert idx.shape == (9, 0)
    assert workdir.ranges_done(tmp_path / "nine") == [(0, 4), (4, 8), (8, 9)]


def test_an_empty_split(tmp_path: Path) -> None:
    folder = tmp_path / "none"
    idx, dist = run(folder, np.zeros(0), np.zeros(0), 0)
    assert idx.shape == (0, 0) and dist.shape == (0, 0)
    assert workdir.committed(folder) == {
        "key": tmp_path.name,
        "split": "none",
        "rows": 0,
        "k": 0,
        "chunks": 0,
    }


def test_load_split_refuses_a_missing_or_misshapen_chunk_after_commit(tmp_path: Path) -> None:
    lat, lon = city(30, 6)
    folder = tmp_path / "knn"
    run(folder, lat, lon, 3, chunk_rows=10)
    (folder / workdir.range_name(10, 20)).unlink()
    with pytest.raises(durable.CorruptFileError, match=r"do not cover rows 0\.\.30") as err:
        geo_knn.load_split(folder, 30, 3)
    assert err.value.path == folder / workdir.SUCCESS
    folder2 = tmp_path / "knn2"
    run(folder2, lat, lon, 3, chunk_rows=10)
    (folder2 / workdir.range_name(20, 30)).unlink()  # the last chunk
    with pytest.raises(durable.CorruptFileError):
        geo_knn.load_split(folder2, 30, 3)
    folder3 = tmp_path / "knn3"
    run(folder3, lat, lon, 3, chunk_rows=10)
    bad = folder3 / workdir.range_name(10, 20)
    durable.write_npz(
        bad,
        {
            "indices": np.zeros((10, 2), np.int32),
            "distances": np.zeros((10, 2), np.float32),
            "made_for": np.array([tmp_path.name.encode(), b"knn3"]),
            "rows": np.array([10, 20]),
        },
    )
    with pytest.raises(durable.CorruptFileError, match=r"shape \(10, 2\), expected \(10, 3\)") as err:
        geo_knn.load_split(folder3, 30, 3)
    assert err.value.path == bad
    with pytest.raises(durable.CorruptFileError):
        geo_knn.load_split(tmp_path / "knn", 31, 3)  # a split of another size
