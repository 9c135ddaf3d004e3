"""Benchmark 4: geographic KNN (k=50) seconds and peak memory for 100,000 and 1,000,000 targets."""

from __future__ import annotations

from common import run_python, write_result

CHILD = r"""
import json, resource, shutil, tempfile, threading, time
from pathlib import Path
import numpy as np
from building_image_triplet_model import geo_knn, index
import sklearn.neighbors  # imported before the baseline: the library's own footprint is not the method's
rng = np.random.default_rng(0)
n = {n}
# A city-sized cloud with ~5% of targets sharing coordinates, as facade points do.
lat = 40.70 + rng.uniform(0, 0.12, n); lon = -74.02 + rng.uniform(0, 0.10, n)
dup = rng.choice(n, n // 20, replace=False); lat[dup] = lat[dup[::-1]]; lon[dup] = lon[dup[::-1]]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
folder = Path(tempfile.mkdtemp()) / "knn"
t0 = time.perf_counter()
assert geo_knn.run_split(folder, lat, lon, 50, threading.Event(), index.cpu_count())
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(p.stat().st_size for p in folder.iterdir())
shutil.rmtree(folder.parent)
print(json.dumps({{"seconds": dt, "peak_rss_mb": peak / 1024, "added_rss_mb": (peak - base) / 1024,
                  "output_mb": size / 2**20}}))
"""


def main() -> None:
    figures = {}
    for n in (100_000, 1_000_000):
        res = run_python(CHILD.format(n=n))
        figures[f"{n}_targets_seconds"] = round(res["seconds"], 2)
        figures[f"{n}_targets_added_rss_mb"] = round(res["added_rss_mb"], 1)
        figures[f"{n}_targets_bytes_per_target"] = round(res["added_rss_mb"] * 2**20 / n, 1)
    grown = figures["1000000_targets_added_rss_mb"] - figures["100000_targets_added_rss_mb"]
    figures["marginal_bytes_per_target_100k_to_1m"] = round(grown * 2**20 / 900_000, 1)
    figures["target_1m_seconds"] = 30
    write_result(
        "knn", figures, notes="k=50, KD-tree on unit vectors, chunks of 100,000 rows written as they finish"
    )


if __name__ == "__main__":
    main()
