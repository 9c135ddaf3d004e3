"""The VM's preflight, after the driver and ``uv sync`` and before any long phase: the locked torch must
see the GPU and run a bf16 matmul on it. The driver's and torch's CUDA versions go to the log; a failure
is one message naming both, recorded in ``state/preflight.json``, and stops the startup (the job is not
started, and nothing retries it in a loop: the next boot checks again).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from building_image_triplet_model.io import durable
from building_image_triplet_model.io.progress import utc_now

from .. import config as engine_config
from ..errors import BackboneError
from ..exit_codes import Exit
from . import gpu_stack
from .paths import VMPaths
from .phases import PREFLIGHT, Markers

log = logging.getLogger(__name__)


def nvidia_present(pci: Path = Path("/sys/bus/pci/devices")) -> bool:
    return any(
        (d / "vendor").is_file() and (d / "vendor").read_text().strip() == "0x10de" for d in pci.glob("*")
    )


def run(s: dict[str, Any], paths: VMPaths) -> int:
    from building_image_triplet_model.engine import preflight

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
    if cfg.device == "cpu" or (cfg.device == "auto" and not nvidia_present()):
        log.info("preflight: device %s and no GPU needed: nothing to check", cfg.device)
        record("done", device="cpu")
        return Exit.OK
    try:
        versions = preflight.check_cuda()
    except BackboneError as exc:
        driver = preflight.driver_version()
        verdict = gpu_stack.explain(driver, lock) if driver[:1].isdigit() else "no NVIDIA driver is loaded"
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
    record("done", device="cuda", **versions)
    return Exit.OK
