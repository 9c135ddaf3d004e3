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
    core decodes. On the CPU the model is the bottleneck and runs on every core; one worker per core keeps
    its queue full while the model holds the cores (on 2 cores 1 worker lost ~13 % against 2 or 4)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    cores = cpu_count()
    if device_type == "cuda":
        return max(1, cores - 2)
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
