"""Memory and disk space: what a run needs, against what the machine has (ConfigError, exit 2, naming the
setting to change). Called by the preflight and again before the artifact is written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.errors import ConfigError

# A generous per-image size of what a run writes besides the embeddings: index row (~200 B), merged cache,
# artifact metadata and locators (~250 B).
META_BYTES_PER_IMAGE = 600
# Without an index yet, how many images an archive of a given size holds: a 640x640 street-view JPEG and its
# metadata take ~30-60 kB in the real archives; 20 kB errs on the side of more images (more space).
ARCHIVE_BYTES_PER_IMAGE = 20_000


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: DataConfig, size: int, workers: int) -> None:
    """The decode buffers a batch size needs fit in half the machine's memory: each worker holds
    prefetch_factor batches of uint8 pixels, and the model's batch is float32 (4 bytes per value)."""
    batch = cfg.batch_size * 3 * size * size
    need = batch * (cfg.prefetch_factor * max(1, workers) + 1 + 4)
    have = memory_bytes()
    if need > have // 2:
        raise ConfigError(
            f"data.batch_size: {cfg.batch_size} images of {size} px need about {need / 2**30:.1f} GiB of "
            f"decode buffers ({cfg.prefetch_factor} batches ahead in each of {max(1, workers)} workers, "
            f"and the model's batch); this machine has {have / 2**30:.1f} GiB: lower batch_size, "
            "prefetch_factor or num_workers"
        )


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def dtype_bytes(embedding_dtype: str) -> int:
    return 2 if embedding_dtype == "float16" else 4


def artifact_bytes(images: int, dim: int, dtype_bytes: int) -> int:
    """The artifact's size: the embeddings plus the metadata and locators."""
    return images * (dim * dtype_bytes + META_BYTES_PER_IMAGE)


def estimate_bytes(images: int, dim: int, dtype_bytes: int) -> int:
    """What a run over ``images`` images writes: the artifact, and the embeddings once more in the stores."""
    return artifact_bytes(images, dim, dtype_bytes) + images * dim * dtype_bytes


def _bytes_under(*paths: Path) -> int:
    total = 0
    for root in paths:
        if root.is_file():
            total += root.stat().st_size
        elif root.is_dir():
            total += sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return total


def bytes_still_needed(
    cfg: DataConfig, layout: Any, dim: int, archive_sizes: list[int] | None = None, expected: int = 0
) -> int:
    """An estimate of what the run writes (from the archives' sizes), less what is already there."""
    return _still_needed(cfg, layout, dim, archive_sizes, expected)[0]


def _still_needed(
    cfg: DataConfig, layout: Any, dim: int, archive_sizes: list[int] | None, expected: int
) -> tuple[int, int, int]:
    """(bytes still to write, images, archive bytes) of bytes_still_needed."""
    from building_image_triplet_model.inputs.sources import list_sources

    if archive_sizes is None:
        archive_sizes = [s.path.stat().st_size for s in list_sources(cfg.input_dir) if s.kind == "tar"]
    archive_bytes = sum(archive_sizes)
    if archive_sizes and expected > len(archive_sizes):
        archive_bytes = archive_bytes * expected // len(archive_sizes)
    images = archive_bytes // ARCHIVE_BYTES_PER_IMAGE
    need = estimate_bytes(images, dim, dtype_bytes(cfg.embedding_dtype))
    return need - _bytes_under(layout.work, layout.output), images, archive_bytes


def check_disk_space_for(
    cfg: DataConfig, layout: Any, dim: int, archive_sizes: list[int] | None = None, expected: int = 0
) -> None:
    """Free space where the run writes against an estimate of what it writes, less what is already there.
    The image count comes from the archives' sizes (the index does not exist yet): those in input_dir, or
    ``archive_sizes``; where ``expected`` archives are due and fewer are here (follow mode: a download is
    running), their average stands for the rest."""
    need, images, archive_bytes = _still_needed(cfg, layout, dim, archive_sizes, expected)
    free = min(free_bytes(layout.output.parent), free_bytes(layout.work))
    if need > free:
        raise ConfigError(
            f"{layout.output.parent}: {free / 1e9:.3f} GB free, the run writes about {need / 1e9:.3f} GB "
            f"more (~{images} images x {dim} features, estimated from {archive_bytes / 1e9:.3f} GB of "
            "archives); free space, or point data.hdf5_path / data.work_dir elsewhere"
        )


def check_artifact_space(path: Path, partial: Path, images: int, dim: int, embedding_dtype: str) -> None:
    """Before the artifact is written (any mode, the merge included): its size is known exactly now."""
    need = artifact_bytes(images, dim, dtype_bytes(embedding_dtype))
    if partial.exists():
        need -= partial.stat().st_size
    free = free_bytes(path.parent)
    if need > free:
        raise ConfigError(
            f"{path.parent}: {free / 1e9:.3f} GB free, the artifact needs about {need / 1e9:.3f} GB more "
            f"({images} images x {dim} features); free space and run again (nothing done is lost)"
        )
