"""Step 3: for every target of a split, its k nearest other targets of that split by great-circle distance.

Targets become points on the unit sphere; the chord between two points is a monotonic function of the
great-circle distance, so a KD-tree on the 3-D vectors finds the exact nearest neighbours in O(n log n).
Rows are computed in chunks; each chunk is an immutable file, so a killed run resumes inside a split.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import faults, workdir

EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG)
CHUNK_ROWS = 100_000


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


def query_rows(tree: object, xyz: np.ndarray, start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of rows [start, stop): (indices int32, metres float32), nearest first, never the row itself.

    The tree is asked for k+1 neighbours. A row's own index is removed where it appears; where it does not
    (more than k+1 targets share its coordinates), the farthest candidate is dropped instead. Ties are
    ordered by index so that the result never depends on the tree's internal order.
    """
    n = len(xyz)
    q = min(k + 1, n)
    dist, idx = tree.query(xyz[start:stop], k=q)  # type: ignore[attr-defined]
    own = np.arange(start, stop)[:, None]
    drop = idx == own
    no_self = ~drop.any(axis=1)
    drop[no_self, -1] = True
    keep = ~drop
    idx = idx[keep].reshape(stop - start, q - 1)[:, :k]
    dist = dist[keep].reshape(stop - start, q - 1)[:, :k]
    metres = chord_to_metres(dist)
    order = np.lexsort((idx, metres), axis=-1)
    idx = np.take_along_axis(idx, order, axis=1)
    metres = np.take_along_axis(metres, order, axis=1)
    return idx.astype(np.int32), metres.astype(np.float32)


chunk_name = workdir.range_name
done_chunks = workdir.done_ranges


def rows_done(folder: Path, n: int) -> int:
    """Rows of a split's table that are on disk."""
    if (folder / workdir.SUCCESS).exists():
        return n
    return sum(min(b, n) - a for a, b in done_chunks(folder))


def run_split(
    folder: Path,
    lat: np.ndarray,
    lon: np.ndarray,
    k: int,
    stop: threading.Event,
    threads: int,
    on_rows: Callable[[int], None] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> bool:
    """Compute every missing chunk of one split; True when the split is complete."""
    from sklearn.neighbors import KDTree

    n = len(lat)
    if workdir.read_json(folder / workdir.SUCCESS):
        return True
    have = {a for a, _ in done_chunks(folder)}
    todo = [(a, min(a + chunk_rows, n)) for a in range(0, n, chunk_rows) if a not in have]
    if todo and k > 0:
        xyz = unit_vectors(lat, lon)
        tree = KDTree(xyz)
        sub = max(1, min(8192, (chunk_rows + threads - 1) // threads))  # bounds the per-thread temporaries

        def part(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
            return query_rows(tree, xyz, a, b, k)

        with ThreadPoolExecutor(max(1, threads)) as pool:
            for a, b in todo:
                if stop.is_set():
                    return False
                pieces = list(pool.map(part, range(a, b, sub), [min(r + sub, b) for r in range(a, b, sub)]))
                idx = np.concatenate([p[0] for p in pieces])
                dist = np.concatenate([p[1] for p in pieces])
                workdir.write_npz(folder / chunk_name(a, b), {"indices": idx, "distances": dist})
                faults.point("knn.chunk")
                if on_rows:
                    on_rows(b - a)
    elif todo:
        for a, b in todo:
            empty = {"indices": np.zeros((b - a, 0), np.int32), "distances": np.zeros((b - a, 0), np.float32)}
            workdir.write_npz(folder / chunk_name(a, b), empty)
    if stop.is_set():
        return False
    workdir.write_json(folder / workdir.SUCCESS, {"rows": n, "k": k, "chunks": len(done_chunks(folder))})
    return True


def load_split(folder: Path, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole table of a completed split."""
    idx = np.zeros((n, k), np.int32)
    dist = np.zeros((n, k), np.float32)
    for a, b in done_chunks(folder):
        chunk = workdir.read_npz(folder / chunk_name(a, b))
        idx[a:b] = chunk["indices"]
        dist[a:b] = chunk["distances"]
    return idx, dist
