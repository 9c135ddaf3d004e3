"""Benchmark: what the check for a JPEG whose scan data ends early (the reject ``truncated_scan``) costs
per image at the production size: a 640x640 JPEG decoded and resized to 518 px (DINOv2's eval transform),
on ONE core, as one decode worker.

* ``decode``            decode.decode per image, the check included (the pipeline's own call);
* ``decode_unchecked``  the same with the check switched off (decode._grey_tail answering False);
* ``grey_tail``         the check every image pays: the last decoded pixel compared with libjpeg's grey;
* ``confirm``           libjpeg's verdict through simplejpeg, paid only by images whose last pixel is that
                        grey (or progressive ones): ``confirm_rate`` is the fraction of the sample's images
                        that paid it.

The cost is (grey_tail + confirm_rate x confirm) / decode_unchecked; the target is under 5 %.
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench_datapath import transform_for
from common import Bench, archives, stat, tars

from building_image_triplet_model.engine import index
from building_image_triplet_model.engine.embed import decode as decode_mod
from building_image_triplet_model.engine.embed.decode import ImageReader, decode
from building_image_triplet_model.inputs import sources, tar_reader


def main() -> None:
    bench = Bench.from_args("truncated", repeats=5)
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    seconds = 0.25 if bench.quick else 2.0
    folder = archives("truncated", 1, 40, pool=64)
    tar = tars(folder)[0]
    arrays, _ = index.build_source_index(
        sources.Source(tar.stem, "tar", tar), tar_reader.DEFAULT_RECORD_BYTES
    )
    n = min(64, len(arrays["stem"]))
    reader = ImageReader([str(tar)], [True])
    datas = [
        reader.read(0, arrays["path"][i], int(arrays["offset"][i]), int(arrays["size"][i])) for i in range(n)
    ]
    t = transform_for(518, True)
    imgs = [t.open(d) for d in datas]
    bench.settings = {
        "pinned_to_cpu": core,
        "images": n,
        "distinct_jpegs": len(set(datas)),
        "source_image": "640x640 JPEG, quality 85 (sample_data)",
        "transform": {"size": t.size, "scale_size": t.scale_size, "fast_decode": t.fast_decode},
        "seconds_per_repeat": seconds,
    }

    def rate(one: Any, items: int) -> float:
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for i in range(items):
                one(i)
            count += items
        return count / (time.perf_counter() - t0)

    def checked(i: int) -> None:
        assert decode(datas[i], t)[1] == 0

    grey_tail = decode_mod._grey_tail
    confirms = sum(1 for img in imgs if img.info.get("progressive") or grey_tail(img))
    modes = {
        "grey_tail": lambda i: grey_tail(imgs[i]),
        "confirm": lambda i: decode_mod.scan_ended_early(datas[i]),
    }
    rate(checked, n)  # warm-up
    for mode in ("grey_tail", "confirm"):
        values = [rate(modes[mode], n) for _ in range(bench.repeats)]
        bench.figures[f"{mode}_images_per_s"] = stat(values, "images/s")
    # With and without the check, alternated so that a change in the machine's load hits both alike.
    on: list[float] = []
    off: list[float] = []
    for _ in range(bench.repeats):
        on.append(rate(checked, n))
        decode_mod._grey_tail = lambda img: False  # type: ignore[assignment]
        try:
            off.append(rate(checked, n))
        finally:
            decode_mod._grey_tail = grey_tail  # type: ignore[assignment]
    bench.figures["decode_images_per_s"] = stat(on, "images/s")
    bench.figures["decode_unchecked_images_per_s"] = stat(off, "images/s")
    f = {k: v["median"] for k, v in bench.figures.items()}
    confirm_rate = confirms / n
    per_image = 1 / f["grey_tail_images_per_s"] + confirm_rate / f["confirm_images_per_s"]
    decode_s = 1 / f["decode_unchecked_images_per_s"]
    bench.figures["confirm_rate"] = confirm_rate
    bench.figures["check_us_per_image"] = round(per_image * 1e6, 3)
    bench.figures["decode_ms_per_image"] = round(decode_s * 1e3, 3)
    bench.figures["check_percent_of_decode"] = round(100 * per_image / decode_s, 4)
    bench.figures["decode_checked_vs_unchecked"] = round(
        f["decode_unchecked_images_per_s"] / f["decode_images_per_s"], 4
    )
    bench.summary.append(
        f"518 px, one core: the truncated-scan check costs {per_image * 1e6:.2f} us per image "
        f"({100 * per_image / decode_s:.3f} % of the {decode_s * 1e3:.2f} ms decode; target < 5 %); "
        f"{confirms} of {n} images needed libjpeg's verdict ({1e3 / f['confirm_images_per_s']:.2f} ms "
        f"each); decode with / without the check: {f['decode_images_per_s']:.0f} / "
        f"{f['decode_unchecked_images_per_s']:.0f} images/s"
    )
    bench.write()


if __name__ == "__main__":
    main()
