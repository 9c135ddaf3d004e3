"""The prepared GPU benchmark: one script, under 8 minutes on one GPU.

1. Forward-only images/s and peak GPU memory of vit_base_patch14_dinov2.lvd142m at 518 (random weights)
   through the engine's own path (preflight.resolve, backbone.load, Backbone.embed on uint8 pixels already on
   the host, pinned) over batch sizes 16/32/64/128: bf16 autocast (the production precision), then bf16
   WEIGHTS (the model cast to bf16 under the same autocast: the residual stream in bf16 too, half the
   bandwidth; not an engine option yet), then fp32, tf32 and fp16 autocast; then torch.compile at batch 64
   and 128 for bf16 autocast and bf16 weights (their compile time too).
2. The real pipeline (pipeline.execute: archives read in place, decode workers, model, chunk writer,
   artifact) on generated archives with the production settings of configs/vm.yaml (device cuda, bf16,
   batch 64, its decode workers or the machine's default), random weights instead of the hub's: images/s
   of the embedding step (Hooks.on_batch) and its ratio to forward-only at the same settings.
3. If time is left: torchvision's decode_jpeg on the GPU (640 px JPEGs).

Every figure is the median of repeats with the values kept; a case that would start past the time budget
is skipped and says so. Order: bf16 (production) forward-only, the pipeline, bf16 weights, compile, the other
precisions, decode, so that what matters most runs first. A table is printed last; JSON goes to $OUT when
set, else build/bench/results. Its ``pipeline_images_per_s`` (an L4 run, not --small) is the rate the cost
model reads from benchmarks/results/gpu.json (building_image_triplet_model/costs/gpu_rate.py).

    python benchmarks/gpu.py [--out DIR] [--budget-s 420]      # on a GPU: the real sizes
    gcp/provision.sh smoke-benchmark                           # the same on the run's L4, --budget-s 900
    python benchmarks/gpu.py --small                           # anywhere (the CPU): tiny, proves it runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from common import QUICK_RESULTS, REPO, RESULTS, Bench, median, stat  # noqa: E402

from building_image_triplet_model import config  # noqa: E402
from building_image_triplet_model.engine import machine, pipeline, preflight  # noqa: E402
from building_image_triplet_model.engine.context import Hooks  # noqa: E402
from building_image_triplet_model.engine.embed import backbone  # noqa: E402
from tools import sample_data  # noqa: E402


def load(data: dict[str, Any]) -> tuple[config.DataConfig, backbone.Backbone]:
    cfg = config.from_mapping(data)
    return cfg, backbone.load(cfg, preflight.resolve(cfg))


def forward_rate(bb: backbone.Backbone, batch: int, size: int, seconds: float, repeats: int) -> list[float]:
    """Backbone.embed on one uint8 batch (pinned on CUDA), results to the host, as the pipeline does."""
    cuda = bb.device.type == "cuda"
    x8 = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8)
    if cuda:
        x8 = x8.pin_memory()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rates = []
    with torch.inference_mode():
        for _ in range(3):
            bb.embed(x8).cpu()
        sync()
        for _ in range(repeats):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or n < 2:
                bb.embed(x8).to("cpu", non_blocking=cuda)
                n += 1
            sync()
            rates.append(n * batch / (time.perf_counter() - t0))
    return rates


def production_data(small: bool, archives: Path, out: Path, images: int) -> dict[str, Any]:
    """configs/vm.yaml's data section, with the paths, the images and random weights of this benchmark."""
    data = dict(yaml.safe_load((REPO / "configs" / "vm.yaml").read_text())["data"])
    data.pop("weights_path", None)
    data.update(input_dir=str(archives), hdf5_path=str(out / "d.h5"), pretrained=False, n_images=images)
    data.pop("manifest", None)
    data.pop("work_dir", None)
    if small:
        # The machine's default decode workers (vm.yaml's count is for a 16-vCPU VM).
        data.update(
            feature_model="test_vit.r160_in1k", image_size=64, device="cpu", batch_size=8, num_workers=None
        )
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny models and sizes on the CPU (proves it runs)")
    ap.add_argument("--quick", action="store_true", help="as --small (for run_all.py --quick)")
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for the JSON (default: $OUT, else results)"
    )
    ap.add_argument("--seconds", type=float, default=None, help="measuring time per repeat")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip cases that would start after this")
    args = ap.parse_args()
    small = args.small or args.quick or not torch.cuda.is_available()
    cuda = not small
    device = "cuda" if cuda else "cpu"
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    out_dir = out_dir or (QUICK_RESULTS if args.quick else RESULTS)
    bench = Bench("gpu" if cuda else "gpu_small_cpu", quick=args.quick, out=out_dir, repeats=3 if cuda else 2)
    seconds = args.seconds or (3.0 if cuda else 0.3)
    deadline = time.monotonic() + args.budget_s

    def time_left(what: str) -> bool:
        if time.monotonic() < deadline:
            return True
        bench.not_measured[what] = f"skipped: past the {args.budget_s:.0f} s budget"
        return False

    vit, size, batches = (
        ("vit_base_patch14_dinov2.lvd142m", 518, [16, 32, 64, 128])
        if cuda
        else ("test_vit.r160_in1k", 64, [4, 8])
    )
    precisions = ["fp32", "tf32", "bf16", "fp16"] if cuda else ["fp32", "bf16"]
    base = {
        "input_dir": "unused",
        "hdf5_path": str(Path(tempfile.gettempdir()) / "gpu_bench.h5"),
        "feature_model": vit,
        "image_size": size,
        "pretrained": False,
        "device": device,
    }
    bench.settings = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "small": small,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "model": vit,
        "image_size": size,
        "seconds_per_repeat": seconds,
        "repeats": bench.repeats,
    }
    table: list[tuple[str, int, str, float, float | None]] = []

    def load_case(precision: str, compile_: bool = False) -> backbone.Backbone:
        """``bf16w``: bf16 autocast with the weights themselves in bf16."""
        autocast = "bf16" if precision == "bf16w" else precision
        _, bb = load({**base, "precision": autocast, "compile": compile_})
        if precision == "bf16w":
            bb.model.to(torch.bfloat16)
        return bb

    def measure(bb: backbone.Backbone, name: str, batch: int, label: str, mode: str) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rates = forward_rate(bb, batch, size, seconds, bench.repeats)
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        bench.figures[f"{name}_images_per_s"] = stat(rates, "images/s", 1)
        if peak is not None:
            bench.figures[f"{name}_peak_memory_gib"] = peak
        table.append((label, batch, mode, median(rates), peak))
        bench.log(f"{label} {mode} batch {batch}: {median(rates):.1f} img/s, peak {peak} GiB")

    def forward_cases(precision: str) -> None:
        if not time_left(f"forward_{precision}"):
            return
        bb = load_case(precision)
        for batch in batches:
            if not time_left(f"forward_{precision}_b{batch}"):
                continue
            try:
                measure(bb, f"forward_{precision}_b{batch}", batch, precision, "eager")
            except torch.OutOfMemoryError as exc:  # recorded, not fatal: the larger batches may not fit
                bench.not_measured[f"forward_{precision}_b{batch}"] = f"out of memory: {str(exc)[:120]}"
        del bb
        if cuda:
            torch.cuda.empty_cache()

    def compile_case(precision: str) -> None:
        if not cuda:
            bench.not_measured[f"compile_{precision}"] = (
                "GPU only (torch.compile on the CPU needs a C++ toolchain and minutes)"
            )
            return
        if not time_left(f"forward_{precision}_compile"):
            return
        t0 = time.perf_counter()
        bb = load_case(precision, compile_=True)
        x8 = torch.randint(0, 255, (64, size, size, 3), dtype=torch.uint8).pin_memory()
        with torch.inference_mode():
            bb.embed(x8).cpu()
        bench.figures[f"forward_{precision}_compile_first_batch_s"] = round(time.perf_counter() - t0, 1)
        for batch in (64, 128):
            if time_left(f"forward_{precision}_compile_b{batch}"):
                measure(bb, f"forward_{precision}_compile_b{batch}", batch, precision, "compile")
        del bb
        torch.cuda.empty_cache()

    def pipeline_case() -> None:
        """The real pipeline with the production settings, against forward-only at the same settings."""
        images = 3000 if cuda else 64
        runs = 3 if cuda else 1
        with tempfile.TemporaryDirectory() as tmp:
            archives = Path(tmp) / "archives"
            sample_data.generate(
                sample_data.Options(
                    out=archives, archives=4, targets_per_archive=max(8, images // 16), image_pool=32
                )
            )
            pipe: list[float] = []
            resolved_workers = None
            for r in range(runs):
                if not time_left(f"pipeline_run{r + 1}"):
                    break
                out = Path(tmp) / f"run{r}"
                cfg = config.from_mapping(production_data(small, archives, out, images))
                stamps: list[tuple[float, int]] = []

                def on_batch(n: int, stamps: list[tuple[float, int]] = stamps) -> None:
                    stamps.append((time.perf_counter(), n))

                assert pipeline.execute(cfg, hooks=Hooks(on_batch=on_batch)) == 0
                skip = min(3, max(0, len(stamps) - 3))  # warm-up batches (cuDNN, workers) are not throughput
                pipe.append(sum(n for _, n in stamps[skip + 1 :]) / (stamps[-1][0] - stamps[skip][0]))
                resolved_workers = machine.decode_workers(cfg, device)
                shutil.rmtree(out, ignore_errors=True)
                bench.log(f"pipeline run {r + 1}: {pipe[-1]:.1f} img/s")
            if not pipe:
                return
            cfg, bb = load(production_data(small, archives, Path(tmp) / "fwd", images))
            fwd = forward_rate(bb, cfg.batch_size, bb.identity.input_size[-1], seconds, bench.repeats)
            bench.figures["pipeline_images_per_s"] = stat(pipe, "images/s", 1)
            bench.figures["pipeline_forward_only_images_per_s"] = stat(fwd, "images/s", 1)
            bench.figures["pipeline_over_forward_only"] = round(median(pipe) / median(fwd), 3)
            bench.settings["pipeline"] = {
                "from": "configs/vm.yaml, pretrained: false, paths and n_images of this benchmark",
                "feature_model": cfg.feature_model,
                "precision": cfg.precision,
                "batch_size": cfg.batch_size,
                "num_workers_config": cfg.num_workers,
                "decode_workers": resolved_workers,
                "images_per_run": images,
                "runs": len(pipe),
            }
            del bb

    def decode_case() -> None:
        if not cuda or not time_left("gpu_decode_jpeg"):
            return
        try:
            import numpy as np
            from torchvision.io import decode_jpeg

            data = sample_data._jpeg(np.random.default_rng(0), 640, 85)
            tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8)] * 64
            decode_jpeg(tensors, device="cuda")
            torch.cuda.synchronize()
            rates = []
            for _ in range(bench.repeats):
                t0 = time.perf_counter()
                for _ in range(10):
                    decode_jpeg(tensors, device="cuda")
                torch.cuda.synchronize()
                rates.append(640 / (time.perf_counter() - t0))
            bench.figures["gpu_decode_jpeg_640_images_per_s"] = stat(rates, "images/s", 1)
        except Exception as exc:  # a measurement that cannot run is recorded, not fatal
            bench.not_measured["gpu_decode_jpeg"] = f"{type(exc).__name__}: {exc}"

    # The production precision and the pipeline first: they matter most if the budget runs out.
    first = "bf16"
    forward_cases(first)
    pipeline_case()
    forward_cases("bf16w")
    compile_case("bf16")
    compile_case("bf16w")
    for precision in precisions:
        if precision != first:
            forward_cases(precision)
    decode_case()
    if not cuda:
        bench.notes.append(
            "--small: tiny model and sizes on the CPU; the figures only prove that the script runs"
        )
    bench.write()
    print(f"\n{bench.settings['device']}, torch {torch.__version__}")
    print(f"{'precision':>9} {'batch':>5} {'mode':>8} {'img/s':>9} {'peak GiB':>9}")
    for precision, batch, mode, rate, peak in table:
        print(f"{precision:>9} {batch:>5} {mode:>8} {rate:>9.1f} {peak if peak is not None else '-':>9}")
    if "pipeline_images_per_s" in bench.figures:
        f = bench.figures
        print(
            f"pipeline {f['pipeline_images_per_s']['median']:.1f} img/s, forward-only "
            f"{f['pipeline_forward_only_images_per_s']['median']:.1f} img/s: ratio "
            f"{f['pipeline_over_forward_only']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
