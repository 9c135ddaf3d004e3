"""Step 3: for every target of a split, its k nearest other targets of that split by great-circle distance.

Targets become points on the unit sphere; the chord between two points is a monotonic function of the
great-circle distance, so a KD-tree on the 3-D vectors finds the exact nearest neighbours in O(n log n).
scipy's cKDTree (parallel queries) gives the same distances as scikit-learn's KDTree at 2-3x the speed
(`make bench`: benchmarks/bench_knn.py). Rows are computed in chunks; each chunk is an immutable file, so
a killed run resumes inside a split.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import durable, faults, workdir

EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG)


def unit_vectors(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    lat, lon = np.radians(lat_deg), np.radians(lon_deg)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def chord_to_metres(chord: np.ndarray) -> np.ndarray:
    return 2.0 * EARTH_RADIUS_M * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))


def haversine_m(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(lon2 - lon1)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2.0 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def neighbours(dist: np.ndarray, idx: np.ndarray, start: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From a tree's k+1 nearest (chord distances, indices) of rows [start, ...): (indices int32, metres
    float32), nearest first, never the row itself.

    A row's own index is removed where it appears; where it does not (more than k+1 targets share its
    coordinates), the farthest candidate is dropped instead. Ties are ordered by index so that the result
    never depends on the tree's internal order.
    """
    rows, q = idx.shape
    own = np.arange(start, start + rows)[:, None]
    drop = idx == own
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    idx = idx[keep].reshape(rows, q - 1)[:, :k]
    metres = chord_to_metres(dist[keep].reshape(rows, q - 1)[:, :k])
    order = np.lexsort((idx, metres), axis=-1)
    return (
        np.take_along_axis(idx, order, axis=1).astype(np.int32),
        np.take_along_axis(metres, order, axis=1).astype(np.float32),
    )


def run_split(
    folder: Path,
    lat: np.ndarray,
    lon: np.ndarray,
    k: int,
    stop: threading.Event,
    threads: int,
    chunk_rows: int,
    on_rows: Callable[[int], None] | None = None,
) -> bool:
    """Compute every missing chunk of one split; True when the split is complete."""
    from scipy.spatial import cKDTree

    n = len(lat)
    if workdir.committed(folder):
        return True
    have = {a for a, _ in workdir.ranges_done(folder)}
    todo = [(a, min(a + chunk_rows, n)) for a in range(0, n, chunk_rows) if a not in have]
    xyz = unit_vectors(lat, lon) if todo and k > 0 else None
    tree = cKDTree(xyz) if xyz is not None else None
    for a, b in todo:
        if stop.is_set():
            return False
        if tree is None:
            chunk = {"indices": np.zeros((b - a, 0), np.int32), "distances": np.zeros((b - a, 0), np.float32)}
        else:
            dist, idx = tree.query(xyz[a:b], k=min(k + 1, n), workers=max(1, threads))
            idx_k, metres = neighbours(dist.reshape(b - a, -1), idx.reshape(b - a, -1), a, k)
            chunk = {"indices": idx_k, "distances": metres}
        durable.write_npz(folder / workdir.range_name(a, b), chunk)
        faults.point("knn.chunk")
        if on_rows:
            on_rows(b - a)
    if stop.is_set():
        return False
    workdir.commit(folder, {"rows": n, "k": k, "chunks": len(workdir.ranges_done(folder))})
    return True


def load_split(folder: Path, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole table of a completed split (a damaged chunk is a CorruptFileError naming it)."""
    idx = np.zeros((n, k), np.int32)
    dist = np.zeros((n, k), np.float32)
    chunks = workdir.ranges_done(folder)
    starts = [0] + [b for _, b in chunks[:-1]]
    if sum(b - a for a, b in chunks) != n or [a for a, _ in chunks] != starts[: len(chunks)]:
        raise durable.CorruptFileError(folder / workdir.SUCCESS, f"its chunks do not cover rows 0..{n}")
    for a, b in chunks:
        chunk = durable.read_npz(folder / workdir.range_name(a, b), ("indices", "distances"))
        if chunk["indices"].shape != (b - a, k):
            raise durable.CorruptFileError(
                folder / workdir.range_name(a, b), f"shape {chunk['indices'].shape}, expected {(b - a, k)}"
            )
        idx[a:b] = chunk["indices"]
        dist[a:b] = chunk["distances"]
    return idx, dist
