"""Step 5: assemble the final HDF5 artifact from the index, the plan, the KNN tables and the stores.

HDF5 is never left open for writing across a long step (a kill while open can leave it unreadable, see
docs/architecture.md). Instead:

1. the *skeleton* ``<out>.h5.partial`` is written in one go and closed: every small array, the
   attributes, and ``backbone_embeddings`` allocated contiguous with early allocation and no fill;
2. the embeddings are copied into that dataset's byte range with ``pwrite``, never through HDF5, so
   HDF5's own structures are never touched again; ``assemble.json`` records the chunks made durable
   (fsync first, then the marker) and a rerun continues from there;
3. the file is reopened read-only and checked against the stores, then renamed to ``<out>.h5`` (the commit).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from building_image_triplet_model import __version__
from building_image_triplet_model.engine import geo_knn
from building_image_triplet_model.engine.embed.store import EmbeddingStore
from building_image_triplet_model.engine.plan import SPLITS, split_targets
from building_image_triplet_model.inputs import records
from building_image_triplet_model.io import faults

log = logging.getLogger(__name__)

SYNC_BYTES = 256 << 20
MISSING = -2  # a code no store gives: the row has no embedding yet


@dataclass
class Part:
    """One archive's share of the artifact: its rows (sorted index rows) and where they start."""

    name: str
    store: EmbeddingStore
    rows: np.ndarray
    start: int

    def place(self, chunk_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(which entries of a chunk the artifact holds, their artifact rows)."""
        pos = np.searchsorted(self.rows, chunk_rows)
        hit = pos < len(self.rows)
        hit[hit] = self.rows[pos[hit]] == chunk_rows[hit]
        return np.flatnonzero(hit), self.start + pos[hit]


def gather_codes(parts: list[Part], n: int) -> np.ndarray:
    """Every artifact row's decode result (0 = ok), from the stores' small arrays only."""
    codes = np.full(n, MISSING, np.int8)
    for part in parts:
        for path in part.store.chunks():
            chunk = part.store.read_codes(path)
            sel, dest = part.place(chunk["rows"])
            codes[dest] = chunk["codes"][sel]
    missing = np.flatnonzero(codes == MISSING)
    if len(missing):
        raise RuntimeError(f"{len(missing)} rows of the artifact have no embedding (first: row {missing[0]})")
    return codes


def _versions() -> dict[str, str]:
    return {
        "building_image_triplet_model": __version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "hdf5": h5py.version.hdf5_version,
    }


def write_skeleton(
    path: Path,
    cache: Any,
    plan: dict[str, np.ndarray],
    knn: dict[str, tuple[Path, int]],
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
            meta.create_dataset("TargetID_raw" if name == "TargetID" else name, data=cache[name][rows])
        meta.create_dataset("backbone_completed_mask", data=np.ones(n, bool))
        for split in SPLITS:
            pos = split_targets(plan, split)
            split_keys = plan["target_keys"][pos]
            f.create_dataset(f"splits/{split}", data=split_keys)
            meta.create_dataset(f"target_id_order_{split}", data=split_keys)
            folder, k = knn[split]
            idx, dist = geo_knn.load_split(folder, len(pos), k)
            meta.create_dataset(f"knn_indices_geo_{split}", data=idx)
            meta.create_dataset(f"knn_distances_geo_{split}", data=dist)
            meta[f"knn_distances_geo_{split}"].attrs["unit"] = "metres (great-circle, mean Earth radius)"
        images = f.create_group("images")
        images.create_dataset("valid_indices", data=np.flatnonzero(codes == 0).astype(np.int64))
        images.create_dataset("reject_reason", data=codes.astype(np.int8))
        images["reject_reason"].attrs["reasons"] = json.dumps(list(records.REJECT_REASONS))
        images.create_dataset("source", data=cache["source_idx"][rows].astype(np.int32))
        for col in ("stem", "path", "offset", "size", "checksum"):
            images.create_dataset(col, data=cache[col][rows])
        f.create_dataset("sources/name", data=cache["source_names"])
        targets = f.create_group("targets")
        for col in ("key", "lat", "lon", "split"):
            targets.create_dataset(col, data=plan[f"target_{col}" if col != "key" else "target_keys"])
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


def skeleton_matches(path: Path, progress: dict[str, Any]) -> bool:
    """The half-assembled file is the skeleton its progress record was made for: it opens, and its
    backbone_embeddings has the recorded rows at the recorded offset (a power loss can leave a file the
    marker outlived, empty or zeroed)."""
    try:
        with h5py.File(path, "r") as f:
            ds = f["backbone_embeddings"]
            return ds.shape[0] == int(progress["rows"]) and ds.id.get_offset() == int(progress["offset"])
    except (OSError, KeyError, ValueError):
        return False


def copy_embeddings(
    path: Path,
    offset: int,
    dim: int,
    dtype: str,
    parts: list[Part],
    save: Callable[[dict[str, Any]], None],
    progress: dict[str, Any],
    stop: threading.Event,
    on_rows: Callable[[int], None] | None = None,
) -> bool:
    """pwrite every chunk into the data range, archive after archive; durable progress through ``save``
    (``progress["next"]``: the first (part, chunk) not yet durable). True when complete."""
    row_bytes = dim * np.dtype(dtype).itemsize
    out_dtype = np.dtype(dtype).newbyteorder("<")
    start = tuple(progress.get("next", (0, 0)))
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    unsynced = 0
    last_sync = time.monotonic()

    def sync(at: tuple[int, int]) -> None:
        nonlocal unsynced, last_sync
        os.fdatasync(fd)
        progress["next"] = list(at)
        save(progress)
        unsynced, last_sync = 0, time.monotonic()
        faults.point("assemble.sync")

    try:
        for p, part in enumerate(parts):
            chunks = part.store.chunks()
            for c, chunk_path in enumerate(chunks):
                if (p, c) < start:
                    continue
                if stop.is_set():
                    sync((p, c))
                    return False
                chunk = part.store.read(chunk_path, dim)
                sel, dest = part.place(chunk["rows"])
                emb = np.ascontiguousarray(chunk["emb"][sel], dtype=out_dtype)
                # Consecutive artifact rows go out in one write.
                breaks = np.flatnonzero(np.diff(dest) != 1) + 1
                for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(dest)], strict=True):
                    if hi > lo:
                        data = emb[lo:hi].tobytes()
                        if os.pwrite(fd, data, offset + int(dest[lo]) * row_bytes) != len(data):
                            raise OSError(f"{path}: short write at row {int(dest[lo])}")
                        unsynced += len(data)
                if on_rows:
                    on_rows(len(sel))
                if unsynced >= SYNC_BYTES or time.monotonic() - last_sync > 5:
                    sync((p, c + 1))
            sync((p + 1, 0))  # at every archive boundary too
    finally:
        os.close(fd)
    return True


def verify(path: Path, parts: list[Part], n: int, dim: int) -> None:
    """Open the artifact as the trainer will and compare the first and last row of every chunk."""
    with h5py.File(path, "r") as f:
        ds = f["backbone_embeddings"]
        if ds.shape != (n, dim):
            raise RuntimeError(f"{path}: backbone_embeddings has shape {ds.shape}, expected {(n, dim)}")
        for part in parts:
            for chunk_path in part.store.chunks():
                chunk = part.store.read(chunk_path, dim)
                sel, dest = part.place(chunk["rows"])
                for i in {0, len(sel) - 1} if len(sel) else ():
                    if not np.array_equal(ds[int(dest[i])], chunk["emb"][sel[i]].astype(ds.dtype)):
                        raise RuntimeError(f"{path}: row {int(dest[i])} differs from {chunk_path}")
