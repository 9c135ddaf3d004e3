"""The L4's embedding rate the cost model uses by default: measured when the GPU benchmark has run on an L4,
else an estimate, and always labelled which.

The measurement is ``benchmarks/results/gpu.json``, written by ``benchmarks/gpu.py`` on the run's L4 and
copied here by ``gcp/provision.sh smoke-benchmark`` (or ``make bench-record`` after ``make bench`` on a
GPU). Its figure ``pipeline_images_per_s`` is the real pipeline (archives read in place, decode workers,
model, chunk writer) with ``configs/vm.yaml``'s production settings, so it is what a run gets.

The estimate (no L4 measurement yet): eager bf16 autocast keeps LayerNorm and the residual stream in fp32,
so the L4's 300 GB/s bounds DINOv2 ViT-B/14 at 518 px to about 120-150 img/s (from its bandwidth and timm's
published mixed-precision figures for this model at 518 px: ~182 img/s on an RTX 3090, ~350 on a 4090). The
middle of that range is the default. Standard library only: the cost model imports nothing heavy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ESTIMATED_IMAGES_PER_S", "GPU_RESULTS", "Rate", "l4_rate"]

ESTIMATED_IMAGES_PER_S = 135.0
GPU_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu.json"
FIGURE = "pipeline_images_per_s"


@dataclass(frozen=True)
class Rate:
    images_per_s: float
    kind: str  # "measured" or "estimated"
    detail: str

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.detail}"


def _estimate(why: str) -> Rate:
    return Rate(
        ESTIMATED_IMAGES_PER_S,
        "estimated",
        "eager bf16 autocast on an L4 from its bandwidth and timm's 3090/4090 figures (120-150 img/s); "
        + why,
    )


def l4_rate(path: Path = GPU_RESULTS) -> Rate:
    """The measured production rate from ``path`` when it holds an L4 run of the GPU benchmark, else the
    estimate (saying why)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _estimate(f"no L4 measurement yet ({path.name} is not in benchmarks/results/)")
    except (OSError, ValueError) as exc:
        return _estimate(f"{path} cannot be read: {exc}")
    settings = doc.get("settings") or {}
    device = str(settings.get("device", ""))
    figure = (doc.get("figures") or {}).get(FIGURE) or {}
    rate = figure.get("median") if isinstance(figure, dict) else None
    if settings.get("small") or "L4" not in device or not isinstance(rate, int | float) or rate <= 0:
        return _estimate(f"{path.name} holds no production run on an L4 (device {device or 'unknown'})")
    when = str(doc.get("measured", "")) or "undated"
    return Rate(float(rate), "measured", f"{FIGURE} on {device}, {when} ({path.name})")
