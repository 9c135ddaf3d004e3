"""Step 5: assemble the final HDF5 artifact from the completed shards.

HDF5 is never left open for writing across a long step (a kill while open can leave it unreadable, see
hdf5-contract.md). Instead:

1. the *skeleton* ``<out>.h5.partial`` is written in one go and closed: every small array, the
   attributes, and ``backbone_embeddings`` allocated contiguous with early allocation and no fill;
2. the embeddings are copied into that dataset's byte range with ``pwrite``, never through HDF5, so
   HDF5's own structures are never touched again; ``assemble.json`` records the rows made durable
   (fsync first, then the marker) and a rerun continues from there;
3. the file is verified, renamed to ``<out>.h5`` (the commit), and the stats file is written last.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__, faults, geo_knn, records, workdir
from .embed import chunk_name, done_chunks
from .plan import SPLITS, split_targets

log = logging.getLogger(__name__)

MARKER = "assemble.json"
SYNC_BYTES = 256 << 20


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _versions() -> dict[str, str]:
    out = {"building_image_triplet_model": __version__, "h5py": h5py.__version__, "numpy": np.__version__}
    out["hdf5"] = h5py.version.hdf5_version
    return out


def write_skeleton(
    path: Path,
    cache: dict[str, np.ndarray],
    plan: dict[str, np.ndarray],
    knn_dirs: dict[str, Path],
    codes: np.ndarray,
    dim: int,
    dtype: str,
    attrs: dict[str, Any],
) -> int:
    """Write everything but the embedding values; returns the byte offset of backbone_embeddings."""
    rows = plan["rows"]
    n = len(rows)
    with h5py.File(path, "w", libver=("earliest", "v110")) as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        emb = f.create_dataset(
            "backbone_embeddings", shape=(n, dim), dtype=np.dtype(dtype).newbyteorder("<"), dcpl=dcpl
        )
        offset = emb.id.get_offset()
        if offset is None:
            raise RuntimeError(f"{path}: backbone_embeddings has no contiguous storage")
        keys = records.target_key(cache["DatasetID"][rows], cache["TargetID"][rows])
        meta = f.create_group("metadata")
        meta.create_dataset("TargetID", data=keys.astype(np.int64))
        meta["TargetID"].attrs["formula"] = records.TARGET_KEY_FORMULA
        for name in records.D_FIELDS:
            out_name = "TargetID_raw" if name == "TargetID" else name
            meta.create_dataset(out_name, data=cache[name][rows])
        meta.create_dataset("backbone_completed_mask", data=np.ones(n, bool))
        for split in SPLITS:
            pos = split_targets(plan, split)
            split_keys = plan["target_keys"][pos]
            f.create_dataset(f"splits/{split}", data=split_keys)
            meta.create_dataset(f"target_id_order_{split}", data=split_keys)
            k = int(json.loads((knn_dirs[split] / workdir.SUCCESS).read_text())["k"])
            idx_ds = meta.create_dataset(f"knn_indices_geo_{split}", shape=(len(pos), k), dtype=np.int32)
            dist_ds = meta.create_dataset(f"knn_distances_geo_{split}", shape=(len(pos), k), dtype=np.float32)
            dist_ds.attrs["unit"] = "metres (great-circle, mean Earth radius)"
            if k:
                for a, b in geo_knn.done_chunks(knn_dirs[split]):
                    chunk = workdir.read_npz(knn_dirs[split] / geo_knn.chunk_name(a, b))
                    idx_ds[a:b] = chunk["indices"]
                    dist_ds[a:b] = chunk["distances"]
        images = f.create_group("images")
        images.create_dataset("valid_indices", data=np.flatnonzero(codes == 0).astype(np.int64))
        images.create_dataset("reject_reason", data=codes.astype(np.int8))
        images["reject_reason"].attrs["reasons"] = json.dumps(list(records.REJECT_REASONS))
        images.create_dataset("source", data=cache["source_idx"][rows].astype(np.int32))
        for col in ("stem", "path", "offset", "size"):
            images.create_dataset(col, data=cache[col][rows])
        f.create_dataset("sources/name", data=cache["source_names"])
        targets = f.create_group("targets")
        targets.create_dataset("key", data=plan["target_keys"])
        targets.create_dataset("lat", data=plan["target_lat"])
        targets.create_dataset("lon", data=plan["target_lon"])
        targets.create_dataset("split", data=plan["target_split"])
        targets["split"].attrs["values"] = json.dumps(list(SPLITS))
        targets.create_dataset("n_images", data=plan["target_images"])
        # A target whose every image failed to decode stays in its split and the KNN tables (it is a real
        # place); this column lets a trainer skip it as a negative.
        t_of_row = np.searchsorted(plan["target_keys"], keys)
        n_valid = np.bincount(t_of_row[codes == 0], minlength=len(plan["target_keys"])).astype(np.int32)
        targets.create_dataset("n_valid_images", data=n_valid)
        f.attrs["backbone_output_size"] = dim
        f.attrs["versions"] = json.dumps(_versions(), sort_keys=True)
        f.attrs["target_key_formula"] = records.TARGET_KEY_FORMULA
        for key, value in attrs.items():
            f.attrs[key] = (
                value if isinstance(value, int | float | str | bool) else json.dumps(value, sort_keys=True)
            )
    return int(offset)


def gather_codes(emb_root: Path, names: list[str], counts: list[int]) -> np.ndarray:
    """Every row's decode result (0 = ok), in artifact order."""
    parts = []
    for name, n in zip(names, counts, strict=True):
        codes = np.zeros(n, np.int8)
        for a, b in done_chunks(emb_root / name):
            codes[a:b] = workdir.read_npz(emb_root / name / chunk_name(a, b))["codes"]
        parts.append(codes)
    return np.concatenate(parts) if parts else np.zeros(0, np.int8)


def copy_embeddings(
    path: Path,
    offset: int,
    dim: int,
    dtype: str,
    emb_root: Path,
    names: list[str],
    starts: np.ndarray,
    marker_path: Path,
    marker: dict[str, Any],
    stop: threading.Event,
    on_rows: Callable[[int], None] | None = None,
) -> bool:
    """pwrite every chunk into the data range; durable progress in the marker. True when complete."""
    row_bytes = dim * np.dtype(dtype).itemsize
    done = int(marker.get("rows_done", 0))
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    unsynced = 0
    last_sync = time.monotonic()

    def sync(upto: int) -> None:
        nonlocal unsynced, last_sync
        os.fdatasync(fd)
        marker["rows_done"] = upto
        workdir.write_json(marker_path, marker)
        unsynced, last_sync = 0, time.monotonic()
        faults.point("assemble.sync")

    try:
        pos = done
        for s, name in enumerate(names):
            for a, b in done_chunks(emb_root / name):
                g0, g1 = int(starts[s]) + a, int(starts[s]) + b
                if g1 <= done:
                    continue
                if stop.is_set():
                    sync(pos)
                    return False
                emb = workdir.read_npz(emb_root / name / chunk_name(a, b))["emb"]
                data = np.ascontiguousarray(emb, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
                written = os.pwrite(fd, data, offset + g0 * row_bytes)
                if written != len(data):
                    raise OSError(f"{path}: short write at row {g0}")
                pos = g1
                unsynced += len(data)
                if on_rows:
                    on_rows(g1 - max(g0, done))
                if unsynced >= SYNC_BYTES or time.monotonic() - last_sync > 5:
                    sync(pos)
            if unsynced:
                sync(pos)  # at every source boundary too
        sync(pos)
    finally:
        os.close(fd)
    return True


def verify(path: Path, emb_root: Path, names: list[str], starts: np.ndarray, n: int, dim: int) -> None:
    """Open the artifact as the trainer will and compare the first and last row of every chunk."""
    with h5py.File(path, "r") as f:
        ds = f["backbone_embeddings"]
        if ds.shape != (n, dim):
            raise RuntimeError(f"{path}: backbone_embeddings has shape {ds.shape}, expected {(n, dim)}")
        for s, name in enumerate(names):
            for a, b in done_chunks(emb_root / name):
                emb = workdir.read_npz(emb_root / name / chunk_name(a, b))["emb"]
                for r in {a, b - 1}:
                    if not np.array_equal(ds[int(starts[s]) + r], emb[r - a].astype(ds.dtype)):
                        raise RuntimeError(
                            f"{path}: row {int(starts[s]) + r} differs from {name}/{chunk_name(a, b)}"
                        )
