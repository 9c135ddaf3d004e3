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

from building_image_triplet_model.io import durable, faults, workdir

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


def neighbours(
    dist: np.ndarray, idx: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From a tree's q nearest (chord distances, indices) of ``rows``: the k nearest other rows
    as (indices int32, metres float32), ordered by distance, then by index; and which rows are unsure.

    A row is unsure when the tree may have left out candidates at its k-th distance: the farthest one it
    returned is as near as the k-th (ties straddle the cut), or the row itself was not returned (more than
    q targets share its coordinates). The caller asks the tree for more candidates for those rows.
    """
    own = idx == rows[:, None]
    # The row itself sorts last (infinite distance) and falls off the cut.
    key = np.where(own, np.inf, dist)
    order = np.lexsort((idx, key), axis=-1)
    idx_sorted = np.take_along_axis(idx, order, axis=1)[:, :k]
    dist_sorted = np.take_along_axis(key, order, axis=1)[:, :k]
    kth = dist_sorted[:, -1] if k else np.zeros(len(rows))
    unsure = ~own.any(axis=1) | (key.max(axis=1, where=~own, initial=-1.0) <= kth)
    return idx_sorted.astype(np.int32), chord_to_metres(dist_sorted).astype(np.float32), unsure


def query(
    tree: object, xyz: np.ndarray, a: int, b: int, k: int, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other targets of rows [a, b), exactly, ties at the k-th distance broken by index."""
    n = len(xyz)
    q = min(k + 2, n)
    rows = np.arange(a, b)
    dist, idx = tree.query(xyz[a:b], k=q, workers=threads)  # type: ignore[attr-defined]
    out_idx, out_m, unsure = neighbours(dist.reshape(b - a, -1), idx.reshape(b - a, -1), rows, k)
    while unsure.any() and q < n:
        q = min(2 * q, n)
        again = np.flatnonzero(unsure)
        d2, i2 = tree.query(xyz[rows[again]], k=q, workers=threads)  # type: ignore[attr-defined]
        ri, rm, still = neighbours(d2.reshape(len(again), -1), i2.reshape(len(again), -1), rows[again], k)
        out_idx[again], out_m[again], unsure[again] = ri, rm, still
    return out_idx, out_m


MADE_FOR = "made_for"  # in a chunk: [KNN key, split]; and "rows": [start, stop)


def made_for(folder: Path) -> tuple[str, str]:
    """The KNN key and split a folder's chunks must be made for: the run names the folder by them
    (workdir.Layout.knn_split), and every chunk and marker in it must say the same."""
    return folder.parent.name, folder.name


def check_chunk(folder: Path, a: int, b: int, n: int) -> None:
    """A chunk file is for this folder's key and split and holds rows [a, b) of n: CorruptFileError if not
    (a chunk of an earlier release, without keys, included: KNN is minutes, so it is computed again)."""
    path = folder / workdir.range_name(a, b)
    chunk = durable.read_npz(path, (), optional=(MADE_FOR, "rows"))
    if MADE_FOR not in chunk or "rows" not in chunk:
        raise durable.CorruptFileError(path, "carries no keys (written by an earlier release)")
    found = tuple(v.decode(errors="replace") for v in chunk[MADE_FOR].tolist())
    rows = tuple(int(v) for v in chunk["rows"].tolist())
    if found != made_for(folder) or rows != (a, b) or not 0 <= a < b <= n:
        raise durable.CorruptFileError(
            path,
            f"made for KNN key, split {found} and rows {rows}, not {made_for(folder)} and rows ({a}, {b}) "
            f"of {n}",
        )


def check_marker(folder: Path, n: int, k: int) -> dict | None:
    """The split's marker when it is for this key, split, row count and k, and names as many chunks as the
    folder holds; CorruptFileError when it does not."""
    marker = workdir.committed(folder)
    if marker is None:
        return None
    key, split = made_for(folder)
    claims = {x: marker.get(x) for x in ("key", "split", "rows", "k", "chunks")}
    expected = {"key": key, "split": split, "rows": n, "k": k, "chunks": len(workdir.ranges_done(folder))}
    if claims != expected:
        raise durable.CorruptFileError(folder / workdir.SUCCESS, f"claims {claims}, expected {expected}")
    return marker


def missing_ranges(done: list[tuple[int, int]], n: int, chunk_rows: int) -> list[tuple[int, int]]:
    """The chunks still to compute: every gap between the done ones, cut to at most chunk_rows rows."""
    out, at = [], 0
    for a, b in [*done, (n, n)]:
        while at < a:
            out.append((at, min(at + chunk_rows, a)))
            at = out[-1][1]
        at = max(at, b)
    return out


def run_split(
    folder: Path,
    lat: np.ndarray,
    lon: np.ndarray,
    k: int,
    stop: threading.Event,
    threads: int,
    chunk_rows: int,
    on_rows: Callable[[int], None] | None = None,
    on_bad: Callable[[Path, str], object] | None = None,
) -> bool:
    """Compute every missing chunk of one split; True when the split is complete.

    A chunk made for another key, split or rows, one that overlaps another, and a marker that disagrees
    with the chunks are handed to ``on_bad`` (the run moves them aside) and computed again."""
    from scipy.spatial import cKDTree

    n = len(lat)
    done: list[tuple[int, int]] = []
    for a, b in workdir.ranges_done(folder):
        try:
            if done and a < done[-1][1]:
                raise durable.CorruptFileError(folder / workdir.range_name(a, b), "overlaps another chunk")
            check_chunk(folder, a, b, n)
            done.append((a, b))
        except durable.CorruptFileError as exc:
            if on_bad is None:
                raise
            on_bad(exc.path, exc.reason)
    try:
        if check_marker(folder, n, k) and sum(b - a for a, b in done) == n:
            return True
    except durable.CorruptFileError as exc:
        if on_bad is None:
            raise
        on_bad(exc.path, exc.reason)
    todo = missing_ranges(done, n, chunk_rows)
    xyz = unit_vectors(lat, lon) if todo and k > 0 else None
    tree = cKDTree(xyz) if xyz is not None else None
    key, split = made_for(folder)
    for a, b in todo:
        if stop.is_set():
            return False
        if tree is None:
            chunk = {"indices": np.zeros((b - a, 0), np.int32), "distances": np.zeros((b - a, 0), np.float32)}
        else:
            idx_k, metres = query(tree, xyz, a, b, k, max(1, threads))
            chunk = {"indices": idx_k, "distances": metres}
        chunk[MADE_FOR] = np.array([key.encode(), split.encode()], dtype="S")
        chunk["rows"] = np.array([a, b], np.int64)
        durable.write_npz(folder / workdir.range_name(a, b), chunk)
        faults.point("knn.chunk")
        if on_rows:
            on_rows(b - a)
    if stop.is_set():
        return False
    marker = {"key": key, "split": split, "rows": n, "k": k, "chunks": len(workdir.ranges_done(folder))}
    workdir.commit(folder / workdir.SUCCESS, marker)
    return True


def load_split(folder: Path, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole table of a completed split: its marker, and every chunk, made for this folder's key and
    split and its own rows, tiling 0..n (anything else is a CorruptFileError naming the file)."""
    idx = np.zeros((n, k), np.int32)
    dist = np.zeros((n, k), np.float32)
    chunks = workdir.ranges_done(folder)
    starts = [0] + [b for _, b in chunks[:-1]]
    if sum(b - a for a, b in chunks) != n or [a for a, _ in chunks] != starts[: len(chunks)]:
        raise durable.CorruptFileError(folder / workdir.SUCCESS, f"its chunks do not cover rows 0..{n}")
    check_marker(folder, n, k)
    for a, b in chunks:
        check_chunk(folder, a, b, n)
        chunk = durable.read_npz(folder / workdir.range_name(a, b), ("indices", "distances"))
        if chunk["indices"].shape != (b - a, k):
            raise durable.CorruptFileError(
                folder / workdir.range_name(a, b), f"shape {chunk['indices'].shape}, expected {(b - a, k)}"
            )
        idx[a:b] = chunk["indices"]
        dist[a:b] = chunk["distances"]
    return idx, dist
