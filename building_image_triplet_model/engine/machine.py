"""What this machine has, and the defaults that follow from it (decode workers, model threads, index
processes). One place, so that a config that leaves them unset fits a 2-core laptop and a 16-vCPU VM alike."""

from __future__ import annotations

import os

from building_image_triplet_model.config import DataConfig


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Decode workers with a GPU. One worker reads, verifies, decodes and resizes a 640 px JPEG to 518 px at
# ~147 img/s on one core (benchmarks/results/datapath.json, 518px_full_read_decode: ~6.8 ms an image; 224 px
# with draft mode ~480). An L4 embeds DINOv2 at 518 px at 120-150 img/s eager, ~220 at best compiled: 1-1.5
# cores' worth. Four workers feed ~590 img/s, 2.5x the L4's best, and leave the other cores of a
# g2-standard-16 to what overlaps the embedding: aria2c's download, the index processes hashing every image,
# the chunk writer. 14 workers (every core but two) only took those cores for nothing. A faster GPU: set
# num_workers.
GPU_DECODE_WORKERS = 4


def decode_workers(cfg: DataConfig, device_type: str) -> int:
    """DataLoader workers. On a GPU: enough to feed it (GPU_DECODE_WORKERS), never more than the cores less
    the model's and the writer's. On the CPU the model is the bottleneck and runs on every core; one worker
    per core keeps its queue full while the model holds the cores (on 2 cores 1 worker lost ~13 % against 2
    or 4)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    cores = cpu_count()
    if device_type == "cuda":
        return max(1, min(GPU_DECODE_WORKERS, cores - 2))
    return cores


def model_threads(cfg: DataConfig, device_type: str) -> int:
    """torch's intra-op threads for a model on the CPU: every core. The decode workers are other processes
    that spend most of their time waiting for the model: on 2 cores, 2 workers and 2 threads embedded at
    ~31 img/s where 1 worker and 1 thread gave ~18 (benchmarks/bench_pipeline.py)."""
    if cfg.cpu_threads:
        return cfg.cpu_threads
    if device_type == "cuda":
        return 1  # the model runs on the GPU; a CPU thread only launches kernels
    return cpu_count()


def index_workers(cfg: DataConfig) -> int:
    return cfg.index_workers or cpu_count()
