import json
import shutil
import tarfile
import threading

import h5py
import numpy as np
import yaml
from engine_helpers import read_artifact, run_cli, tiny_config

from building_image_triplet_model import config, geo_knn, pipeline, preprocess_resume
from building_image_triplet_model.decode import ImageReader


def test_trainer_contract(reference):
    """Open the artifact as the trainer does (hdf5-contract.md) and check every name and invariant."""
    with h5py.File(reference.output, "r") as f:
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
        bad = {i for i, s in enumerate(stems) if "_bad_not_jpeg" in s or "_bad_decode_error" in s}
        assert len(bad) == 6 and bad.isdisjoint(valid.tolist()) and len(valid) == n - 6
        for i in sorted(bad):
            assert not emb[i].any()
        for i in valid[:20]:
            assert np.abs(emb[int(i)]).sum() > 0  # read row by row, as the trainer does
        assert f.attrs["feature_model"] == reference.feature_model and f.attrs["image_size"] == 32
        assert json.loads(f.attrs["settings"])["knn_k"] == reference.knn_k


def test_rejects_report_lists_every_planted_item(reference, archives):
    _, summary = archives
    lines = reference.rejects_path.read_text().splitlines()
    assert lines[0] == "source\tpath\treason\tdetail"
    rows = [line.split("\t") for line in lines[1:]]
    for item in summary["planted"]:
        reasons = {r[2] for r in rows if r[0] == item["archive"] and f"/{item['stem']}." in r[1]}
        assert reasons == {item["kind"]}, item
    stats = json.loads(reference.stats_path.read_text())
    assert stats["rejects"]["duplicate_stem"] == 12 and stats["rejects"]["decode_error"] == 3


def test_folder_input_gives_the_same_artifact(reference, archives, tmp_path):
    extracted = tmp_path / "extracted"
    for tar_path in sorted(archives[0].glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            tar.extractall(extracted / tar_path.stem, filter="data")
    cfg = config.load(tiny_config(tmp_path, extracted))
    assert pipeline.execute(cfg) == 0
    a, b = read_artifact(reference.output), read_artifact(cfg.output)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != "images/offset":  # byte offsets exist only inside archives
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def clone_output(reference, tmp_path, archives_dir, **overrides):
    shutil.copytree(reference.output.parent, tmp_path / "out")
    return tiny_config(tmp_path, archives_dir, **overrides)


def test_complete_output_is_not_redone(reference, archives, tmp_path):
    cfg = config.load(clone_output(reference, tmp_path, archives[0]))
    before = cfg.output.stat().st_mtime_ns
    assert pipeline.execute(cfg) == 0
    assert cfg.output.stat().st_mtime_ns == before


def test_other_settings_are_refused_then_fresh_restarts(reference, archives, tmp_path):
    cfg = config.load(clone_output(reference, tmp_path, archives[0], image_size=48))
    shard = cfg.work / "index" / "0003.npz"
    indexed = shard.stat().st_mtime_ns
    assert preprocess_resume.collect(cfg)["next_run"].startswith("refuse to resume: the config's settings")
    assert pipeline.execute(cfg) == pipeline.EXIT_REFUSED
    assert "image_size: 32 -> 48" in cfg.log_path.read_text() and "--fresh" in cfg.log_path.read_text()
    assert pipeline.execute(cfg, fresh=True) == 0
    assert shard.stat().st_mtime_ns == indexed  # index shards survive --fresh
    with h5py.File(cfg.output) as f:
        assert f.attrs["image_size"] == 48


def test_changed_input_set_is_refused(reference, archives, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(archives[0], inputs)
    from building_image_triplet_model import sample_data

    sample_data.write_archive(sample_data.Options(out=inputs, targets_per_archive=3), 3, [])
    cfg = config.load(clone_output(reference, tmp_path, inputs))
    assert pipeline.execute(cfg) == pipeline.EXIT_REFUSED
    assert "added ['0012']" in cfg.log_path.read_text()
    report = preprocess_resume.collect(cfg)
    assert report["inputs_match"] is False and report["next_run"].startswith("refuse to resume: the input")


def test_input_errors(tmp_path):
    cfg = config.load(tiny_config(tmp_path, tmp_path / "missing"))
    assert pipeline.execute(cfg) == pipeline.EXIT_INPUT
    assert f"{tmp_path / 'missing'}: input_dir does not exist" in cfg.log_path.read_text()
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    with tarfile.open(only_bad / "0001.tar", "w") as tar:
        tar.add(__file__, arcname="0001/x.txt")
    cfg = config.load(tiny_config(tmp_path, only_bad, name="b.yaml", hdf5_path=str(tmp_path / "b" / "b.h5")))
    assert pipeline.execute(cfg) == pipeline.EXIT_INPUT
    assert "no valid image/metadata pair" in cfg.log_path.read_text()
    assert "0001/x.txt\torphan_txt" in cfg.rejects_path.read_text()


def test_pretrained_weights_never_fall_back_to_random(archives, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = config.load(tiny_config(tmp_path, archives[0], pretrained=True))
    assert pipeline.execute(cfg) == pipeline.EXIT_MODEL
    assert "rather than continue with random weights" in cfg.log_path.read_text()
    assert not cfg.output.exists() and (cfg.work / "knn" / "train" / "_SUCCESS.json").exists()


def test_local_safetensors_weights_are_loaded_for_real(archives, tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from building_image_triplet_model import backbone, decode

    torch.manual_seed(123)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=0).eval()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg = config.load(tiny_config(tmp_path, archives[0], pretrained=True, weights_path=str(weights)))
    assert pipeline.execute(cfg) == 0
    bb = backbone.load(cfg)
    assert bb.weights == str(weights)
    with h5py.File(cfg.output) as f:
        row = int(f["images/valid_indices"][0])
        path, offset, size = f["images/path"][row], f["images/offset"][row], f["images/size"][row]
        stored = f["backbone_embeddings"][row]
    data = ImageReader([str(archives[0] / "0003.tar")], [True]).read(0, path, int(offset), int(size))
    pixels, _ = decode.decode(data, decode.Transform.from_data_config(bb.data_config, True))
    mean, std = backbone.normalizer(bb)
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

    from building_image_triplet_model import decode

    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=0)
    data_config = resolve_model_data_config(model)
    data_config["input_size"] = (3, 64, 64)
    with tarfile.open(archives[0] / "0003.tar") as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith("1.jpg"))
        data = tar.extractfile(jpg).read()
    theirs = create_transform(**data_config, is_training=False)(Image.open(io.BytesIO(data)).convert("RGB"))
    pixels, _ = decode.decode(data, decode.Transform.from_data_config(data_config, fast_decode=False))
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    ours = (torch.as_tensor(pixels.copy()).permute(2, 0, 1).float() / 255.0 - mean) / std
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    fast, _ = decode.decode(data, decode.Transform.from_data_config(data_config, fast_decode=True))
    assert np.abs(fast.astype(int) - pixels.astype(int)).mean() < 4  # DCT-domain downscale: close


def test_fixed_size_vit_at_another_image_size(tmp_path):
    import torch

    from building_image_triplet_model import backbone

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
    bb = backbone.load(cfg)
    assert bb.data_config["input_size"] == (3, 32, 32)
    with torch.inference_mode():
        assert bb.model(torch.zeros(2, 3, 32, 32)).shape == (2, bb.output_size)


def test_resume_skips_completed_rows_without_reading_them(archives, tmp_path, monkeypatch):
    cfg = config.load(tiny_config(tmp_path, archives[0]))
    stop = threading.Event()
    chunks = []

    def hooks(runner):
        def on_chunk(work, a, b):
            chunks.append((work.name, a, b))
            if len(chunks) == 3:
                stop.set()

        runner.on_chunk = on_chunk

    assert pipeline.execute(cfg, stop=stop, hooks=hooks) == pipeline.EXIT_INTERRUPTED
    report = preprocess_resume.collect(cfg)
    assert report["steps"]["embed"]["status"] == "in progress" and not report["complete"]
    assert report["next_run"].startswith("continue at embed")
    done_offsets = set()
    with h5py.File(tmp_path / "peek.h5", "w"):
        pass
    from building_image_triplet_model import index, workdir

    cache = index.load_cache(cfg.work)
    plan = workdir.read_npz(cfg.work / "plan.npz")
    names = [n.decode() for n in cache["source_names"]]
    for name, a, b in chunks:
        s = names.index(name)
        rows = plan["rows"][plan["src_start"][s] + a : plan["src_start"][s] + b]
        done_offsets |= {(s, int(o)) for o in cache["offset"][rows]}
    reads = []
    original = ImageReader.read

    def spy(self, source, rel_path, offset, size):
        reads.append((source, offset))
        return original(self, source, rel_path, offset, size)

    monkeypatch.setattr(ImageReader, "read", spy)
    assert pipeline.execute(cfg) == 0
    assert reads and done_offsets.isdisjoint(reads)
    assert len(reads) + len(done_offsets) == len(plan["rows"])


def test_status_report_is_read_only_and_exit_codes(reference, archives, tmp_path):
    cfg_path = tiny_config(tmp_path, archives[0])
    absent = run_cli("preprocess_resume", "--config", str(cfg_path), "--json")
    assert absent.returncode == 10, absent.stderr
    report = json.loads(absent.stdout)
    assert report["steps"]["index"]["status"] == "pending" and report["next_run"].startswith("start at index")
    assert not (tmp_path / "out").exists()  # nothing created
    done_cfg = tmp_path / "done.yaml"
    done_cfg.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "input_dir": reference.input_dir,
                    "hdf5_path": reference.hdf5_path,
                    **{
                        k: v
                        for k, v in yaml.safe_load(cfg_path.read_text())["data"].items()
                        if k not in ("input_dir", "hdf5_path")
                    },
                }
            }
        )
    )
    snapshot = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in reference.output.parent.rglob("*")}
    done = run_cli("preprocess_resume", "--config", str(done_cfg))
    assert done.returncode == 0, done.stderr
    assert "[COMPLETE]" in done.stdout and "rejects: decode_error=3" in done.stdout
    assert {
        p: (p.stat().st_mtime_ns, p.stat().st_size) for p in reference.output.parent.rglob("*")
    } == snapshot
    helped = run_cli("preprocess_resume", "--help")
    assert helped.returncode == 0 and "work remains" in helped.stdout


def test_processor_help_lists_exit_codes():
    out = run_cli("dataset_processor", "--help")
    assert out.returncode == 0 and "75  interrupted" in out.stdout and "--fresh" in out.stdout
    bad = run_cli("dataset_processor", "--config", "/nonexistent.yaml")
    assert bad.returncode == 2 and "/nonexistent.yaml" in bad.stderr
