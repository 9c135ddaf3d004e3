"""decode.py: the eval transform, reject codes instead of exceptions, and verified reads by locator."""

from __future__ import annotations

import io
import math
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from building_image_triplet_model.engine.embed.decode import CHANGED, ImageReader, Transform, decode
from building_image_triplet_model.engine.identity import ModelIdentity
from building_image_triplet_model.inputs.records import REASON_CODE
from building_image_triplet_model.inputs.tar_reader import checksum


def identity(size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic") -> ModelIdentity:
    return ModelIdentity(
        model="m",
        weights="random",
        input_size=(3, size, size),
        interpolation=interpolation,
        crop_pct=crop_pct,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        fast_decode=False,
        precision="fp32",
        device_type="cpu",
        embedding_dtype="float32",
    )


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with structure (JPEG keeps it nearly as is)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.01, 0.05, 3)
    img = np.stack([128 + 100 * np.sin(a * x), 128 + 100 * np.cos(b * y), 128 + 60 * np.sin(c * (x + y))], -1)
    return img.clip(0, 255).astype(np.uint8)


def jpeg(w: int, h: int, seed: int = 0, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture(w, h, seed)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def timm_pixels(data: bytes, size: int, crop_pct: float, interpolation: str = "bicubic") -> np.ndarray:
    """timm's own eval transform up to (not including) the tensor conversion."""
    import timm.data

    tf = timm.data.create_transform(
        input_size=(3, size, size), crop_pct=crop_pct, interpolation=interpolation, is_training=False
    )
    img = Image.open(io.BytesIO(data)).convert("RGB")
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:2] == ["Resize", "CenterCrop"], names
    for step in tf.transforms[:2]:
        img = step(img)
    return np.asarray(img)


# ------------------------------------------------------------------------------------------ transform
@pytest.mark.parametrize(
    ("size", "crop_pct", "scale"), [(224, 0.875, 256), (224, 1.0, 224), (224, 0.9, 248), (32, 0.95, 33)]
)
def test_from_identity(size: int, crop_pct: float, scale: int) -> None:
    t = Transform.from_identity(identity(size, crop_pct, "bilinear"))
    assert t == Transform(size=size, scale_size=scale, interpolation="bilinear", fast_decode=False)
    assert t.scale_size == math.floor(size / crop_pct)


def test_decode_gives_uint8_hwc_at_the_size() -> None:
    for w, h in [(640, 640), (640, 480), (300, 900)]:
        pixels, code = decode(jpeg(w, h), Transform(32, 36, "bicubic", fast_decode=True))
        assert code == REASON_CODE["ok"] == 0
        assert pixels is not None and pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)


@pytest.mark.parametrize(("size", "crop_pct"), [(32, 0.875), (224, 0.9), (224, 1.0), (160, 0.95)])
def test_square_images_get_exactly_timms_pixels(size: int, crop_pct: float) -> None:
    data = jpeg(640, 640)
    t = Transform.from_identity(identity(size, crop_pct))
    np.testing.assert_array_equal(t.apply(data), timm_pixels(data, size, crop_pct))


def test_a_non_square_image_whose_resize_is_whole_gets_timms_pixels() -> None:
    data = jpeg(640, 480)  # 640 * 36 / 480 = 48: no rounding in the resize
    t = Transform.from_identity(identity(32, 0.875))
    np.testing.assert_array_equal(t.apply(data), timm_pixels(data, 32, 0.875))


def test_a_non_square_image_gets_timms_pixels() -> None:
    data = jpeg(640, 480)
    t = Transform.from_identity(identity(224, 1.0))
    np.testing.assert_array_equal(t.apply(data), timm_pixels(data, 224, 1.0))


def test_interpolation_is_the_identitys() -> None:
    data = jpeg(640, 640, seed=3)
    near = Transform(32, 36, "nearest", False).apply(data)
    cubic = Transform(32, 36, "bicubic", False).apply(data)
    assert not np.array_equal(near, cubic)
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((36, 36), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(near, np.asarray(img.crop((2, 2, 34, 34))))


def test_fast_decode_stays_close_to_a_full_decode() -> None:
    data = jpeg(640, 640, seed=5)
    fast = Transform(32, 36, "bicubic", True).apply(data).astype(np.int16)
    full = Transform(32, 36, "bicubic", False).apply(data).astype(np.int16)
    assert fast.shape == full.shape == (32, 32, 3)
    assert np.abs(fast - full).mean() < 6  # the same picture, decoded at 1/8 scale first


# --------------------------------------------------------------------------------------- reject codes
def test_not_a_jpeg_and_broken_jpegs_give_reject_codes() -> None:
    t = Transform(32, 36, "bicubic", True)
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(png, format="PNG")
    good = jpeg(640, 640)
    cases = {
        "png": (png.getvalue(), "not_jpeg"),
        "empty": (b"", "not_jpeg"),
        "text": (b"d 1 2 3\n", "not_jpeg"),
        "truncated": (good[: len(good) // 3], "decode_error"),
        "magic only": (b"\xff\xd8\xff", "decode_error"),
        "garbage after magic": (b"\xff\xd8\xff" + bytes(range(256)) * 8, "decode_error"),
    }
    for what, (data, reason) in cases.items():
        pixels, code = decode(data, t)
        assert pixels is None, what
        assert code == REASON_CODE[reason], what
    assert CHANGED not in REASON_CODE.values()


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9])
def test_a_scan_cut_short_with_its_end_marker_is_truncated_scan(fast, progressive, cut) -> None:
    """Pillow decodes these without an error (the rest is libjpeg's grey); they are a reject of their own."""
    buf = io.BytesIO()
    Image.fromarray(picture(640, 640, 4)).save(buf, format="JPEG", quality=90, progressive=progressive)
    good = buf.getvalue()
    data = good[: int(len(good) * cut)] + b"\xff\xd9"
    Image.open(io.BytesIO(data)).convert("RGB")  # what the decoder saw before: no error at all
    t = Transform(518, 518, "bicubic", fast)
    assert decode(good, t)[1] == REASON_CODE["ok"]
    pixels, code = decode(data, t)
    assert pixels is None and code == REASON_CODE["truncated_scan"]


def test_a_whole_image_that_ends_in_grey_is_no_reject() -> None:
    """Grey where libjpeg would fill is not proof: libjpeg itself is asked, and says the scan is whole."""
    arr = picture(640, 640, 6)
    arr[-64:, :, :] = 128
    for flat in (arr, np.full((64, 64, 3), 128, np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(flat).save(buf, format="JPEG", quality=95)
        pixels, code = decode(buf.getvalue(), Transform(32, 36, "bicubic", False))
        assert code == REASON_CODE["ok"] and pixels is not None


# ------------------------------------------------------------------------------------------ the reader
@pytest.fixture
def tar_of_images(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    members = {f"0003/img_{i}.jpg": jpeg(64 + i, 48, seed=i) for i in range(5)}
    members["0003/note.txt"] = b"d 1 2 3\n"
    path = tmp_path / "0003.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, members


def locators(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def test_pread_offsets_give_exactly_the_members_bytes(tar_of_images: tuple[Path, dict[str, bytes]]) -> None:
    path, members = tar_of_images
    reader = ImageReader(["/nonexistent", str(path)], [True, True])
    with tarfile.open(path) as tar:
        for name, (offset, size) in locators(path).items():
            expected = tar.extractfile(name).read()  # type: ignore[union-attr]
            assert expected == members[name]
            assert reader.read(1, name.encode(), offset, size) == expected
            assert reader.read_verified(1, name.encode(), offset, size, checksum(expected)) == expected
    reader.close()
    assert reader._fds == {}


def test_read_verified_refuses_other_bytes(
    tar_of_images: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    path, members = tar_of_images
    name = "0003/img_2.jpg"
    offset, size = locators(path)[name]
    good = checksum(members[name])
    reader = ImageReader([str(path)], [True])
    assert reader.read_verified(0, name.encode(), offset, size, good) == members[name]
    assert reader.read_verified(0, name.encode(), offset, size, good ^ 1) is None  # another checksum
    assert reader.read_verified(0, name.encode(), offset + 1, size, good) is None  # shifted bytes
    end = path.stat().st_size
    assert reader.read_verified(0, name.encode(), end - 10, size, good) is None  # a short read
    with pytest.raises(OSError, match="short read"):
        reader.read(0, name.encode(), end - 10, size)
    reader.close()

    # The archive changed in place, same size: one byte of the image differs.
    raw = bytearray(path.read_bytes())
    raw[offset + size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert ImageReader([str(path)], [True]).read_verified(0, name.encode(), offset, size, good) is None
    # The archive is gone.
    path.unlink()
    assert ImageReader([str(path)], [True]).read_verified(0, name.encode(), offset, size, good) is None


def test_folder_sources_read_by_relative_path(tmp_path: Path) -> None:
    folder = tmp_path / "0004"
    (folder / "sub").mkdir(parents=True)
    data = jpeg(50, 40)
    (folder / "sub" / "a.jpg").write_bytes(data)
    reader = ImageReader([str(folder)], [False])
    assert reader.read(0, b"sub/a.jpg", -1, len(data)) == data
    assert reader.read_verified(0, b"sub/a.jpg", -1, len(data), checksum(data)) == data
    assert reader.read_verified(0, b"sub/missing.jpg", -1, len(data), checksum(data)) is None
    assert reader.read_verified(0, b"sub/a.jpg", -1, len(data) + 1, checksum(data)) is None  # size changed
    (folder / "sub" / "a.jpg").write_bytes(data[:-1] + b"\x00")
    assert reader.read_verified(0, b"sub/a.jpg", -1, len(data), checksum(data)) is None
    assert reader._fds == {}  # folders are opened per read


def test_a_forked_child_reads_through_its_own_descriptors(
    tar_of_images: tuple[Path, dict[str, bytes]],
) -> None:
    path, members = tar_of_images
    name = "0003/img_4.jpg"
    offset, size = locators(path)[name]
    reader = ImageReader([str(path)], [True])
    assert reader.read(0, name.encode(), offset, size) == members[name]
    parent_fd = reader._fds[0]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a DataLoader worker
        status = 1
        try:
            os.close(r)
            os.close(parent_fd)  # the inherited descriptor is unusable here: the reader must not need it
            ok = (
                reader.read_verified(0, name.encode(), offset, size, checksum(members[name])) == members[name]
            )
            os.write(w, f"{int(ok)} {reader._fds[0]} {reader._pid}".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r) as fh:
        report = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, report
    ok, child_fd, child_pid = (int(v) for v in report.split())
    assert ok == 1
    assert child_pid == pid  # the reader knew it was in another process
    # The parent's descriptor is untouched by the child and still reads.
    assert reader._fds[0] == parent_fd and reader._pid == os.getpid()
    assert reader.read(0, name.encode(), offset, size) == members[name]
    assert child_fd >= 0
    reader.close()
