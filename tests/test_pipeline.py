"""The whole processor on real archives: the trainer's contract, rejects, inputs, weights, resumes."""

import json
import tarfile
import threading

import h5py
import numpy as np
from engine_helpers import load, read_artifact, run_cli, stats, tiny_config

from building_image_triplet_model import config
from building_image_triplet_model.engine import geo_knn, pipeline, preflight
from building_image_triplet_model.engine.context import Hooks
from building_image_triplet_model.engine.embed.decode import ImageReader
from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.inputs import tar_reader
from building_image_triplet_model.io.workdir import Layout


def test_trainer_contract(reference):
    """Open the artifact as the trainer does (hdf5-contract.md) and check every name and invariant."""
    with h5py.File(Layout(reference).output, "r") as f:
        emb = f["backbone_embeddings"]
        n, d = emb.shape
        assert d == f.attrs["backbone_output_size"] and np.issubdtype(emb.dtype, np.floating)
        keys = f["metadata/TargetID"][:]
        valid = f["images/valid_indices"][:]
        mask = f["metadata/backbone_completed_mask"][:]
        assert keys.shape == (n,) and np.issubdtype(keys.dtype, np.integer)
        assert valid.dtype == np.int64 and mask.dtype == bool and mask.all()
        # Positives share a target: one key is one physical point (same dataset, raw id and coordinates).
        raw, dataset = f["metadata/TargetID_raw"][:], f["metadata/DatasetID"][:]
        lat, lon = f["metadata/target_lat"][:], f["metadata/target_lon"][:]
        for key in np.unique(keys):
            rows = np.flatnonzero(keys == key)
            assert len(np.unique(raw[rows])) == 1 and len(np.unique(dataset[rows])) == 1
            assert np.ptp(lat[rows]) < 1e-9 and np.ptp(lon[rows]) < 1e-9
        assert len(np.unique(keys)) > len(np.unique(raw))  # raw TargetIDs repeat across datasets
        # Splits: disjoint, covering every target, per target.
        splits = {s: f[f"splits/{s}"][:] for s in ("train", "val", "test")}
        union = np.concatenate(list(splits.values()))
        assert len(union) == len(set(union.tolist())) and set(union.tolist()) == set(keys.tolist())
        t_lat = dict(zip(f["targets/key"][:].tolist(), f["targets/lat"][:].tolist(), strict=True))
        t_lon = dict(zip(f["targets/key"][:].tolist(), f["targets/lon"][:].tolist(), strict=True))
        for split, members in splits.items():
            order = f[f"metadata/target_id_order_{split}"][:]
            np.testing.assert_array_equal(order, np.sort(members))
            idx = f[f"metadata/knn_indices_geo_{split}"][:]
            dist = f[f"metadata/knn_distances_geo_{split}"][:]
            k = min(reference.knn_k, len(order) - 1)
            assert idx.shape == dist.shape == (len(order), k)
            assert not np.any(idx == np.arange(len(order))[:, None])  # never itself
            assert np.all(np.diff(dist, axis=1) >= 0) and (idx >= 0).all() and (idx < len(order)).all()
            la = np.array([t_lat[x] for x in order.tolist()])
            lo = np.array([t_lon[x] for x in order.tolist()])
            np.testing.assert_allclose(
                dist, geo_knn.haversine_m(la[:, None], lo[:, None], la[idx], lo[idx]), atol=0.05
            )
        # valid_indices exclude the planted bad images; their embeddings are zero, the others are real.
        stems = [s.decode() for s in f["images/stem"][:]]
        kinds = ("_bad_not_jpeg", "_bad_decode_error", "_bad_truncated_scan")
        bad = {i for i, s in enumerate(stems) if any(k in s for k in kinds)}
        assert len(bad) == 9 and bad.isdisjoint(valid.tolist()) and len(valid) == n - 9
        for i in sorted(bad):
            assert not emb[i].any()
        for i in valid[:20]:
            assert np.abs(emb[int(i)]).sum() > 0  # read row by row, as the trainer does
        assert f.attrs["feature_model"] == reference.feature_model and f.attrs["image_size"] == 32
        assert json.loads(f.attrs["settings"])["knn_k"] == reference.knn_k


def test_every_image_row_carries_the_checksum_of_its_bytes(reference, archives):
    with h5py.File(Layout(reference).output, "r") as f:
        names = [n.decode() for n in f["sources/name"][:]]
        src, path = f["images/source"][:], f["images/path"][:]
        offset, size, checksum = f["images/offset"][:], f["images/size"][:], f["images/checksum"][:]
    reader = ImageReader([str(archives[0] / f"{n}.tar") for n in names], [True] * len(names))
    for i in range(0, len(src), 17):
        data = reader.read(int(src[i]), path[i], int(offset[i]), int(size[i]))
        assert tar_reader.checksum(data) == checksum[i]


def test_rejects_report_lists_every_planted_item(reference, archives):
    _, summary = archives
    layout = Layout(reference)
    lines = layout.rejects.read_text().splitlines()
    assert lines[0] == "source\tpath\treason\tdetail"
    rows = [line.split("\t") for line in lines[1:]]
    for item in summary["planted"]:
        reasons = {r[2] for r in rows if r[0] == item["archive"] and f"/{item['stem']}." in r[1]}
        assert reasons == {item["kind"]}, item
    s = stats(layout)
    assert s["rejects"]["duplicate_stem"] == 12 and s["rejects"]["decode_error"] == 3
    # Who found what: the index the metadata problems, the decoder the images that do not decode.
    assert s["rejects_found_by"]["decoder"] == {"decode_error": 3, "not_jpeg": 3, "truncated_scan": 3}
    assert (
        "decode_error" not in s["rejects_found_by"]["index"]
        and s["rejects_found_by"]["index"]["orphan_jpg"] == 3
    )
    assert summary["expected_rejects"] == s["rejects"]  # what sample_data planted, found without arithmetic


def test_folder_input_gives_the_same_artifact(reference, archives, tmp_path):
    extracted = tmp_path / "extracted"
    for tar_path in sorted(archives[0].glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            tar.extractall(extracted / tar_path.stem, filter="data")
    cfg, layout = load(tiny_config(tmp_path, extracted))
    assert pipeline.execute(cfg) == 0
    a, b = read_artifact(Layout(reference).output), read_artifact(layout.output)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != "images/offset":  # byte offsets exist only inside archives
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_complete_output_is_not_redone(reference, archives, tmp_path):
    import shutil

    shutil.copytree(Layout(reference).output.parent, tmp_path / "out")
    cfg, layout = load(tiny_config(tmp_path, archives[0]))
    before = layout.output.stat().st_mtime_ns
    assert pipeline.execute(cfg) == 0
    assert layout.output.stat().st_mtime_ns == before
    assert "is complete; nothing to do" in layout.log.read_text()


def test_input_errors(tmp_path):
    cfg, layout = load(tiny_config(tmp_path, tmp_path / "missing"))
    assert pipeline.execute(cfg) == Exit.INPUT
    assert not layout.output.parent.exists()  # refused before anything was written
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    with tarfile.open(only_bad / "0001.tar", "w") as tar:
        tar.add(__file__, arcname="0001/x.txt")
    cfg, layout = load(tiny_config(tmp_path, only_bad, name="b.yaml", hdf5_path=str(tmp_path / "b" / "b.h5")))
    assert pipeline.execute(cfg) == Exit.INPUT
    assert "no valid image/metadata pair" in layout.log.read_text()


def test_pretrained_weights_never_fall_back_to_random(archives, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg, layout = load(tiny_config(tmp_path, archives[0], pretrained=True))
    assert pipeline.execute(cfg) == Exit.MODEL
    assert not layout.output.parent.exists()  # found before indexing: nothing was done or written


def test_local_safetensors_weights_are_loaded_for_real(archives, tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from building_image_triplet_model.engine.embed import backbone, decode

    torch.manual_seed(123)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=0).eval()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg, layout = load(tiny_config(tmp_path, archives[0], pretrained=True, weights_path=str(weights)))
    assert pipeline.execute(cfg) == 0
    resolved = preflight.resolve(cfg)
    assert resolved.weights_file == str(weights) and resolved.identity.weights.startswith("sha256:")
    bb = backbone.load(cfg, resolved)
    with h5py.File(layout.output) as f:
        row = int(f["images/valid_indices"][0])
        src = int(f["images/source"][row])
        name = f["sources/name"][src].decode()
        path, offset, size = f["images/path"][row], f["images/offset"][row], f["images/size"][row]
        stored = f["backbone_embeddings"][row]
    data = ImageReader([str(archives[0] / f"{name}.tar")], [True]).read(0, path, int(offset), int(size))
    pixels, _ = decode.decode(data, decode.Transform.from_identity(bb.identity))
    mean = torch.tensor(bb.identity.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(bb.identity.std).view(1, 3, 1, 1) * 255
    x = (torch.as_tensor(pixels.copy())[None].permute(0, 3, 1, 2).float() - mean) / std
    with torch.inference_mode():
        expected = model(x)[0].numpy()
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)


def test_transform_matches_timms_eval_transform(archives):
    import io

    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    from building_image_triplet_model.engine import identity
    from building_image_triplet_model.engine.embed import decode

    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=0)
    dc = resolve_model_data_config(model)
    dc["input_size"] = (3, 64, 64)
    ident = identity.ModelIdentity(
        "m",
        "random",
        (3, 64, 64),
        dc["interpolation"],
        dc["crop_pct"],
        tuple(dc["mean"]),
        tuple(dc["std"]),
        False,
        "fp32",
        "cpu",
        "float32",
    )
    with tarfile.open(archives[0] / "0003.tar") as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith("1.jpg"))
        data = tar.extractfile(jpg).read()
    theirs = create_transform(**dc, is_training=False)(Image.open(io.BytesIO(data)).convert("RGB"))
    pixels, _ = decode.decode(data, decode.Transform.from_identity(ident))
    mean = torch.tensor(dc["mean"]).view(3, 1, 1)
    std = torch.tensor(dc["std"]).view(3, 1, 1)
    ours = (torch.as_tensor(pixels.copy()).permute(2, 0, 1).float() / 255.0 - mean) / std
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    fast, _ = decode.decode(
        data,
        decode.Transform.from_identity(
            identity.ModelIdentity(
                **{
                    **ident.as_dict(),
                    "input_size": (3, 64, 64),
                    "mean": ident.mean,
                    "std": ident.std,
                    "fast_decode": True,
                }
            )
        ),
    )
    assert np.abs(fast.astype(int) - pixels.astype(int)).mean() < 4  # DCT-domain downscale: close


def test_fixed_size_vit_at_another_image_size(tmp_path):
    import torch

    from building_image_triplet_model.engine.embed import backbone

    cfg = config.from_mapping(
        {
            "input_dir": "i",
            "hdf5_path": str(tmp_path / "o.h5"),
            "feature_model": "test_vit.r160_in1k",
            "image_size": 32,
            "pretrained": False,
            "device": "cpu",
        }
    )
    bb = backbone.load(cfg, preflight.resolve(cfg))
    assert bb.identity.input_size == (3, 32, 32)
    with torch.inference_mode():
        assert bb.model(torch.zeros(2, 3, 32, 32)).shape == (2, bb.output_size)


def test_resume_embeds_only_what_is_missing_without_reading_the_rest(archives, tmp_path, monkeypatch):
    cfg, layout = load(tiny_config(tmp_path, archives[0]))
    stop = threading.Event()
    chunks: list[str] = []

    def on_chunk(ctx, work):
        chunks.append(work.name)
        if len(chunks) == 3:
            stop.set()

    assert pipeline.execute(cfg, stop=stop, hooks=Hooks(on_chunk=on_chunk)) == Exit.INTERRUPTED
    from building_image_triplet_model.engine import index
    from building_image_triplet_model.io import durable

    cache = index.load_cache(layout)
    plan = durable.read_npz(layout.plan)
    done = {}
    for store in layout.emb_root.glob("*/*-*"):
        rows = np.concatenate([durable.read_npz(p)["rows"] for p in store.glob("*-*.npz")])
        done[store.name.rsplit("-", 1)[0]] = set(rows.tolist())
    assert 0 < sum(map(len, done.values())) < len(plan["rows"])
    reads = []
    original = ImageReader.read

    def spy(self, source, rel_path, offset, size):
        reads.append((source, offset))
        return original(self, source, rel_path, offset, size)

    monkeypatch.setattr(ImageReader, "read", spy)
    assert pipeline.execute(cfg) == 0
    names = [n.decode() for n in cache["source_names"]]
    first = np.cumsum([0] + [int((cache["source_idx"] == s).sum()) for s in range(len(names))])
    done_offsets = {
        (s, int(cache["offset"][first[s] + r])) for s, n in enumerate(names) for r in done.get(n, ())
    }
    assert reads and done_offsets.isdisjoint(reads)
    assert len(reads) + len(done_offsets) == len(plan["rows"])
    s = stats(layout)
    assert s["images_embedded"] == len(reads) and s["images_reused"] == len(done_offsets)


def test_processor_help_lists_exit_codes():
    out = run_cli("dataset_processor", "--help")
    assert out.returncode == 0 and "75  interrupted" in out.stdout and "--fresh" in out.stdout
    assert "--discard-embeddings" in out.stdout and "--follow" in out.stdout
    bad = run_cli("dataset_processor", "--config", "/nonexistent.yaml")
    assert bad.returncode == 2 and "/nonexistent.yaml" in bad.stderr
