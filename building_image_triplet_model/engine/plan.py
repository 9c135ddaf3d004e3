"""Step 2: which images the artifact holds, in which order, and each target's split.

Pure functions of the index and the settings. Targets are chosen and split by a hash of their key (or of
their geographic cell) salted with the seed, never by shuffling the whole list: adding an archive never
moves an existing target to another split, and a subset (``n_samples``) keeps the same targets when the
input grows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.inputs import records

SPLITS = ("train", "val", "test")
_SALT_SELECT = 0x5E1EC7
_SALT_SPLIT = 0x5B117
EARTH_M_PER_DEG = 111_320.0


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit hash (SplitMix64's finaliser), vectorised, wrapping arithmetic."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash01(values: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Uniform in [0, 1) per value, deterministic for (seed, salt)."""
    mixed = splitmix64(
        splitmix64(values.astype(np.int64).view(np.uint64)) ^ splitmix64(np.uint64(seed * 1_000_003 + salt))
    )
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def cell_ids(lat: np.ndarray, lon: np.ndarray, cell_m: float) -> np.ndarray:
    """An id per ~cell_m x cell_m geographic cell (rows of constant latitude, columns scaled per row)."""
    dlat = cell_m / EARTH_M_PER_DEG
    row = np.floor((lat + 90.0) / dlat).astype(np.int64)
    centre = np.radians(np.clip(row * dlat - 90.0 + dlat / 2, -89.9, 89.9))
    dlon = dlat / np.cos(centre)
    col = np.floor((lon + 180.0) / dlon).astype(np.int64)
    return row * (1 << 32) + col


def assign_splits(keys: np.ndarray, lat: np.ndarray, lon: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """0 train, 1 val, 2 test for each target."""
    basis = keys if cfg.split_strategy == "target" else cell_ids(lat, lon, cfg.split_cell_m)
    u = hash01(basis, cfg.seed, _SALT_SPLIT)
    split = np.zeros(len(keys), np.int8)
    split[u < cfg.test_size + cfg.val_size] = 1
    split[u < cfg.test_size] = 2
    return split


def make_plan(index: dict[str, np.ndarray], cfg: DataConfig) -> dict[str, np.ndarray]:
    """The artifact's rows (indices into the index, in (source, stem) order) and its target table."""
    keys = records.target_key(index["DatasetID"], index["TargetID"])
    uniq, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    keep = np.ones(len(uniq), bool)
    if cfg.selects_subset:
        order = np.argsort(hash01(uniq, cfg.seed, _SALT_SELECT), kind="stable")
        if cfg.n_samples is not None:
            keep[:] = False
            keep[order[: cfg.n_samples]] = True
        if cfg.n_images is not None:
            ranked = order[keep[order]]
            within = np.cumsum(counts[ranked]) <= cfg.n_images
            keep[:] = False
            keep[ranked[within]] = True
    rows = np.flatnonzero(keep[inverse]).astype(np.int64)
    t_keys = uniq[keep]
    t_first = first[keep]
    t_lat = index["target_lat"][t_first].astype(np.float64)
    t_lon = index["target_lon"][t_first].astype(np.float64)
    source_idx = index["source_idx"][rows]
    n_sources = len(index["source_names"])
    src_start = np.searchsorted(source_idx, np.arange(n_sources + 1)).astype(np.int64)
    return {
        "rows": rows,
        "src_start": src_start,
        "target_keys": t_keys,
        "target_lat": t_lat,
        "target_lon": t_lon,
        "target_images": counts[keep].astype(np.int32),
        "target_split": assign_splits(t_keys, t_lat, t_lon, cfg),
    }


def split_targets(plan: dict[str, np.ndarray], split: str) -> np.ndarray:
    """Positions (into the target table) of a split's targets, sorted by key."""
    return np.flatnonzero(plan["target_split"] == SPLITS.index(split))


def source_counts(plan: dict[str, np.ndarray]) -> list[int]:
    """Rows of the artifact per source, in source order."""
    return np.diff(plan["src_start"]).astype(int).tolist()


def source_rows(plan: dict[str, np.ndarray], first_rows: np.ndarray, s: int) -> np.ndarray:
    """The index rows (of source s's own shard, sorted) that the artifact holds."""
    a, b = int(plan["src_start"][s]), int(plan["src_start"][s + 1])
    return plan["rows"][a:b] - int(first_rows[s])


def summary(plan: dict[str, np.ndarray], source_names: list[str]) -> dict[str, Any]:
    per_split = {s: int((plan["target_split"] == i).sum()) for i, s in enumerate(SPLITS)}
    return {
        "images": len(plan["rows"]),
        "targets": len(plan["target_keys"]),
        "targets_per_split": per_split,
        "source_rows": dict(zip(source_names, source_counts(plan), strict=True)),
    }


def knn_k(cfg_k: int, n_split: int) -> int:
    return max(0, min(cfg_k, n_split - 1))


def expected_fraction_error(n: int) -> float:
    """Three standard deviations of a hashed split fraction over n targets (for tests and reports)."""
    return 3 * math.sqrt(0.25 / max(n, 1))
