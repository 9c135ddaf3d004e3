"""Which NVIDIA driver the locked torch needs, and whether a driver version provides it.

A CUDA build of torch runs on a driver that supports its CUDA major version: from CUDA 11 on, any driver of
at least the first release branch of that major version runs every minor version (NVIDIA's "minor version
compatibility"). A driver that is too old shows as ``nvidia-smi`` working and ``torch.cuda.is_available()``
False. Standard library only: the bootstrap and the tests use it without the project's environment.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

# NVIDIA's table "CUDA Toolkit and Minimum Required Driver Version for CUDA Minor Version Compatibility"
# (CUDA Toolkit release notes), Linux x86_64: CUDA major version -> oldest driver that runs all its minors.
MIN_DRIVER_FOR_CUDA_MAJOR: dict[int, str] = {
    11: "450.80.02",
    12: "525.60.13",
    13: "580.65.06",
}

# The package whose version in uv.lock is the CUDA runtime torch was built with: nvidia-cuda-runtime-cu12
# (CUDA 12 builds) or nvidia-cuda-runtime (CUDA 13 builds name it without the suffix).
_RUNTIME = re.compile(r"nvidia-cuda-runtime(?:-cu\d+)?")


def version_tuple(version: str) -> tuple[int, ...]:
    """'535.309.01-0+deb12u1' -> (535, 309, 1): the upstream part of a driver version, numerically."""
    m = re.match(r"^(?:\d+:)?(\d+(?:\.\d+)*)", version.strip())
    if not m:
        raise ValueError(f"not a driver version: {version!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def lock_cuda(lock_text: str) -> tuple[int, int]:
    """The CUDA (major, minor) of the locked torch, read from the text of uv.lock."""
    packages = tomllib.loads(lock_text).get("package", [])
    found = {
        (int(major), int(minor))
        for p in packages
        if _RUNTIME.fullmatch(p.get("name", ""))
        for major, minor, *_ in [p.get("version", "").split(".")]
    }
    if len(found) != 1:
        raise ValueError(f"uv.lock names {len(found)} CUDA runtimes ({sorted(found)}), expected one")
    return found.pop()


def lock_cuda_of(path: str | Path) -> tuple[int, int]:
    return lock_cuda(Path(path).read_text())


def required_driver(cuda: tuple[int, int]) -> str:
    """The oldest driver version that runs CUDA ``cuda``."""
    try:
        return MIN_DRIVER_FOR_CUDA_MAJOR[cuda[0]]
    except KeyError:
        raise ValueError(f"no minimum driver known for CUDA {cuda[0]}.x") from None


def driver_supports(driver: str, cuda: tuple[int, int]) -> bool:
    """True when a driver of version ``driver`` runs a CUDA ``cuda`` build."""
    return version_tuple(driver) >= version_tuple(required_driver(cuda))


def explain(driver: str, cuda: tuple[int, int]) -> str:
    """One line for logs and errors: both versions and the verdict."""
    need = required_driver(cuda)
    ok = driver_supports(driver, cuda)
    return (
        f"NVIDIA driver {driver} {'supports' if ok else 'is too old for'} the locked torch's CUDA "
        f"{cuda[0]}.{cuda[1]} (needs {need} or newer)"
    )
