"""Benchmark: download + embed wall time with the download overlapped with the engine, and without.

Generated archives are served by tools/fileserver.RangeServer on 127.0.0.1 at a throttled rate, and fetched
by gcp/scripts/download_archives.sh (aria2c, one download at a time: TRIPLET_ARIA2_JOBS=1), which moves each
archive into the archive folder once it is complete and verified.

* ``sequential``  download_archives.sh to completion, then ``dataset_processor`` (what a run without the
                  overlap does);
* ``overlap``     download_archives.sh in the background and ``dataset_processor --follow`` at once: the
                  engine indexes and embeds each archive as it arrives (what the VM job does when archives
                  are read in place);
* ``vm_job``      (with ``--vm-job``) the VM job's own flow, gcp/scripts/startup_preprocess.sh in direct
                  mode with the dry
                  run's settings (gcp/gcp.mk DRY_RUN_ENV: no system, disk, repo or uv steps; config,
                  preflight, then the job: download overlapped with the engine, finalize, checkpoints to a
                  local folder). It does more than the two above (its own steps and checkpoint pushes).

The rate is chosen so that the download and the embedding take about the same time: a calibration run of
the processor over local copies of the archives gives E seconds, and the server's rate is bytes / E
(``--quick``: no calibration, an 8-second download).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, Bench, archives, data_config, images_in, stat, tars, write_config

from tools.fileserver import RangeServer

SCRIPTS = REPO / "gcp" / "scripts"


def processor(cfg: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "building_image_triplet_model.dataset_processor",
            "--config",
            str(cfg),
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def download(manifest: Path, raw: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["bash", str(SCRIPTS / "download_archives.sh"), "--manifest", str(manifest), "--dir", str(raw)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} exited {code}")


def main() -> None:
    bench = Bench.from_args("overlap", repeats=3, quick_repeats=1)
    small = archives("overlap", 3 if bench.quick else 4, 60 if bench.quick else 150, pool=32)
    paths = tars(small)
    size = sum(p.stat().st_size for p in paths)
    images = sum(images_in(small).values())
    work = bench.scratch
    env = {
        **os.environ,
        "TRIPLET_ARIA2_JOBS": "1",
        "TRIPLET_REPO_DIR": str(REPO),
        "TRIPLET_PYTHON": sys.executable,
        "TRIPLET_RETRY_BASE_S": "1",
    }

    def data(out: Path, raw: Path, manifest: Path) -> dict[str, Any]:
        return data_config(
            raw / "dataset_unaligned", out, manifest=str(manifest), embedding_chunk_interval_s=60
        )

    with_vm_job = "--vm-job" in sys.argv
    if bench.quick:
        embed_s = 8.0  # quick: no calibration run, a short download
        rate = int(size / embed_s)
    else:
        # Calibration: the processor alone over local archives.
        cal = work / "calibration"
        shutil.rmtree(cal, ignore_errors=True)
        cal_raw = cal / "raw" / "dataset_unaligned"
        cal_raw.mkdir(parents=True)
        for p in paths:
            os.link(p, cal_raw / p.name)
        cal_manifest = cal / "manifest.txt"
        cal_manifest.write_text(
            "".join(f"http://unused/{p.name}\n\tout=dataset_unaligned/{p.name}\n" for p in paths)
        )
        cfg = write_config(cal / "c.yaml", data(cal / "out", cal / "raw", cal_manifest))
        t0 = time.monotonic()
        check(processor(cfg).wait(), "calibration run")
        embed_s = time.monotonic() - t0
        rate = int(size / embed_s)
        bench.log(
            f"calibration: the processor takes {embed_s:.1f} s over {size / 1e6:.0f} MB: "
            f"{rate / 1e6:.2f} MB/s"
        )

    server = RangeServer(small, rate=rate).start()
    manifest = work / "manifest.txt"
    manifest.write_text("".join(f"{server.url}/{p.name}\n\tout=dataset_unaligned/{p.name}\n" for p in paths))
    results: dict[str, dict[str, list[float]]] = {"sequential": {}, "overlap": {}}
    if with_vm_job:
        results["vm_job"] = {}

    def add(variant: str, key: str, value: float) -> None:
        results[variant].setdefault(key, []).append(value)

    try:
        for r in range(bench.repeats):
            # sequential
            root = work / "sequential"
            shutil.rmtree(root, ignore_errors=True)
            cfg = write_config(root / "c.yaml", data(root / "out", root / "raw", manifest))
            t0 = time.monotonic()
            check(download(manifest, root / "raw", env).wait(), "download_archives.sh")
            t1 = time.monotonic()
            check(processor(cfg).wait(), "dataset_processor")
            t2 = time.monotonic()
            add("sequential", "download_s", t1 - t0)
            add("sequential", "processor_s", t2 - t1)
            add("sequential", "wall_s", t2 - t0)
            # overlap
            root = work / "overlap"
            shutil.rmtree(root, ignore_errors=True)
            cfg = write_config(root / "c.yaml", data(root / "out", root / "raw", manifest))
            t0 = time.monotonic()
            dl = download(manifest, root / "raw", env)
            proc = processor(cfg, "--follow")
            check(dl.wait(), "download_archives.sh")
            t1 = time.monotonic()
            check(proc.wait(), "dataset_processor --follow")
            t2 = time.monotonic()
            add("overlap", "download_s", t1 - t0)
            add("overlap", "wall_s", t2 - t0)
            add("overlap", "after_download_s", t2 - t1)
            if not with_vm_job:
                bench.log(
                    f"repeat {r + 1}: sequential {results['sequential']['wall_s'][-1]:.1f} s, overlap "
                    f"{results['overlap']['wall_s'][-1]:.1f} s"
                )
                continue
            # the VM job's flow
            root = work / "vm_job"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            job_cfg = write_config(root / "preprocess.yaml", data(root / "unused", root / "unused", manifest))
            job_env = {
                **env,
                "TRIPLET_SKIP_SYSTEM": "1",
                "TRIPLET_SKIP_DISKS": "1",
                "TRIPLET_SKIP_REPO": "1",
                "TRIPLET_SKIP_UV_SYNC": "1",
                "TRIPLET_METADATA": "off",
                "TRIPLET_RUN_MODE": "direct",
                "TRIPLET_MOUNT_RAW": str(root / "raw"),
                "TRIPLET_MOUNT_WORK": str(root / "work"),
                "TRIPLET_RUN_DIR": str(root / "run"),
                "TRIPLET_RUN_ID": "bench",
                "TRIPLET_CHECKPOINT_URI": str(root / "bucket"),
                "TRIPLET_MANIFEST_URI": str(manifest),
                "TRIPLET_PREPROCESS_CONFIG_PATH": str(job_cfg),
                "TRIPLET_PUSH_INTERVAL_S": "10",
            }
            t0 = time.monotonic()
            out = subprocess.run(
                ["bash", str(SCRIPTS / "startup_preprocess.sh")],
                cwd=REPO,
                env=job_env,
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"startup_preprocess.sh exited {out.returncode}:\n{out.stderr[-3000:]}")
            add("vm_job", "wall_s", time.monotonic() - t0)
            bench.log(
                f"repeat {r + 1}: sequential {results['sequential']['wall_s'][-1]:.1f} s (download "
                f"{results['sequential']['download_s'][-1]:.1f} + processor "
                f"{results['sequential']['processor_s'][-1]:.1f}), overlap "
                f"{results['overlap']['wall_s'][-1]:.1f} s, "
                f"vm job {results['vm_job']['wall_s'][-1]:.1f} s"
            )
    finally:
        server.stop()

    for variant, figs in results.items():
        for key, values in figs.items():
            bench.figures[f"{variant}_{key}"] = stat(values, "s", 2)
    f = bench.figures
    f["overlap_over_sequential"] = round(f["overlap_wall_s"]["median"] / f["sequential_wall_s"]["median"], 3)
    if with_vm_job:
        f["vm_job_over_sequential"] = round(
            f["vm_job_wall_s"]["median"] / f["sequential_wall_s"]["median"], 3
        )
    else:
        bench.not_measured["vm_job"] = (
            "the VM job's own flow (startup_preprocess.sh, direct mode) runs with --vm-job: "
            "python benchmarks/bench_overlap.py --vm-job"
        )
    bench.settings = {
        "archives": len(paths),
        "images": images,
        "bytes": size,
        "server_rate_bytes_per_s": rate,
        "calibration_processor_s": round(embed_s, 2),
        "aria2_jobs": 1,
        "model": "resnet18 (random weights) at 64 px, CPU, fp32, batch 32, default decode workers/threads",
        "repeats": bench.repeats,
    }
    d, e = f["sequential_download_s"]["median"], f["sequential_processor_s"]["median"]
    bench.summary.append(
        f"download {d:.1f} s, then the processor {e:.1f} s: {f['sequential_wall_s']['median']:.1f} s; "
        "overlapped (download_archives.sh + dataset_processor --follow): "
        f"{f['overlap_wall_s']['median']:.1f} s "
        f"= {f['overlap_over_sequential']}x (no overlap can beat max(D, E) / (D + E) = "
        f"{max(d, e) / (d + e):.2f}x)"
    )
    if with_vm_job:
        bench.summary.append(
            f"the VM job's flow (startup_preprocess.sh in direct mode, with its config and preflight steps, "
            f"checkpoint pushes and finalize): {f['vm_job_wall_s']['median']:.1f} s = "
            f"{f['vm_job_over_sequential']}x"
        )
    bench.write()


if __name__ == "__main__":
    main()
