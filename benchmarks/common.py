"""Shared pieces of the benchmarks: the machine's description, sample archives, result files.

Every benchmark writes ``benchmarks/results/<name>.json`` (its figures and the machine); ``run_all.py``
renders them into ``benchmarks/results/README.md``. No test asserts a time: these files are the record.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BUILD = REPO / "build" / "bench"
sys.path.insert(0, str(REPO))


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return info


def write_result(name: str, figures: dict[str, Any], notes: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "figures": figures,
        "notes": notes,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(json.dumps(doc["figures"], indent=1))
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_archives(targets_per_archive: int = 1300, archives: int = 4, pool: int = 16) -> Path:
    """~5,400 images per archive of real 640x640 JPEG bytes (a pool of distinct ones), built once."""
    from building_image_triplet_model import sample_data

    out = BUILD / f"archives_{archives}x{targets_per_archive}"
    if not (out / "planted.json").exists():
        sample_data.generate(
            sample_data.Options(
                out=out, archives=archives, targets_per_archive=targets_per_archive, image_pool=pool, seed=1
            )
        )
    return out


def extracted(archives_dir: Path) -> Path:
    out = archives_dir.with_name(archives_dir.name + "_extracted")
    if not (out / ".done").exists():
        for tar_path in sorted(archives_dir.glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                tar.extractall(out / tar_path.stem, filter="data")
        (out / ".done").write_text("")
    return out


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run code in a fresh interpreter (its own peak memory); it prints one JSON object last."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_caches_note() -> str:
    return "page cache warm (archives just written); on a pd-standard disk cold reads are bound by ~120 MiB/s"
