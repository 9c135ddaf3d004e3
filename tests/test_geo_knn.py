import threading

import numpy as np
import pytest

from building_image_triplet_model import geo_knn


def brute(lat, lon, k):
    d = geo_knn.haversine_m(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
    np.fill_diagonal(d, np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(lat)), d.shape), d), axis=-1)[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


def run(tmp_path, lat, lon, k, chunk_rows=7):
    folder = tmp_path / "knn"
    assert geo_knn.run_split(folder, lat, lon, k, threading.Event(), 2, chunk_rows=chunk_rows)
    return geo_knn.load_split(folder, len(lat), k)


@pytest.mark.parametrize("where", [(40.75, -73.98), (0.0, 179.999), (89.9, 10.0)])
def test_matches_brute_force_great_circle(tmp_path, where):
    rng = np.random.default_rng(1)
    lat = where[0] + rng.uniform(-0.05, 0.05, 60)
    lon = where[1] + rng.uniform(-0.05, 0.05, 60)
    lon = (lon + 180) % 360 - 180
    idx, dist = run(tmp_path, lat, lon, 8)
    b_idx, b_dist = brute(lat, lon, 8)
    np.testing.assert_allclose(dist, b_dist, rtol=1e-5, atol=1e-3)
    assert (idx == b_idx).mean() > 0.99  # ties at float precision may swap
    assert np.all(np.diff(dist, axis=1) >= 0)
    assert not np.any(idx == np.arange(60)[:, None])


def test_shared_coordinates_exclude_only_self(tmp_path):
    lat = np.array([1.0] * 6 + [1.001, 1.002])
    lon = np.array([2.0] * 6 + [2.0, 2.0])
    idx, dist = run(tmp_path, lat, lon, 3, chunk_rows=3)
    for r in range(8):
        assert r not in idx[r]
        assert len(set(idx[r])) == 3
    assert np.all(dist[:6, :3] == 0)  # five others share the point: the three nearest are at 0 m
    np.testing.assert_array_equal(idx[0], [1, 2, 3])  # ties ordered by index


def test_k_capped_and_tiny_splits(tmp_path):
    idx, _ = run(tmp_path, np.array([1.0, 1.1, 1.2]), np.array([2.0, 2.0, 2.0]), 2)
    assert idx.shape == (3, 2)
    empty = geo_knn.run_split(tmp_path / "one", np.array([1.0]), np.array([2.0]), 0, threading.Event(), 1)
    assert empty and geo_knn.load_split(tmp_path / "one", 1, 0)[0].shape == (1, 0)


def test_resumes_inside_a_split(tmp_path):
    rng = np.random.default_rng(2)
    lat, lon = rng.uniform(10, 11, 50), rng.uniform(20, 21, 50)
    stop = threading.Event()
    folder = tmp_path / "knn"
    calls = []

    def stop_after_two(n):
        calls.append(n)
        if len(calls) == 2:
            stop.set()

    assert not geo_knn.run_split(folder, lat, lon, 4, stop, 1, on_rows=stop_after_two, chunk_rows=10)
    assert len(geo_knn.done_chunks(folder)) == 2
    calls.clear()
    assert geo_knn.run_split(folder, lat, lon, 4, threading.Event(), 1, on_rows=calls.append, chunk_rows=10)
    assert sum(calls) == 30  # only the three missing chunks were computed
    idx, _ = geo_knn.load_split(folder, 50, 4)
    np.testing.assert_array_equal(idx, brute(lat, lon, 4)[0])
