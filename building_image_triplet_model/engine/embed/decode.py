"""The CPU side of the data path: read one image by its locator, decode it, resize and crop it.

The result is uint8 HWC at the model's input size; converting to float and normalising happen on the
device, so workers move 4x fewer bytes and the GPU does the arithmetic it is best at. Decoding failures
are returned as a reason code, never raised: the image is marked invalid in this same (only) pass.

Every image's bytes are checked against the checksum the index recorded: an archive that changed after it
was indexed (even with its size and mtime restored) gives CHANGED instead of pixels, and the run stops
with an error naming it, so metadata and embeddings can never come from different bytes.

A JPEG whose scan data ends early but that still ends with its end-of-image marker decodes in Pillow
without an error: libjpeg warns ("premature end of data segment"), gives every missing block zero
coefficients (flat grey, 128 in every channel) and Pillow drops the warning. Such an image is the reject
``truncated_scan``. The signal is libjpeg's own warning, read through simplejpeg (the same libjpeg-turbo,
which raises it in strict mode); decoding twice would double the cost, so it is asked only where the
result can be one: a baseline image whose last pixel (the last block decoded, grey whenever the scan
ended before it) is exactly grey, or a progressive image (where a cut leaves a blurred, not a grey, tail).
benchmarks/bench_truncated.py measures the check's cost per image.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from building_image_triplet_model.inputs.records import REASON_CODE
from building_image_triplet_model.inputs.tar_reader import checksum

CHANGED = -1  # a code, beside the reject codes: the bytes are not the ones the index saw

JPEG_MAGIC = b"\xff\xd8\xff"
# libjpeg-turbo's warnings for a scan that ends before its last block (JWRN_HIT_MARKER, JWRN_JPEG_EOF).
_SCAN_ENDED_EARLY = ("premature end of data segment", "premature end of jpeg file")


class TruncatedScan(ValueError):
    """The JPEG decodes, but its scan data ended early: part of the picture is libjpeg's grey fill."""


def _grey_tail(img: Image.Image) -> bool:
    """Whether the last decoded pixel is libjpeg's fill for a missing block (exact grey 128)."""
    w, h = img.size
    px = img.getpixel((w - 1, h - 1))
    return px == 128 or (isinstance(px, tuple) and all(v == 128 for v in px))


def scan_ended_early(data: bytes) -> bool:
    """libjpeg's own verdict: did the scan data end before every block was decoded?"""
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=True, fastupsample=True, strict=True)
    except ValueError as exc:
        return any(m in str(exc).lower() for m in _SCAN_ENDED_EARLY)
    return False


_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Transform:
    """timm's eval transform for a square input: resize the short side to scale_size, centre-crop size."""

    size: int
    scale_size: int
    interpolation: str
    fast_decode: bool

    @classmethod
    def from_identity(cls, identity: Any) -> Transform:
        """The eval transform a model identity (identity.ModelIdentity) names."""
        size = int(identity.input_size[-1])
        return cls(
            size=size,
            scale_size=math.floor(size / identity.crop_pct),
            interpolation=identity.interpolation,
            fast_decode=identity.fast_decode,
        )

    def open(self, data: bytes) -> Image.Image:
        """The decoded picture, before the resize; raises on a bad image."""
        img = Image.open(BytesIO(data))
        if self.fast_decode:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result is still >= scale_size: the
            # DCT-domain downscale is far cheaper than decoding every pixel and resizing them.
            img.draft("RGB", (self.scale_size, self.scale_size))
        return img.convert("RGB")

    def apply(self, data: bytes) -> np.ndarray:
        """Decode and transform; raises on a bad image (TruncatedScan where the scan ended early)."""
        img = self.open(data)
        if (img.info.get("progressive") or _grey_tail(img)) and scan_ended_early(data):
            raise TruncatedScan("the scan data ends early")
        w, h = img.size
        if (w, h) != (self.scale_size, self.scale_size):
            # The short side to scale_size, the long side computed and truncated as torchvision's Resize
            # (timm's eval transform) does it.
            short, long = min(w, h), max(w, h)
            new_long = int(self.scale_size * long / short)
            new = (self.scale_size, new_long) if w <= h else (new_long, self.scale_size)
            img = img.resize(new, _INTERPOLATION[self.interpolation])
        w, h = img.size
        # Rounded like torchvision's CenterCrop, so the pixels equal timm's own eval transform.
        left, top = round((w - self.size) / 2.0), round((h - self.size) / 2.0)
        if (w, h) != (self.size, self.size):
            img = img.crop((left, top, left + self.size, top + self.size))
        return np.asarray(img, dtype=np.uint8)


def decode(data: bytes, transform: Transform) -> tuple[np.ndarray | None, int]:
    """(pixels, reason code): pixels is None when the image is not a decodable JPEG."""
    if not data.startswith(JPEG_MAGIC):
        return None, REASON_CODE["not_jpeg"]
    try:
        return transform.apply(data), REASON_CODE["ok"]
    except TruncatedScan:
        return None, REASON_CODE["truncated_scan"]
    except Exception:  # PIL raises many types for corrupt data; every one means "does not decode"
        return None, REASON_CODE["decode_error"]


class ImageReader:
    """Reads image bytes by locator. File descriptors are opened lazily, per process, after fork."""

    def __init__(self, source_paths: list[str], source_is_tar: list[bool]) -> None:
        self.source_paths = source_paths
        self.source_is_tar = source_is_tar
        self._fds: dict[int, int] = {}
        self._pid = -1

    def read_verified(
        self, source: int, rel_path: bytes, offset: int, size: int, expected: int
    ) -> bytes | None:
        """The image's bytes, or None when they are not the bytes the index recorded."""
        try:
            data = self.read(source, rel_path, offset, size)
        except OSError:
            return None
        return data if len(data) == size and checksum(data) == expected else None

    def read(self, source: int, rel_path: bytes, offset: int, size: int) -> bytes:
        if self.source_is_tar[source]:
            if self._pid != os.getpid():
                self._fds = {}  # descriptors inherited from a parent are shared offsets; use our own
                self._pid = os.getpid()
            fd = self._fds.get(source)
            if fd is None:
                fd = self._fds[source] = os.open(self.source_paths[source], os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise OSError(f"{self.source_paths[source]}: short read at byte {offset}")
            return data
        path = os.path.join(self.source_paths[source], rel_path.decode("utf-8", "surrogateescape"))
        with open(path, "rb") as fh:
            return fh.read()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
