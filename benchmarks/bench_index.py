"""Benchmark 1: index images/s from archives read in place and from an extracted folder; memory per image."""

from __future__ import annotations

from common import bench_archives, extracted, run_python, write_result

CHILD = r"""
import json, resource, threading, time, shutil, tempfile
from pathlib import Path
from building_image_triplet_model import index, sources
srcs = sources.list_sources({folder!r})
import os, tracemalloc
def evict(path):
    # Drop the files' pages from the page cache (no root needed): the next pass reads from the disk.
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
evict(srcs[0].path)
t0 = time.perf_counter()
arrays, rejects = index.build_source_index(srcs[0])
cold = time.perf_counter() - t0
t0 = time.perf_counter()
arrays, rejects = index.build_source_index(srcs[0])
one = time.perf_counter() - t0
tracemalloc.start()
arrays, rejects = index.build_source_index(srcs[0])
peak_one = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
work = Path(tempfile.mkdtemp())
t0 = time.perf_counter()
markers = index.index_all(srcs, work, index.cpu_count(), threading.Event())
allt = time.perf_counter() - t0
names = [s.name for s in srcs]
index.merge_cache(work, names, markers)
cache = index.load_cache(work)
n = sum(m["images"] for m in markers.values())
cache_bytes = sum(cache[k].nbytes for k in cache if not k.startswith("rej_"))
shutil.rmtree(work)
print(json.dumps({{"images": n, "one_process_images_per_s": len(arrays["stem"]) / one,
    "cold_one_process_images_per_s": len(arrays["stem"]) / cold,
    "all_cores_images_per_s": n / allt, "cores": index.cpu_count(),
    "index_bytes_per_image": cache_bytes / n,
    "walk_peak_bytes_per_image": peak_one / max(1, len(arrays["stem"]))}}))
"""


def main() -> None:
    archives = bench_archives()
    tar = run_python(CHILD.format(folder=str(archives)))
    folder = run_python(CHILD.format(folder=str(extracted(archives))))
    write_result(
        "index",
        {
            "images": tar["images"],
            "tar_images_per_s_one_process": round(tar["one_process_images_per_s"]),
            "tar_images_per_s_one_process_cold_cache": round(tar["cold_one_process_images_per_s"]),
            "tar_images_per_s_all_cores_incl_process_start": round(tar["all_cores_images_per_s"]),
            "folder_images_per_s_one_process": round(folder["one_process_images_per_s"]),
            "folder_images_per_s_one_process_cold_cache": round(folder["cold_one_process_images_per_s"]),
            "folder_images_per_s_all_cores_incl_process_start": round(folder["all_cores_images_per_s"]),
            "index_bytes_per_image_in_memory": round(tar["index_bytes_per_image"], 1),
            "walk_peak_bytes_per_image_one_archive": round(tar["walk_peak_bytes_per_image"]),
            "target_images_per_s": 20000,
            "target_bytes_per_image": 200,
        },
        notes="metadata only: image bytes are located, not read. Warm: the archive in the page cache; "
        "cold: evicted first (posix_fadvise), so read from this machine's disk. The all-cores figure "
        "includes starting the worker processes (~1 s), large beside 23k images, small beside an archive",
    )


if __name__ == "__main__":
    main()
