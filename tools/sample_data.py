"""Sample archives in the exact upstream layout of the 3D Street View dataset.

Each archive ``NNNN.tar`` holds one dataset: ``NNNN/<stem>.jpg`` with ``NNNN/<stem>.txt`` beside it (every
other archive nests the folder twice, ``NNNN/NNNN/``, as some upstream copies do). Images are textured
640x640 JPEGs of realistic size; the ``d`` lines place targets inside real cities; TargetIDs restart at 1 in
every archive (so they repeat across archives, as upstream); each target is seen by 2 to 7 images.
``--bad`` plants one item of every bad kind in every archive and lists them in ``planted.json``.

    python -m tools.sample_data --out build/sample_archives --archives 3
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from building_image_triplet_model.inputs.records import DECODER_REASONS

# The unaligned release's dataset ids (dataset.md), used in order.
UPSTREAM_IDS = [
    3, 4, 9, 12, 14, 17, 20, 22, 24, 26, 28, 30, 32, 33, 35, 36, 58, 59, 60, 61, 62, 63, 64, 65, 67, 68,
    69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95,
    96, 97,
]  # fmt: skip

CITIES = [  # name, centre latitude, centre longitude
    ("new_york", 40.7484, -73.9857),
    ("chicago", 41.8819, -87.6278),
    ("washington", 38.8977, -77.0365),
    ("las_vegas", 36.1147, -115.1728),
    ("florence", 43.7731, 11.2560),
    ("amsterdam", 52.3702, 4.8952),
    ("san_francisco", 37.7793, -122.4193),
    ("paris", 48.8566, 2.3522),
]

BAD_KINDS = (
    "orphan_jpg",
    "orphan_txt",
    "empty_image",
    "not_jpeg",
    "decode_error",
    "truncated_scan",
    "no_d_line",
    "too_few_fields",
    "non_numeric_field",
    "non_finite_value",
    "lat_out_of_range",
    "lon_out_of_range",
    "conflicting_d_lines",
    "duplicate_stem",
)
# Bad kinds the index sees; the decoder's (not_jpeg, decode_error, truncated_scan) surface while embedding.
EMBED_TIME_KINDS = DECODER_REASONS

EARTH_M_PER_DEG = 111_320.0


@dataclass
class Options:
    out: Path
    archives: int = 3
    targets_per_archive: int = 40
    seed: int = 0
    image_size: int = 640
    quality: int = 85
    image_pool: int = 0  # >0: reuse this many encoded images (fast, for index benchmarks)
    bad: bool = False
    region_m: float = 1500.0
    shared_coordinates: int = 2  # targets per archive that share their coordinates with another target


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A facade-like picture: a gradient sky, a wall with a window grid, and fine noise."""
    h = w = size
    img = np.empty((h, w, 3), np.float32)
    sky = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    top, bottom = rng.uniform(120, 230, 3), rng.uniform(40, 160, 3)
    img[:] = top * (1 - sky) + bottom * sky
    wall = rng.uniform(60, 200, 3)
    y0 = int(h * rng.uniform(0.05, 0.3))
    img[y0:, :] = wall
    rows, cols = int(rng.integers(3, 8)), int(rng.integers(3, 9))
    cell_h, cell_w = (h - y0) / rows, w / cols
    glass = rng.uniform(10, 90, 3)
    for r in range(rows):
        for c in range(cols):
            ys = int(y0 + r * cell_h + cell_h * 0.2)
            xs = int(c * cell_w + cell_w * 0.25)
            img[ys : ys + int(cell_h * 0.55), xs : xs + int(cell_w * 0.5)] = glass + rng.uniform(-20, 20, 3)
    img += rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(rng: np.random.Generator, size: int, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_texture(rng, size)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _offset(lat: float, lon: float, north_m: float, east_m: float) -> tuple[float, float]:
    return (
        lat + north_m / EARTH_M_PER_DEG,
        lon + east_m / (EARTH_M_PER_DEG * math.cos(math.radians(lat))),
    )


def d_line(values: list[float | int]) -> str:
    return "d " + " ".join(repr(float(v)) if isinstance(v, float) else str(v) for v in values) + "\n"


def _records(rng: np.random.Generator, dataset_id: int, opts: Options, archive_no: int) -> list[tuple]:
    """(stem, d-line values) for every good image of one archive."""
    _, c_lat, c_lon = CITIES[archive_no % len(CITIES)]
    # Each archive is a rectangle of its city; archives of the same city sit side by side.
    base_lat, base_lon = _offset(c_lat, c_lon, 0.0, (archive_no // len(CITIES)) * opts.region_m * 1.2)
    out = []
    patch = 0
    targets: list[tuple[float, float]] = []
    for target_id in range(1, opts.targets_per_archive + 1):
        if target_id <= opts.shared_coordinates and targets:
            t_lat, t_lon = targets[0]  # several targets at one point: KNN must still exclude only itself
        else:
            t_lat, t_lon = _offset(base_lat, base_lon, *rng.uniform(-opts.region_m / 2, opts.region_m / 2, 2))
        targets.append((t_lat, t_lon))
        t_h = float(rng.uniform(5, 60))
        normal_angle = rng.uniform(0, 2 * math.pi)
        normal = (math.sin(normal_angle), math.cos(normal_angle), 0.0)
        for _ in range(int(rng.integers(2, 8))):
            patch += 1
            sv_id = int(rng.integers(1, 10_000_000))
            dist = float(rng.uniform(8, 45))
            bearing = normal_angle + rng.uniform(-0.8, 0.8)
            s_lat, s_lon = _offset(t_lat, t_lon, dist * math.cos(bearing), dist * math.sin(bearing))
            heading = (math.degrees(bearing) + 180.0) % 360.0
            values = [
                dataset_id, target_id, patch, sv_id,
                round(t_lat, 7), round(t_lon, 7), round(t_h, 3), *(round(v, 6) for v in normal),
                round(s_lat, 7), round(s_lon, 7), round(float(rng.uniform(1.5, 3.0)), 3),
                round(dist, 3), round(heading, 3), round(float(rng.uniform(-10, 25)), 3), 0.0,
            ]  # fmt: skip
            stem = f"{dataset_id:04d}_{target_id:07d}_{patch:07d}_{sv_id:07d}"
            out.append((stem, values))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _bad_items(rng: np.random.Generator, dataset_id: int, good_jpeg: bytes, opts: Options) -> list[tuple]:
    """(kind, stem, jpg bytes or None, txt bytes or None, subfolder) for each bad kind."""
    lat, lon = CITIES[0][1], CITIES[0][2]
    ok = [dataset_id, 900_001, 1, 1, lat, lon, 10.0, 1.0, 0.0, 0.0, lat, lon, 2.0, 20.0, 90.0, 0.0, 0.0]

    def line(**changes: object) -> bytes:
        values = list(ok)
        for i, name in enumerate(
            ["DatasetID", "TargetID", "PatchID", "StreetViewID", "target_lat", "target_lon"]
        ):
            if name in changes:
                values[i] = changes[name]
        return d_line(values).encode()

    def stem(kind: str) -> str:
        return f"{dataset_id:04d}_bad_{kind}"

    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(png, format="PNG")
    items = [
        ("orphan_jpg", stem("orphan_jpg"), good_jpeg, None, ""),
        ("orphan_txt", stem("orphan_txt"), None, line(TargetID=900_002), ""),
        ("empty_image", stem("empty_image"), b"", line(TargetID=900_003), ""),
        ("not_jpeg", stem("not_jpeg"), png.getvalue(), line(TargetID=900_004), ""),
        ("decode_error", stem("decode_error"), good_jpeg[: len(good_jpeg) // 3], line(TargetID=900_005), ""),
        # Scan data cut at half, the end-of-image marker kept: decodes without an error, its rest grey.
        ("truncated_scan", stem("truncated_scan"), good_jpeg[: len(good_jpeg) // 2] + b"\xff\xd9",
         line(TargetID=900_009), ""),
        ("no_d_line", stem("no_d_line"), good_jpeg, b"a 1 2 3\n", ""),
        ("too_few_fields", stem("too_few_fields"), good_jpeg, b"d 1 2 3 4 5\n", ""),
        ("non_numeric_field", stem("non_numeric_field"), good_jpeg, line(target_lat="north"), ""),
        ("non_finite_value", stem("non_finite_value"), good_jpeg, line(target_lon="nan"), ""),
        ("lat_out_of_range", stem("lat_out_of_range"), good_jpeg, line(target_lat=91.5), ""),
        ("lon_out_of_range", stem("lon_out_of_range"), good_jpeg, line(target_lon=-181.0), ""),
        ("conflicting_d_lines", stem("conflicting_d_lines"), good_jpeg,
         line(TargetID=900_007) + line(TargetID=900_008), ""),
    ]  # fmt: skip
    dup_txt = line(TargetID=900_006)
    items.append(("duplicate_stem", stem("duplicate_stem"), good_jpeg, dup_txt, "a/"))
    items.append(("duplicate_stem", stem("duplicate_stem"), good_jpeg, dup_txt, "b/"))
    return items


def write_archive(opts: Options, archive_no: int, pool: list[bytes]) -> dict:
    dataset_id = UPSTREAM_IDS[archive_no % len(UPSTREAM_IDS)] + 100 * (archive_no // len(UPSTREAM_IDS))
    name = f"{dataset_id:04d}"
    rng = np.random.default_rng([opts.seed, archive_no])
    records = _records(rng, dataset_id, opts, archive_no)
    prefix = f"{name}/{name}/" if archive_no % 2 else f"{name}/"
    mtime = 1_460_000_000 + archive_no  # fixed: archives are byte-identical for a seed
    path = opts.out / f"{name}.tar"
    tmp = path.with_suffix(".tar.tmp")
    planted: list[dict] = []
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, (stem, values) in enumerate(records):
            jpeg = (
                pool[(archive_no * 7919 + i) % len(pool)]
                if pool
                else _jpeg(rng, opts.image_size, opts.quality)
            )
            _add(tar, f"{prefix}{stem}.jpg", jpeg, mtime)
            _add(tar, f"{prefix}{stem}.txt", d_line(values).encode(), mtime)
        if opts.bad:
            good = pool[0] if pool else _jpeg(rng, opts.image_size, opts.quality)
            for kind, stem, jpg, txt, sub in _bad_items(rng, dataset_id, good, opts):
                if jpg is not None:
                    _add(tar, f"{prefix}{sub}{stem}.jpg", jpg, mtime)
                if txt is not None:
                    _add(tar, f"{prefix}{sub}{stem}.txt", txt, mtime)
                planted.append({"kind": kind, "stem": stem, "archive": name})
    os.replace(tmp, path)
    return {
        "archive": path.name,
        "dataset_id": dataset_id,
        "images": len(records),
        "targets": opts.targets_per_archive,
        "planted": planted,
    }


def generate(opts: Options) -> dict:
    """Write the archives and `planted.json`; returns the summary."""
    opts.out.mkdir(parents=True, exist_ok=True)
    pool_rng = np.random.default_rng([opts.seed, 1_000_003])
    pool = [_jpeg(pool_rng, opts.image_size, opts.quality) for _ in range(opts.image_pool)]
    archives = [write_archive(opts, n, pool) for n in range(opts.archives)]
    planted = [p for a in archives for p in a["planted"]]
    expected: dict[str, int] = {}
    for p in planted:
        # A planted duplicate is an image and a txt of one stem: both are rejected.
        expected[p["kind"]] = expected.get(p["kind"], 0) + (2 if p["kind"] == "duplicate_stem" else 1)
    summary = {
        "archives": archives,
        "images": sum(a["images"] for a in archives),
        "planted": planted,
        "expected_rejects": dict(sorted(expected.items())),
    }
    (opts.out / "planted.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.sample_data",
        description="Write sample 3D Street View archives (NNNN.tar) in the upstream layout.",
    )
    ap.add_argument("--out", type=Path, required=True, help="folder for the archives")
    ap.add_argument("--archives", type=int, default=3, help="number of archives (default 3)")
    ap.add_argument("--targets-per-archive", type=int, default=40, help="targets per archive (default 40)")
    ap.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    ap.add_argument("--image-size", type=int, default=640, help="image edge in pixels (default 640)")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    ap.add_argument(
        "--image-pool", type=int, default=0, help="reuse this many distinct JPEGs (fast large archives)"
    )
    ap.add_argument("--bad", action="store_true", help="plant one item of every bad kind in every archive")
    args = ap.parse_args(argv)
    opts = Options(
        out=args.out,
        archives=args.archives,
        targets_per_archive=args.targets_per_archive,
        seed=args.seed,
        image_size=args.image_size,
        quality=args.quality,
        image_pool=args.image_pool,
        bad=args.bad,
    )
    summary = generate(opts)
    print(
        f"wrote {len(summary['archives'])} archives, {summary['images']} good images, "
        f"{len(summary['planted'])} planted bad items to {args.out}"
    )
    if summary["expected_rejects"]:
        print(
            "the planted items give these rejects: "
            + ", ".join(f"{k}={v}" for k, v in summary["expected_rejects"].items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
