"""Benchmark: the geographic KNN's tree, scipy's cKDTree (what geo_knn uses) against scikit-learn's KDTree,
side by side at the same thread count, on 100,000 and 1,000,000 random targets in a city-sized box, k=50.

Both trees get the same unit vectors (geo_knn.unit_vectors) and are asked for k+2 neighbours, as geo_knn.query
asks (the target itself, k, and one more to see ties at the cut). At one thread:
``cKDTree.query(workers=1)`` vs ``KDTree.query``; at every core:
``cKDTree.query(workers=cores)`` vs ``NearestNeighbors(algorithm="kd_tree", n_jobs=cores).kneighbors`` (the
same tree, queried in parallel by joblib threads). Each library's default leaf size. Then the distances
are compared: chord lengths bit for bit, and the metres that geo_knn writes (float32) after its own
post-processing; indices can differ only between neighbours at exactly the same distance.

Finally the engine's own step, geo_knn.run_split (tree, chunked queries, chunk files written), at every core.
"""

from __future__ import annotations

import gc
import shutil
import threading
import time
from typing import Any

import numpy as np
from common import Bench, stat

from building_image_triplet_model.engine import geo_knn, machine

K = 50
Q = K + 2  # candidates per target, as geo_knn.query asks the tree (itself + k + one to see ties)


def targets(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A city-sized box (about 13 x 8.5 km), 5 % of the targets sharing their coordinates with another."""
    rng = np.random.default_rng(n)
    lat = 40.70 + rng.uniform(0, 0.12, n)
    lon = -74.02 + rng.uniform(0, 0.10, n)
    dup = rng.choice(n, n // 20, replace=False)
    lat[dup], lon[dup] = lat[dup[::-1]], lon[dup[::-1]]
    return lat, lon


def scipy_knn(xyz: np.ndarray, threads: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    from scipy.spatial import cKDTree

    t0 = time.perf_counter()
    tree = cKDTree(xyz)
    t1 = time.perf_counter()
    dist, idx = tree.query(xyz, k=Q, workers=threads)
    return t1 - t0, time.perf_counter() - t1, dist, idx


def sklearn_knn(xyz: np.ndarray, threads: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    from sklearn.neighbors import KDTree, NearestNeighbors

    if threads == 1:
        t0 = time.perf_counter()
        tree = KDTree(xyz)
        t1 = time.perf_counter()
        dist, idx = tree.query(xyz, k=Q)
        return t1 - t0, time.perf_counter() - t1, dist, idx
    t0 = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=Q, algorithm="kd_tree", n_jobs=threads).fit(xyz)
    t1 = time.perf_counter()
    dist, idx = nn.kneighbors(xyz)
    return t1 - t0, time.perf_counter() - t1, dist, idx


def compare(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    (da, ia), (db, ib) = a, b
    ma = geo_knn.chord_to_metres(da).astype(np.float32)  # what geo_knn stores
    mb = geo_knn.chord_to_metres(db).astype(np.float32)
    same_idx = ia == ib
    return {
        "chord_distances_identical": bool(np.array_equal(da, db)),
        "chord_max_abs_diff": float(np.max(np.abs(da - db))),
        "metres_identical": bool(np.array_equal(ma, mb)),
        "metres_max_abs_diff_m": float(np.max(np.abs(ma.astype(np.float64) - mb))),
        "index_agreement": round(float(same_idx.mean()), 6),
        # Where the indices differ, the neighbours must be tied (same distance, another order).
        "index_differences_all_ties": bool(np.array_equal(da[~same_idx], db[~same_idx])),
    }


def main() -> None:
    bench = Bench.from_args("knn", repeats=3)
    sizes = (10_000, 50_000) if bench.quick else (100_000, 1_000_000)
    cores = machine.cpu_count()
    thread_counts = sorted({1, cores})
    bench.settings = {
        "k": K,
        "sizes": list(sizes),
        "thread_counts": thread_counts,
        "box": "lat 40.70-40.82, lon -74.02 to -73.92 (about 13 x 8.5 km); 5% of targets share coordinates",
        "scipy_leafsize": 16,
        "sklearn_leaf_size": 40,
    }
    for n in sizes:
        lat, lon = targets(n)
        xyz = geo_knn.unit_vectors(lat, lon)
        for threads in thread_counts:
            times: dict[str, dict[str, list[float]]] = {
                lib: {"build": [], "query": []} for lib in ("scipy", "sklearn")
            }
            check: dict[str, Any] = {}
            for r in range(bench.repeats):
                res = {}
                for lib, fn in (("scipy", scipy_knn), ("sklearn", sklearn_knn)):
                    gc.collect()
                    build, query, dist, idx = fn(xyz, threads)
                    times[lib]["build"].append(build)
                    times[lib]["query"].append(query)
                    res[lib] = (dist, idx)
                if r == 0:
                    check = compare(res["scipy"], res["sklearn"])
                del res
                bench.log(
                    f"n={n} threads={threads} repeat {r + 1}: "
                    + ", ".join(
                        f"{lib} {sum(v['build'][-1:] + v['query'][-1:]):.2f}s" for lib, v in times.items()
                    )
                )
            key = f"{n}_targets_{threads}_threads"
            for lib, t in times.items():
                total = [b + q for b, q in zip(t["build"], t["query"], strict=True)]
                bench.figures[f"{key}_{lib}_seconds"] = stat(total, "s", 3)
                bench.figures[f"{key}_{lib}_build_seconds"] = stat(t["build"], "s", 3)
            bench.figures[f"{key}_distances"] = check
            s = bench.figures[f"{key}_scipy_seconds"]["median"]
            k = bench.figures[f"{key}_sklearn_seconds"]["median"]
            bench.summary.append(
                f"{n:,} targets, {threads} thread(s): cKDTree {s:.2f} s, sklearn KDTree {k:.2f} s "
                f"({k / s:.1f}x); chord distances identical: {check['chord_distances_identical']}, the "
                f"metres as geo_knn stores them identical: {check['metres_identical']} (max diff "
                f"{check['metres_max_abs_diff_m']:.2g} m)"
            )
        # The engine's step, as the pipeline runs it.
        step = []
        for _ in range(bench.repeats):
            folder = bench.scratch / f"split_{n}"
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            assert geo_knn.run_split(folder, lat, lon, K, threading.Event(), cores, 100_000)
            step.append(time.perf_counter() - t0)
            shutil.rmtree(folder, ignore_errors=True)
        bench.figures[f"{n}_targets_engine_run_split_seconds"] = stat(step, "s", 3)
    bench.notes += [
        "seconds = tree build + query of every target's k+2 nearest; the engine's run_split adds geo_knn's "
        "post-processing (self removal, tie order, metres) and writing the chunk files (100,000 rows each).",
        "scikit-learn's KDTree.query has no thread option: at one thread it is the comparison; at every core "
        "NearestNeighbors(n_jobs) queries the same kind of tree from joblib threads.",
    ]
    bench.write()


if __name__ == "__main__":
    main()
