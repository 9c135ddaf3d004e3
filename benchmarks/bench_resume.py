"""Benchmark 5: seconds from starting a run that is 90 % complete to its first new batch.
Benchmark 6: work redone after a SIGKILL in the middle of the embedding step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import BUILD, REPO, bench_archives, write_result


def config(out: Path, archives: Path, **kw: object) -> Path:
    data = {
        "input_dir": str(archives),
        "hdf5_path": str(out / "d.h5"),
        "feature_model": "resnet18",
        "image_size": 64,
        "pretrained": False,
        "device": "cpu",
        "precision": "fp32",
        "batch_size": 32,
        "num_workers": 1,
        "cpu_threads": 1,
        "knn_k": 10,
        **kw,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "c.yaml").write_text(yaml.safe_dump({"data": data}))
    return out / "c.yaml"


def processor(cfg: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "building_image_triplet_model.dataset_processor", "--config", str(cfg)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def chunks(work: Path) -> list[tuple[str, int, int]]:
    out = []
    for p in (work / "emb").glob("*/*-*.npz"):
        a, b = p.stem.split("-")
        out.append((p.parent.name, int(a), int(b)))
    return sorted(out)


FIRST_BATCH = r"""
import json, time, sys
t0 = time.perf_counter()
import torch, timm
t_import = time.perf_counter() - t0
from building_image_triplet_model import config, pipeline
cfg = config.load(sys.argv[1])
stamp = {}
def hooks(runner):
    runner.on_chunk = lambda w, a, b: stamp.setdefault("first", time.perf_counter())
t1 = time.perf_counter()
assert pipeline.execute(cfg, hooks=hooks) == 0
print(json.dumps({"torch_timm_import_s": t_import, "run_start_to_first_batch_s": stamp["first"] - t1}))
"""


def resume_benchmark(archives: Path) -> dict[str, float]:
    out = BUILD / "resume"
    shutil.rmtree(out, ignore_errors=True)
    cfg = config(out, archives, n_images=4000, checkpoint_interval_s=0)
    assert processor(cfg).wait() == 0
    work = out / "d.work"
    done = chunks(work)
    rows = sum(b - a for _, a, b in done)
    # Make it 90 % complete: drop the last 10 % of chunks, the markers, the artifact.
    removed = 0
    for name, a, b in reversed(done):
        if removed >= rows // 10:
            break
        (work / "emb" / name / f"{a:010d}-{b:010d}.npz").unlink()
        (work / "emb" / name / "_SUCCESS.json").unlink(missing_ok=True)
        removed += b - a
    for p in (out / "d.h5", out / "d.stats.json", work / "assemble.json"):
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", FIRST_BATCH, str(cfg)], cwd=REPO, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "images": rows,
        "remaining_images": removed,
        "process_start_to_finish_s": round(wall, 2),
        "torch_timm_import_s": round(figures["torch_timm_import_s"], 2),
        "run_start_to_first_new_batch_s": round(figures["run_start_to_first_batch_s"], 2),
        "target_s": 5,
    }


def kill_cost_benchmark(archives: Path, interval: float = 10.0) -> dict[str, float]:
    out = BUILD / "killcost"
    shutil.rmtree(out, ignore_errors=True)
    cfg = config(out, archives, n_images=8000, image_size=160, checkpoint_interval_s=interval)
    proc = processor(cfg)
    work = out / "d.work"
    progress = work / "progress.json"
    # Kill once the embedding step has run for ~2.5 checkpoint intervals.
    started = None
    while proc.poll() is None:
        time.sleep(0.2)
        try:
            steps = json.loads(progress.read_text()).get("steps", {})
        except (OSError, ValueError):
            continue
        if "embed" in steps and steps["embed"].get("done", 0) > 0 and started is None:
            started = time.monotonic()
        if started and time.monotonic() - started > 2.5 * interval:
            break
    done_before = json.loads(progress.read_text())["steps"]["embed"]["done"]
    rate = json.loads(progress.read_text())["steps"]["embed"].get("rate") or 1.0
    if proc.poll() is not None:
        raise RuntimeError("the run finished before the kill: give it more images")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    durable = sum(b - a for _, a, b in chunks(work))
    redone = max(0, done_before - durable)
    return {
        "checkpoint_interval_s": interval,
        "embedded_before_kill": done_before,
        "durable_after_kill": durable,
        "redone_images": redone,
        "redone_seconds_of_work": round(redone / rate, 1),
        "embed_rate_images_per_s": rate,
    }


def main() -> None:
    archives = bench_archives()
    write_result(
        "resume",
        resume_benchmark(archives),
        notes="resnet18 at 64 px on the CPU; run_start excludes the interpreter and the torch/timm import",
    )
    write_result(
        "kill_cost",
        kill_cost_benchmark(archives),
        notes="progress.json lags the model by up to 2 s, so redone work is measured slightly low",
    )


if __name__ == "__main__":
    main()
