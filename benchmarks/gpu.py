"""The prepared GPU benchmark: one script, under 8 minutes on one GPU.

Measures forward-only images/s of vit_base_patch14_dinov2 at 518 (random weights) in FP32, TF32, bf16
autocast and bf16 + torch.compile over a few batch sizes, resnet50 at 224 in bf16 with and without
channels_last, JPEG decoding on the GPU, then the real pipeline's ratio (archives -> decode workers ->
model -> chunk files) against forward-only on generated archives. Prints a table last and writes JSON.

    python benchmarks/gpu.py [--out DIR]          # on a GPU: the real sizes
    python benchmarks/gpu.py --small              # anywhere (the CPU): tiny sizes, proves the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from building_image_triplet_model import backbone, config, pipeline, sample_data  # noqa: E402


def cfg_for(model: str, size: int, precision: str, device: str, **kw: Any) -> config.DataConfig:
    return config.from_mapping(
        {
            "input_dir": "unused",
            "hdf5_path": str(Path(tempfile.gettempdir()) / "gpu_bench.h5"),
            "feature_model": model,
            "image_size": size,
            "pretrained": False,
            "device": device,
            "precision": precision,
            **kw,
        }
    )


def forward_rate(bb: backbone.Backbone, batch: int, size: int, seconds: float) -> float:
    x8 = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8)
    if bb.device.type == "cuda":
        x8 = x8.pin_memory()

    def sync() -> None:
        if bb.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(3):
            bb.embed(x8)
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 3:
            bb.embed(x8)
            n += 1
        sync()
    return n * batch / (time.perf_counter() - t0)


def pipeline_ratio(
    model: str,
    size: int,
    precision: str,
    device: str,
    batch: int,
    images: int,
    work: Path,
    workers: int,
    compile_: bool,
) -> dict[str, float]:
    archives = work / "archives"
    if not archives.exists():
        per = max(4, images // 4 // 4)
        sample_data.generate(
            sample_data.Options(out=archives, archives=4, targets_per_archive=per, image_pool=32)
        )
    out = work / "pipeline"
    shutil.rmtree(out, ignore_errors=True)
    cfg = config.from_mapping(
        {
            "input_dir": str(archives),
            "hdf5_path": str(out / "d.h5"),
            "feature_model": model,
            "image_size": size,
            "pretrained": False,
            "device": device,
            "precision": precision,
            "batch_size": batch,
            "num_workers": workers,
            "n_images": images,
            "compile": compile_,
            "knn_k": 10,
        }
    )
    stamps: list[tuple[float, int]] = []

    def hooks(runner: pipeline.Runner) -> None:
        runner.on_batch = lambda n: stamps.append((time.perf_counter(), n))

    assert pipeline.execute(cfg, hooks=hooks) == 0
    skip = min(3, len(stamps) - 2)  # warm-up batches (and compilation) are not throughput
    rows = sum(n for _, n in stamps[skip + 1 :])
    pipe = rows / (stamps[-1][0] - stamps[skip][0])
    fwd = forward_rate(backbone.load(cfg), batch, size, 10.0 if device == "cuda" else 2.0)
    return {
        "pipeline_images_per_s": round(pipe, 1),
        "forward_only_images_per_s": round(fwd, 1),
        "ratio": round(pipe / fwd, 3),
        "decode_workers": workers,
        "batch": batch,
        "images": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny models and sizes (for a CPU)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")), help="folder for gpu.json")
    ap.add_argument("--seconds", type=float, default=None, help="measuring time per case")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    device = "cuda" if cuda else "cpu"
    seconds = args.seconds or (6.0 if cuda else 1.0)
    vit, vit_size, batches = (
        ("vit_base_patch14_dinov2.lvd142m", 518, [32, 64, 128])
        if cuda
        else ("test_vit.r160_in1k", 64, [8, 16])
    )
    cnn, cnn_size, cnn_batch = ("resnet50", 224, 128) if cuda else ("resnet18", 64, 16)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    modes = ["fp32", "tf32", "bf16", "fp16"] if cuda else ["fp32", "bf16"]
    for precision in modes:
        bb = backbone.load(cfg_for(vit, vit_size, precision, device))
        for batch in batches:
            rows.append(
                {
                    "model": vit,
                    "size": vit_size,
                    "precision": precision,
                    "batch": batch,
                    "compile": False,
                    "images_per_s": round(forward_rate(bb, batch, vit_size, seconds), 1),
                }
            )
        del bb
    best = max((r for r in rows if r["precision"] == "bf16"), key=lambda r: r["images_per_s"])
    if cuda:
        bb = backbone.load(cfg_for(vit, vit_size, "bf16", device, compile=True))
        rows.append(
            {
                "model": vit,
                "size": vit_size,
                "precision": "bf16",
                "batch": best["batch"],
                "compile": True,
                "images_per_s": round(forward_rate(bb, best["batch"], vit_size, seconds), 1),
            }
        )
        del bb
    for channels_last in (False, True):
        bb = backbone.load(cfg_for(cnn, cnn_size, "bf16", device, channels_last=channels_last))
        rows.append(
            {
                "model": cnn,
                "size": cnn_size,
                "precision": "bf16",
                "batch": cnn_batch,
                "compile": False,
                "channels_last": channels_last,
                "images_per_s": round(forward_rate(bb, cnn_batch, cnn_size, seconds), 1),
            }
        )
        del bb
    extra: dict[str, Any] = {}
    if cuda:
        try:
            from torchvision.io import decode_jpeg

            data = sample_data._jpeg(__import__("numpy").random.default_rng(0), 640, 85)
            tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8)] * 64
            decode_jpeg(tensors, device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                decode_jpeg(tensors, device="cuda")
            torch.cuda.synchronize()
            extra["gpu_decode_jpeg_640_images_per_s"] = round(20 * 64 / (time.perf_counter() - t0), 1)
        except Exception as exc:
            extra["gpu_decode_jpeg"] = f"not measured: {exc}"
    workers = max(1, min(14, (os.cpu_count() or 2) - 2))
    with tempfile.TemporaryDirectory() as tmp:
        extra["pipeline"] = pipeline_ratio(
            vit,
            vit_size,
            "bf16",
            device,
            best["batch"],
            3000 if cuda else 96,
            Path(tmp),
            workers,
            compile_=False,
        )
    doc = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "forward_only": rows,
        **extra,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("gpu.json" if cuda else "gpu_small_cpu.json")).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n{doc['device']}, torch {doc['torch']}, {doc['seconds']} s")
    print(f"{'model':<34} {'size':>4} {'prec':>5} {'batch':>5} {'compile':>7} {'chl':>4} {'img/s':>9}")
    for r in rows:
        print(
            f"{r['model']:<34} {r['size']:>4} {r['precision']:>5} {r['batch']:>5} {r['compile']!s:>7} "
            f"{r.get('channels_last', '-')!s:>4} {r['images_per_s']:>9}"
        )
    print("pipeline vs forward-only:", json.dumps(extra["pipeline"]))
    for key, value in extra.items():
        if key != "pipeline":
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
