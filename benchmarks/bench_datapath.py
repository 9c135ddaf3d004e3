"""Benchmark: the CPU data path of one decode worker, images/s on ONE core (this process pinned to one CPU,
as one DataLoader worker is): read + verify + decode + resize + crop, at 518 px (DINOv2's eval transform)
and 224 px (resnet18's), with JPEG draft mode (``fast_decode``) on and off.

* ``read_decode``  what a worker does per image (embed.ImageBatches): ImageReader.read_verified (one pread
                   at the index's offset, SHA-256 checked against the index) then decode.decode;
* ``read_verify``  ImageReader.read_verified alone (the pread and the SHA-256 check);
* ``decode``       decode.decode alone, on bytes already in memory.

The transforms are the engine's own: decode.Transform.from_identity of the identity that preflight.resolve
gives for each model (its size, crop_pct, interpolation), so the pixels are the pipeline's.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import Bench, archives, stat, tars

from building_image_triplet_model import config
from building_image_triplet_model.engine import index, preflight
from building_image_triplet_model.engine.embed.decode import ImageReader, Transform, decode
from building_image_triplet_model.inputs import sources, tar_reader

MODELS = {518: "vit_base_patch14_dinov2.lvd142m", 224: "resnet18"}


def transform_for(size: int, fast: bool) -> Transform:
    cfg = config.from_mapping(
        {
            "input_dir": "unused",
            "hdf5_path": str(Path(tempfile.gettempdir()) / "datapath.h5"),
            "feature_model": MODELS[size],
            "image_size": size,
            "pretrained": False,
            "device": "cpu",
            "fast_decode": fast,
        }
    )
    return Transform.from_identity(preflight.resolve(cfg).identity)


def main() -> None:
    bench = Bench.from_args("datapath", repeats=5)
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    seconds = 0.25 if bench.quick else 2.0
    folder = archives("datapath", 1, 40, pool=64)
    tar = tars(folder)[0]
    arrays, _ = index.build_source_index(
        sources.Source(tar.stem, "tar", tar), tar_reader.DEFAULT_RECORD_BYTES
    )
    n = min(64, len(arrays["stem"]))
    loc = {k: arrays[k][:n] for k in ("path", "offset", "size", "checksum")}
    reader = ImageReader([str(tar)], [True])
    datas = [reader.read(0, loc["path"][i], int(loc["offset"][i]), int(loc["size"][i])) for i in range(n)]
    bench.settings = {
        "pinned_to_cpu": core,
        "images": n,
        "distinct_jpegs": len(set(datas)),
        "image_bytes_mean": round(sum(map(len, datas)) / n),
        "source_image": "640x640 JPEG, quality 85 (sample_data)",
        "seconds_per_repeat": seconds,
        "models": MODELS,
    }

    def read(i: int) -> bytes:
        data = reader.read_verified(
            0, loc["path"][i], int(loc["offset"][i]), int(loc["size"][i]), int(loc["checksum"][i])
        )
        assert data is not None
        return data

    def check(t: Transform, img: np.ndarray | None, code: int) -> None:
        assert code == 0 and img is not None and img.shape == (t.size, t.size, 3)

    def rate(one: Any) -> float:
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for i in range(n):
                one(i)
            count += n
        return count / (time.perf_counter() - t0)

    rate(read)  # warm-up
    bench.figures["read_verify_images_per_s_per_core"] = stat(
        [rate(read) for _ in range(bench.repeats)], "images/s", 1
    )
    for size in (518, 224):
        for fast in (False, True):
            t = transform_for(size, fast)
            bench.settings[f"transform_{size}_{'draft' if fast else 'full'}"] = {
                "size": t.size,
                "scale_size": t.scale_size,
                "interpolation": t.interpolation,
                "fast_decode": t.fast_decode,
            }
            modes = {
                "read_decode": lambda i, t=t: check(t, *decode(read(i), t)),
                "decode": lambda i, t=t: check(t, *decode(datas[i], t)),
            }
            rate(modes["decode"])  # warm-up
            for mode, one in modes.items():
                values = [rate(one) for _ in range(bench.repeats)]
                key = f"{size}px_{'draft' if fast else 'full'}_{mode}_images_per_s_per_core"
                bench.figures[key] = stat(values, "images/s", 1)
                bench.log(f"{key}: {bench.figures[key]['median']}")
    f = bench.figures
    read_rate = f["read_verify_images_per_s_per_core"]["median"]
    for size in (518, 224):
        full = f[f"{size}px_full_read_decode_images_per_s_per_core"]["median"]
        draft = f[f"{size}px_draft_read_decode_images_per_s_per_core"]["median"]
        dec = f[f"{size}px_draft_decode_images_per_s_per_core"]["median"]
        bench.summary.append(
            f"{size} px, one core: {draft:.0f} images/s read+verify+decode with draft mode, {full:.0f} "
            f"without ({draft / full:.2f}x); per image {1000 / draft:.2f} ms; reading and checking the "
            f"SHA-256 alone {1000 / read_rate:.3f} ms ({read_rate:,.0f}/s), decoding alone "
            f"{1000 / dec:.2f} ms"
        )
    bench.notes.append(
        "Draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the result still covers the resize: "
        "a 640 px source can go no lower than 320 px, so at 518 px it decodes in full either way."
    )
    bench.write()


if __name__ == "__main__":
    main()
