"""What this machine has, and the defaults that follow from it (decode workers, model threads, index
processes). One place, so that a config that leaves them unset fits a 2-core laptop and a 16-vCPU VM alike."""

from __future__ import annotations

import os

from .config import DataConfig


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_workers(cfg: DataConfig, device_type: str) -> int:
    """DataLoader workers. On a GPU the model needs one core and the chunk writer a little: every other
    core decodes. On the CPU the model is the bottleneck (resnet18 at 224 px: ~35 img/s per thread against
    ~200 img/s of decoding per core), so a quarter of the cores decode and the rest run the model."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    cores = cpu_count()
    if device_type == "cuda":
        return max(1, cores - 2)
    return max(1, cores // 4)


def model_threads(cfg: DataConfig, device_type: str) -> int:
    """torch's intra-op threads for a model on the CPU: the cores the decode workers leave."""
    if cfg.cpu_threads:
        return cfg.cpu_threads
    if device_type == "cuda":
        return 1  # the model runs on the GPU; a CPU thread only launches kernels
    return max(1, cpu_count() - decode_workers(cfg, device_type))


def index_workers(cfg: DataConfig) -> int:
    return cfg.index_workers or cpu_count()
