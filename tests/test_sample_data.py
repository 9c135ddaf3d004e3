import io
import tarfile
from collections import Counter

from PIL import Image

from building_image_triplet_model.inputs import records
from tools import sample_data


def test_upstream_layout(archives):
    folder, _ = archives
    assert sorted(p.name for p in folder.glob("*.tar")) == ["0003.tar", "0004.tar", "0009.tar"]
    with tarfile.open(folder / "0004.tar") as tar:
        names = tar.getnames()
        assert all(n.startswith("0004/0004/") for n in names)  # this copy nests the folder twice
        jpg = next(n for n in names if n.endswith(".jpg") and "_bad_" not in n)
        data = tar.extractfile(jpg).read()
        assert 20_000 < len(data) < 200_000  # realistic size, not a few hundred bytes
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.size == (640, 640)
        assert tar.extractfile(jpg[:-4] + ".txt") is not None
    with tarfile.open(folder / "0003.tar") as tar:
        assert all(n.startswith("0003/") and not n.startswith("0003/0003/") for n in tar.getnames())


def test_d_lines_in_real_cities_targets_repeat_and_2_to_7_images(archives):
    folder, _ = archives
    per_archive = {}
    for tar_path in sorted(folder.glob("*.tar")):
        counts: Counter = Counter()
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".txt") and "_bad_" not in m.name:
                    dataset, target, _, _, floats = records.parse_d_line(tar.extractfile(m).read())
                    assert dataset == int(tar_path.stem)
                    lat, lon = floats[0], floats[1]
                    assert any(abs(lat - c[1]) < 0.1 and abs(lon - c[2]) < 0.1 for c in sample_data.CITIES)
                    counts[target] += 1
        assert all(2 <= c <= 7 for c in counts.values())
        per_archive[tar_path.stem] = set(counts)
    common = set.intersection(*per_archive.values())
    assert common  # the same TargetID numbers in every archive


def test_every_bad_kind_is_planted(archives):
    _, summary = archives
    kinds = Counter(p["kind"] for p in summary["planted"])
    assert set(kinds) == set(sample_data.BAD_KINDS)


def test_same_seed_same_bytes(tmp_path):
    a = sample_data.generate(sample_data.Options(out=tmp_path / "a", archives=1, targets_per_archive=3))
    b = sample_data.generate(sample_data.Options(out=tmp_path / "b", archives=1, targets_per_archive=3))
    assert a["images"] == b["images"]
    assert (tmp_path / "a" / "0003.tar").read_bytes() == (tmp_path / "b" / "0003.tar").read_bytes()
