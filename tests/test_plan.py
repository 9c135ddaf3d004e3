import numpy as np

from building_image_triplet_model import config, plan, records


def fake_index(n_targets, datasets=(3, 4), seed=0, per_target=3):
    rng = np.random.default_rng(seed)
    rows = []
    for d in datasets:
        for t in range(1, n_targets + 1):
            lat, lon = 40.7 + rng.uniform(-0.05, 0.05), -74.0 + rng.uniform(-0.05, 0.05)
            rows += [(d, t, lat, lon)] * per_target
    arr = np.array(rows)
    return {
        "DatasetID": arr[:, 0].astype(np.int64),
        "TargetID": arr[:, 1].astype(np.int64),
        "target_lat": arr[:, 2],
        "target_lon": arr[:, 3],
        "source_idx": np.repeat(np.arange(len(datasets)), n_targets * per_target).astype(np.int32),
        "source_names": np.array([f"{d:04d}".encode() for d in datasets]),
    }


def cfg(**kw):
    return config.from_mapping({"input_dir": "i", "hdf5_path": "o.h5", **kw})


def test_splits_are_per_target_deterministic_and_near_70_15_15():
    idx = fake_index(2000)
    a, b = plan.make_plan(idx, cfg()), plan.make_plan(idx, cfg())
    np.testing.assert_array_equal(a["target_split"], b["target_split"])
    frac = np.bincount(a["target_split"], minlength=3) / len(a["target_split"])
    tol = plan.expected_fraction_error(len(a["target_split"]))
    assert abs(frac[0] - 0.70) < tol and abs(frac[1] - 0.15) < tol and abs(frac[2] - 0.15) < tol
    c = plan.make_plan(idx, cfg(seed=7))
    assert (c["target_split"] != a["target_split"]).any()


def test_adding_an_archive_moves_no_existing_target():
    small = plan.make_plan(fake_index(300, datasets=(3, 4)), cfg())
    big = plan.make_plan(fake_index(300, datasets=(3, 4, 9)), cfg())
    before = dict(zip(small["target_keys"].tolist(), small["target_split"].tolist(), strict=True))
    after = dict(zip(big["target_keys"].tolist(), big["target_split"].tolist(), strict=True))
    assert all(after[k] == v for k, v in before.items())


def test_keys_separate_datasets_with_the_same_target_id():
    p = plan.make_plan(fake_index(10), cfg())
    assert len(p["target_keys"]) == 20
    assert records.target_key(3, 5) in p["target_keys"] and records.target_key(4, 5) in p["target_keys"]


def test_cell_strategy_keeps_every_cell_in_one_split():
    idx = fake_index(3000)
    c = cfg(split_strategy="cell", split_cell_m=300.0)
    p = plan.make_plan(idx, c)
    cells = plan.cell_ids(p["target_lat"], p["target_lon"], 300.0)
    for cell in np.unique(cells):
        assert len(np.unique(p["target_split"][cells == cell])) == 1
    assert len(np.unique(p["target_split"])) == 3


def test_n_samples_and_n_images_choose_whole_targets_stably():
    idx = fake_index(500)
    p = plan.make_plan(idx, cfg(n_samples=100))
    assert len(p["target_keys"]) == 100 and len(p["rows"]) == 300
    bigger = plan.make_plan(fake_index(500, datasets=(3, 4, 9)), cfg(n_samples=100))
    assert len(set(p["target_keys"]) & set(bigger["target_keys"])) > 50  # mostly the same targets
    q = plan.make_plan(idx, cfg(n_images=100))
    assert len(q["rows"]) == 99  # 33 whole targets of 3 images
    assert np.all(np.diff(q["rows"]) > 0)  # rows stay in (source, stem) order


def test_row_ranges_per_source():
    p = plan.make_plan(fake_index(10, datasets=(3, 4, 9)), cfg())
    assert p["src_start"].tolist() == [0, 30, 60, 90]
