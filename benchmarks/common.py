"""Shared pieces of the benchmarks: the machine's description, statistics, sample archives, result files.

Every benchmark is a script (``python benchmarks/bench_<name>.py [--quick] [--out DIR]``) that writes one
JSON file, ``<out>/<name>.json``: its figures, each the median of several repeats with every value kept,
the machine (cores, CPU model, memory, torch) and the load average before and after, so that a reader knows
what ran beside it. ``run_all.py`` runs them all and renders ``README.md`` beside the JSON files.

The default folder is ``build/bench/results`` (``--quick``: ``build/bench/quick/results``): nothing a
benchmark writes is tracked; ``make bench-record`` copies a finished run into ``benchmarks/results/``.
No test asserts a time: these files are the record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "bench"
RESULTS = BUILD / "results"
QUICK_RESULTS = BUILD / "quick" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What the figures were measured on. torch's version is read from its metadata (no import)."""
    info: dict[str, Any] = {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "os": platform.platform(),
        "torch": package_version("torch"),
        "timm": package_version("timm"),
        # Where .pyc files are never written, every process compiles what it imports again.
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
    }
    if "torch" in sys.modules:
        import torch

        info["torch_threads_default"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    return info


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------ statistics
def stat(values: Iterable[float], unit: str, digits: int = 3) -> dict[str, Any]:
    """A figure: the median of the repeats, with every value kept."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "values": [], "n": 0, "unit": unit}
    return {
        "median": round(statistics.median(vals), digits),
        "values": [round(v, digits) for v in vals],
        "n": len(vals),
        "min": round(min(vals), digits),
        "max": round(max(vals), digits),
        "unit": unit,
    }


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------------------------- results
@dataclass
class Bench:
    """One benchmark's result file: ``Bench.from_args("index")``, fill ``figures``, then ``write()``."""

    name: str
    quick: bool
    out: Path
    repeats: int
    figures: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)  # conclusions, in words, computed from the figures
    not_measured: dict[str, str] = field(default_factory=dict)  # what could not be measured here, and why
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    load_before: list[float] = field(default_factory=load_average)

    @classmethod
    def from_args(
        cls, name: str, repeats: int, quick_repeats: int = 2, argv: list[str] | None = None
    ) -> Bench:
        ap = argparse.ArgumentParser(description=f"benchmark {name}")
        ap.add_argument("--quick", action="store_true", help="small sizes: proves the benchmark runs")
        ap.add_argument("--out", type=Path, default=None, help="folder for the JSON file")
        args, _ = ap.parse_known_args(argv)
        quick = args.quick or os.environ.get("BENCH_QUICK") == "1"
        out = args.out or (QUICK_RESULTS if quick else RESULTS)
        return cls(name, quick, out, quick_repeats if quick else repeats)

    @property
    def scratch(self) -> Path:
        """This benchmark's scratch folder (under build/bench; quick runs apart from full ones)."""
        path = BUILD / ("quick" if self.quick else "full") / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, message: str) -> None:
        print(f"[{self.name} {time.time() - self.started:7.1f}s] {message}", flush=True)

    def write(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {
            "name": self.name,
            "quick": self.quick,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "duration_s": round(time.time() - self.started, 1),
            "repeats": self.repeats,
            "machine": machine(),
            "load_before": self.load_before,
            "load_after": load_average(),
            "settings": self.settings,
            "figures": self.figures,
            "summary": self.summary,
            "not_measured": self.not_measured,
            "notes": self.notes,
        }
        path = self.out / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(path)
        print(json.dumps({"figures": self.figures, "summary": self.summary}, indent=1), flush=True)
        print(f"wrote {path}", flush=True)
        return path


# ---------------------------------------------------------------------------------------- sample data
def archives(
    name: str, n: int, targets_per_archive: int, pool: int, seed: int = 1, bad: bool = False
) -> Path:
    """Generated archives (real 640x640 JPEG bytes from a pool of distinct ones), built once and reused."""
    from tools import sample_data

    out = BUILD / "archives" / f"{name}_{n}x{targets_per_archive}_p{pool}_s{seed}{'_bad' if bad else ''}"
    if not (out / "planted.json").exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        sample_data.generate(
            sample_data.Options(
                out=tmp,
                archives=n,
                targets_per_archive=targets_per_archive,
                image_pool=pool,
                seed=seed,
                bad=bad,
            )
        )
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def tars(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tar"))


def images_in(folder: Path) -> dict[str, int]:
    """Good images per archive, from the generator's summary."""
    doc = json.loads((folder / "planted.json").read_text())
    return {Path(a["archive"]).stem: int(a["images"]) for a in doc["archives"]}


def link_archives(paths: Iterable[Path], dest: Path) -> Path:
    """A folder of hard links to archives (same bytes and mtime, no copy)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        target = dest / p.name
        if not target.exists():
            os.link(p, target)
    return dest


def evict(paths: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache (no root needed): the next read comes from the disk."""
    for p in paths:
        if not p.is_file() or p.is_symlink():
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)  # dirty pages cannot be dropped: write them first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: Iterable[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (util-linux fincore), or None without it."""
    paths = [str(p) for p in paths]
    if not paths or shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *paths],
        capture_output=True,
        text=True,
        check=False,
    )
    res = size = 0
    for line in out.stdout.split("\n"):
        parts = line.split()
        if len(parts) == 2:
            res, size = res + int(parts[0]), size + int(parts[1])
    return round(res / size, 4) if size else None


# ------------------------------------------------------------------------------------ engine processes
def data_config(input_dir: Path, out: Path, **kw: Any) -> dict[str, Any]:
    """A ``data:`` section: the benchmarks' CPU model (resnet18, random weights) unless overridden."""
    return {
        "input_dir": str(input_dir),
        "hdf5_path": str(out / "d.h5"),
        "feature_model": "resnet18",
        "image_size": 64,
        "pretrained": False,
        "device": "cpu",
        "precision": "fp32",
        "batch_size": 32,
        "knn_k": 10,
        **kw,
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"data": data}, sort_keys=False))
    return path


RUNNER = Path(__file__).resolve().parent / "processor_runner.py"


@dataclass
class RunnerResult:
    """What benchmarks/processor_runner.py reports: exit code, wall seconds, and its timeline (seconds
    from the moment the parent started the process)."""

    code: int
    wall_s: float
    timeline: dict[str, Any]
    batches: list[tuple[float, int]]
    stats: dict[str, Any] | None


def start_runner(
    config: Path,
    report: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    stdout: Any = subprocess.DEVNULL,
) -> tuple[subprocess.Popen[str], float]:
    """Start the processor (benchmarks/processor_runner.py) as a new process in its own session."""
    report.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(RUNNER),
            "--config",
            str(config),
            "--report",
            str(report),
            "--t0",
            repr(t0),
            *extra,
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=stdout,
        stderr=subprocess.DEVNULL if stdout is subprocess.DEVNULL else subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, t0


def read_report(report: Path, code: int, wall_s: float, stats_path: Path | None) -> RunnerResult:
    doc = json.loads(report.read_text()) if report.exists() else {"timeline": {}, "batches": []}
    stats = json.loads(stats_path.read_text()) if stats_path and stats_path.exists() and code == 0 else None
    return RunnerResult(
        code, wall_s, doc.get("timeline", {}), [tuple(b) for b in doc.get("batches", [])], stats
    )


def run_processor(config: Path, report: Path, *extra: str, timeout: float = 3600) -> RunnerResult:
    """Run the processor to its end in a new process; its wall time includes the interpreter and imports."""
    proc, t0 = start_runner(config, report, *extra)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise RuntimeError(f"the processor ran past {timeout} s on {config}") from None
    wall = time.monotonic() - t0
    import yaml

    out = Path(yaml.safe_load(config.read_text())["data"]["hdf5_path"])
    result = read_report(report, code, wall, out.with_name(out.stem + ".stats.json"))
    if code != 0:
        raise RuntimeError(f"the processor exited {code} on {config} (log: {out.with_suffix('.log')})")
    return result


class LineWatcher(threading.Thread):
    """Reads a child's stdout lines in the background; keeps the last one that starts with a prefix."""

    def __init__(self, stream: Any, prefix: str) -> None:
        super().__init__(daemon=True)
        self.stream, self.prefix = stream, prefix
        self.last: str | None = None
        self.lines: list[str] = []

    def run(self) -> None:
        for line in self.stream:
            if line.startswith(self.prefix):
                self.last = line.strip()
            else:
                self.lines.append(line.rstrip("\n"))


def child_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 3600) -> Any:
    """Run code in a fresh interpreter; it prints one JSON object on its last line."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"
