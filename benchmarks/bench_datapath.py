"""Benchmark 2: JPEG read + decode + transform, images/s on ONE core, at 224 and 518, with and without
JPEG draft mode (DCT-domain downscale); on a GPU machine also torchvision's decode_jpeg on CUDA."""

from __future__ import annotations

import os
import tarfile
import time

from common import bench_archives, write_result

from building_image_triplet_model.decode import Transform, decode


def rate(datas: list[bytes], transform: Transform, seconds: float = 4.0) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for d in datas:
            decode(d, transform)
        n += len(datas)
    return n / (time.perf_counter() - t0)


def main() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as one DataLoader worker has
    archives = bench_archives()
    datas = []
    with tarfile.open(sorted(archives.glob("*.tar"))[0]) as tar:
        for m in tar:
            if m.name.endswith(".jpg"):
                datas.append(tar.extractfile(m).read())
            if len(datas) == 64:
                break
    figures = {"image_bytes_mean": round(sum(map(len, datas)) / len(datas))}
    for size, crop, interp in [(224, 0.875, "bicubic"), (224, 1.0, "bicubic"), (518, 1.0, "bicubic")]:
        for fast in (False, True):
            t = Transform(size=size, scale_size=int(size / crop), interpolation=interp, fast_decode=fast)
            key = f"per_core_{size}_crop{crop}_{'draft' if fast else 'full'}_images_per_s"
            figures[key] = round(rate(datas, t), 1)
    figures["target_per_core_518"] = 60
    figures["target_per_core_224"] = 150
    try:
        import torch

        if torch.cuda.is_available():
            from torchvision.io import decode_jpeg

            tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
            decode_jpeg(tensors[:8], device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                decode_jpeg(tensors, device="cuda")
            torch.cuda.synchronize()
            figures["gpu_decode_jpeg_images_per_s"] = round(20 * len(tensors) / (time.perf_counter() - t0), 1)
    except Exception as exc:  # a measurement that cannot run is recorded, not fatal
        figures["gpu_decode_jpeg"] = f"not measured: {exc}"
    write_result("datapath", figures, notes="640x640 JPEGs of the sample generator, one core, in memory")


if __name__ == "__main__":
    main()
