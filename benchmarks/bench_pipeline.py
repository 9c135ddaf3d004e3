"""Benchmark: embedding images/s of the real pipeline on the CPU against the same model's forward-only
images/s, and the defaults question: decode workers and model threads chosen by machine.py from the core
count, against the old defaults (4 decode workers, torch's own thread count) and 1 worker + 1 thread.

The pipeline is pipeline.execute on generated archives read in place (index, plan, KNN, then the
embedding step: DataLoader workers read, verify and decode, the model runs, the writer thread writes chunk
files, then the artifact); its rate is taken from Hooks.on_batch between the first and the last batch, so
it is the embedding step's steady state. Forward-only is Backbone.embed (the one forward path, the same
normalisation on uint8 pixels) on a batch of the same archives' images, decoded beforehand and already in
memory, same batch size, precision and model threads. Each setting
runs in its own process (torch's thread pool is per process); every repeat has a fresh output folder, so
nothing is reused.

The torch thread count of the thread that runs the model is recorded during the embedding step
(``model_threads_seen``), beside the configured one: what the model really ran with.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, Bench, archives, data_config, median, stat

SETTINGS = {
    "defaults": {"num_workers": None, "cpu_threads": None},
    "old_defaults_4_workers_torch_threads": {"num_workers": 4, "cpu_threads": "torch"},
    "1_worker_1_thread": {"num_workers": 1, "cpu_threads": 1},
}


def real_batch(folder: Path, transform: Any, n: int) -> Any:
    """n images of the first archive, decoded by the pipeline's transform (uint8 NHWC): forward-only runs
    on the same pixels as the pipeline (on the CPU a model's speed can depend on the data: random noise
    was slower than these images here)."""
    import numpy as np

    from building_image_triplet_model.engine import index
    from building_image_triplet_model.engine.embed.decode import ImageReader, decode
    from building_image_triplet_model.inputs import sources, tar_reader

    tar = sorted(folder.glob("*.tar"))[0]
    arr, _ = index.build_source_index(sources.Source(tar.stem, "tar", tar), tar_reader.DEFAULT_RECORD_BYTES)
    reader = ImageReader([str(tar)], [True])
    out = []
    for i in range(n):
        img, code = decode(
            reader.read(0, arr["path"][i], int(arr["offset"][i]), int(arr["size"][i])), transform
        )
        assert code == 0 and img is not None
        out.append(img)
    return np.stack(out)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One setting: the pipeline ``repeats`` times, then forward-only. Runs in its own process."""
    import torch

    from building_image_triplet_model import config
    from building_image_triplet_model.engine import machine, pipeline, preflight
    from building_image_triplet_model.engine.context import Hooks
    from building_image_triplet_model.engine.embed import backbone
    from building_image_triplet_model.engine.embed.decode import Transform

    torch_default = torch.get_num_threads()
    data = dict(spec["data"])
    if data.get("cpu_threads") == "torch":
        data["cpu_threads"] = torch_default
    runs = []
    for r in range(spec["repeats"]):
        out = Path(spec["scratch"]) / f"run{r}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = config.from_mapping({**data, "hdf5_path": str(out / "d.h5")})
        stamps: list[tuple[float, int]] = []
        seen: list[int] = []

        def on_batch(n: int, stamps: list[tuple[float, int]] = stamps, seen: list[int] = seen) -> None:
            stamps.append((time.perf_counter(), n))
            seen.append(torch.get_num_threads())  # the model's thread (the hook runs in the embedding loop)

        t0 = time.perf_counter()
        assert pipeline.execute(cfg, hooks=Hooks(on_batch=on_batch)) == 0
        wall = time.perf_counter() - t0
        steady = sum(n for _, n in stamps[1:]) / (stamps[-1][0] - stamps[0][0])
        runs.append(
            {
                "steady_images_per_s": steady,
                "images": sum(n for _, n in stamps),
                "batches": len(stamps),
                "wall_s": wall,
                "first_batch_after_start_s": stamps[0][0] - t0,
                "model_threads_seen": sorted(set(seen)),
            }
        )
        shutil.rmtree(out, ignore_errors=True)
    cfg = config.from_mapping({**data, "hdf5_path": str(Path(spec["scratch"]) / "fwd" / "d.h5")})
    resolved = preflight.resolve(cfg)
    bb = backbone.load(cfg, resolved)  # in this (the main) thread: it sets the configured thread count
    configured_threads = machine.model_threads(cfg, "cpu")
    workers = machine.decode_workers(cfg, "cpu")
    seen_threads = runs[0]["model_threads_seen"][0]
    torch.set_num_threads(seen_threads)  # forward-only with the threads the pipeline's model really had
    b = cfg.batch_size
    size = resolved.identity.input_size[-1]
    x8 = torch.as_tensor(real_batch(Path(data["input_dir"]), Transform.from_identity(resolved.identity), b))
    fwd = []
    with torch.inference_mode():
        for _ in range(2):
            bb.embed(x8)
        for _ in range(spec["fwd_repeats"]):
            t0 = time.perf_counter()
            for _ in range(spec["fwd_batches"]):
                bb.embed(x8)
            fwd.append(spec["fwd_batches"] * b / (time.perf_counter() - t0))
    return {
        "runs": runs,
        "forward_only_images_per_s": fwd,
        "decode_workers": workers,
        "model_threads_configured": configured_threads,
        "model_threads_seen": seen_threads,
        "torch_default_threads": torch_default,
        "image_size": size,
        "batch_size": b,
    }


def main() -> None:
    if "--child" in sys.argv:
        spec = json.loads(sys.argv[sys.argv.index("--child") + 1])
        print(json.dumps(child(spec)))
        return
    bench = Bench.from_args("pipeline", repeats=3, quick_repeats=1)
    quick = bench.quick
    size, n_images = (64, 128) if quick else (224, 512)
    folder = archives("pipeline", 2, 200, pool=32)
    bench.settings = {
        "model": "resnet18 (random weights), CPU, fp32",
        "image_size": size,
        "batch_size": 32,
        "images_per_run": n_images,
        "archives": "2 generated archives (~1,800 images, 640x640 JPEG), read in place",
        "settings": SETTINGS,
        "pipeline_repeats": bench.repeats,
    }
    results: dict[str, Any] = {}
    for label, s in SETTINGS.items():
        spec = {
            "data": data_config(folder, Path("unused"), image_size=size, n_images=n_images, knn_k=5, **s),
            "repeats": bench.repeats,
            "scratch": str(bench.scratch / label),
            "fwd_repeats": 5 if not quick else 2,
            "fwd_batches": 3 if not quick else 2,
        }
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{out.stderr[-4000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results[label] = res
        pipe = [r["steady_images_per_s"] for r in res["runs"]]
        fwd = res["forward_only_images_per_s"]
        f = bench.figures
        f[f"{label}_pipeline_images_per_s"] = stat(pipe, "images/s", 2)
        f[f"{label}_forward_only_images_per_s"] = stat(fwd, "images/s", 2)
        f[f"{label}_pipeline_over_forward_only"] = round(median(pipe) / median(fwd), 3)
        f[f"{label}_run_wall_s"] = stat([r["wall_s"] for r in res["runs"]], "s", 2)
        f[f"{label}_resolved"] = {
            "decode_workers": res["decode_workers"],
            "model_threads_configured": res["model_threads_configured"],
            "model_threads_seen": res["model_threads_seen"],
            "torch_default_threads": res["torch_default_threads"],
        }
        bench.log(
            f"{label}: pipeline {median(pipe):.1f} img/s, forward-only {median(fwd):.1f} img/s, resolved "
            f"{f[f'{label}_resolved']}"
        )
    best = max(SETTINGS, key=lambda k: bench.figures[f"{k}_pipeline_images_per_s"]["median"])
    for label in SETTINGS:
        f = bench.figures
        r = f[f"{label}_resolved"]
        bench.summary.append(
            f"{label}: {f[f'{label}_pipeline_images_per_s']['median']:.1f} images/s "
            f"({r['decode_workers']} decode workers, {r['model_threads_configured']} model threads "
            "configured, "
            f"{r['model_threads_seen']} seen by the model); forward-only "
            f"{f[f'{label}_forward_only_images_per_s']['median']:.1f}; ratio "
            f"{f[f'{label}_pipeline_over_forward_only']}"
        )
    bench.summary.append(f"fastest setting on this machine: {best}")
    mismatch = [k for k, v in results.items() if v["model_threads_seen"] != v["model_threads_configured"]]
    if mismatch:
        bench.summary.append(
            "the model ran with a different torch thread count than machine.py/the config chose in: "
            + ", ".join(mismatch)
            + " (torch.set_num_threads is per thread for OpenMP, and the backbone is loaded in the "
            "model-loader thread while the model runs in the main thread)"
        )
    bench.write()


if __name__ == "__main__":
    main()
