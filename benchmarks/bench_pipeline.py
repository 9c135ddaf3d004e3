"""Benchmark 3: embedding images/s of the real pipeline (archives read in place, decoded in a DataLoader
worker, model, chunk files written) divided by the same model's forward-only images/s on tensors already in
memory: same device, batch, precision and model threads.

On this CPU machine the model gets one thread and the data path one worker core, the split an L4 VM has
in spirit (the model on its own device, 14 cores decoding): resnet18 at 224 is the small model.
"""

from __future__ import annotations

import sys

from common import BUILD, bench_archives, run_python, write_result

CHILD = r"""
import json, shutil, time, yaml
from pathlib import Path
import torch
from building_image_triplet_model import backbone, config, pipeline
out = Path({out!r}); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
data = dict(input_dir={archives!r}, hdf5_path=str(out / "d.h5"), feature_model={model!r}, image_size={size},
            pretrained=False, device={device!r}, precision={precision!r}, batch_size={batch},
            num_workers={workers},
            cpu_threads={threads}, n_images={n}, checkpoint_interval_s={interval}, knn_k=5)
(out / "c.yaml").write_text(yaml.safe_dump({{"data": data}}))
cfg = config.load(out / "c.yaml")
stamps = []
def hooks(runner):
    runner.on_batch = lambda n: stamps.append((time.perf_counter(), n))
assert pipeline.execute(cfg, hooks=hooks) == 0
rows = sum(n for _, n in stamps[1:])
pipe = rows / (stamps[-1][0] - stamps[0][0])
bb = backbone.load(cfg)
x8 = torch.randint(0, 255, ({batch}, {size}, {size}, 3), dtype=torch.uint8)
if bb.device.type == "cuda":
    x8 = x8.pin_memory()
def step():
    with torch.inference_mode():
        return bb.embed(x8).cpu()
for _ in range(2): step()
t0 = time.perf_counter(); k = max(3, len(stamps) - 1)
for _ in range(k): step()
fwd = k * {batch} / (time.perf_counter() - t0)
print(json.dumps({{"pipeline_images_per_s": pipe, "forward_only_images_per_s": fwd, "batches": len(stamps),
                  "device": str(bb.device), "precision": bb.precision}}))
"""


def main(model: str = "resnet18", size: int = 224, batch: int = 32, n: int = 768) -> None:
    archives = bench_archives()
    figures = {"model": model, "image_size": size, "batch_size": batch, "images": n}
    for workers, threads, label in [(1, 1, "1_worker_1_model_thread"), (0, 1, "no_worker_1_model_thread")]:
        res = run_python(
            CHILD.format(
                out=str(BUILD / "pipeline_out"),
                archives=str(archives),
                model=model,
                size=size,
                device="cpu",
                precision="fp32",
                batch=batch,
                workers=workers,
                threads=threads,
                n=n,
                interval=60,
            )
        )
        figures[f"{label}_pipeline_images_per_s"] = round(res["pipeline_images_per_s"], 2)
        figures[f"{label}_forward_only_images_per_s"] = round(res["forward_only_images_per_s"], 2)
        figures[f"{label}_ratio"] = round(res["pipeline_images_per_s"] / res["forward_only_images_per_s"], 3)
    figures["target_ratio"] = 0.9
    write_result(
        "pipeline",
        figures,
        notes="CPU: decoding in a DataLoader worker keeps the model thread busy; "
        "'no_worker' decodes in the model's own thread, for contrast",
    )


if __name__ == "__main__":
    main(*sys.argv[1:2])
