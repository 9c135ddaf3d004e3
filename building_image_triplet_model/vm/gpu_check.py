"""The VM's preflight, after the driver and ``uv sync`` and before any long phase: the locked torch must
see the GPU and run a bf16 matmul on it, and then one real forward pass of the configured model, at the
configured image size, precision and batch size, must run on the device (a bf16 matmul alone does not catch a
missing cuDNN engine, a failing attention kernel, a batch that does not fit, or ``compile: true`` without
Python.h). The driver's and torch's CUDA versions go to the log; a failure is one message naming both,
recorded in ``state/preflight.json``, and stops the startup (the job is not started, and nothing retries it
in a loop: the next boot checks again).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .. import config as engine_config
from .. import durable, preflight
from ..errors import BackboneError, ConfigError
from ..exit_codes import Exit
from ..progress import utc_now
from . import gpu_stack
from .paths import VMPaths
from .phases import PREFLIGHT, Markers

log = logging.getLogger(__name__)


def nvidia_present(pci: Path = Path("/sys/bus/pci/devices")) -> bool:
    return any(
        (d / "vendor").is_file() and (d / "vendor").read_text().strip() == "0x10de" for d in pci.glob("*")
    )


def forward_pass(cfg: engine_config.DataConfig, resolved: preflight.Resolved) -> dict[str, Any]:
    """One forward pass of the model as the job loads it (backbone.load: size, precision, channels_last,
    compile), on a full batch of the configured size: what it ran, or BackboneError naming it."""
    import torch

    from .. import backbone

    bb = backbone.load(cfg, resolved)
    _, height, width = resolved.identity.input_size
    batch = cfg.batch_size
    what = (
        f"{cfg.feature_model}: one forward pass of {batch} images at {height}x{width} in "
        f"{resolved.precision} on {resolved.device}"
    )
    pixels = torch.randint(
        0, 256, (batch, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    start = time.monotonic()
    try:
        with torch.inference_mode():
            out = bb.embed(pixels)
            if bb.device.type == "cuda":
                torch.cuda.synchronize()
    except Exception as exc:
        raise BackboneError(f"{what} failed: {type(exc).__name__}: {str(exc)[:400]}") from None
    seconds = time.monotonic() - start
    if tuple(out.shape) != (batch, resolved.output_size):
        raise BackboneError(f"{what} gave shape {tuple(out.shape)}, not ({batch}, {resolved.output_size})")
    if not bool(torch.isfinite(out).all()):
        raise BackboneError(f"{what} gave non-finite embeddings (NaN or inf)")
    return {
        "model": cfg.feature_model,
        "input": f"{height}x{width}",
        "precision": resolved.precision,
        "batch": batch,
        "compile": cfg.compile,
        "seconds": round(seconds, 3),
    }


def run(s: dict[str, Any], paths: VMPaths) -> int:
    markers = Markers(paths.state_dir)
    checks = int(markers.get(PREFLIGHT).get("checks", 0)) + 1

    def record(status: str, **fields: Any) -> None:
        # The whole marker each time: a pass must not keep the message of an earlier failure. ``checks``
        # counts the checks (one per boot), which shows that a failure is not retried in a loop.
        durable.write_json(
            markers.path(PREFLIGHT),
            {"status": status, "checks": checks, "checked_at": utc_now(), **fields, "updated_at": utc_now()},
        )

    cfg = engine_config.load(s["engine"]["config"])
    lock = gpu_stack.lock_cuda_of(paths.repo_dir / "uv.lock")
    versions: dict[str, str] = {}
    if cfg.device == "cuda" or (cfg.device == "auto" and nvidia_present()):
        try:
            versions = preflight.check_cuda()
        except BackboneError as exc:
            driver = preflight.driver_version()
            verdict = "no NVIDIA driver is loaded"
            if driver[:1].isdigit():
                verdict = gpu_stack.explain(driver, lock)
            message = f"{exc}; {verdict}"
            record("failed", message=message, driver=driver, lock_cuda=f"{lock[0]}.{lock[1]}")
            log.error("preflight: the GPU cannot be used: %s", message)
            return Exit.MODEL
        log.info(
            "preflight: %s, driver %s, torch %s built for CUDA %s: %s; a bf16 matmul ran",
            versions.get("gpu"),
            versions["driver"],
            versions["torch"],
            versions["torch_cuda"],
            gpu_stack.explain(versions["driver"], lock),
        )
    try:
        resolved = preflight.resolve(cfg, fetch_weights=False)
        forward = forward_pass(cfg, resolved)
    except (BackboneError, ConfigError) as exc:
        record("failed", message=str(exc), **versions)
        log.error("preflight: the model cannot run: %s", exc)
        return exc.code
    log.info(
        "preflight: %s: one forward pass of %d images at %s in %s on %s ran in %.2f s",
        cfg.feature_model,
        forward["batch"],
        forward["input"],
        forward["precision"],
        resolved.device,
        forward["seconds"],
    )
    record("done", device=resolved.device, forward=forward, **versions)
    return Exit.OK
