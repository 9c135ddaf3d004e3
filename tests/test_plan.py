"""plan.py: which rows the artifact holds and each target's split, as pure hashed functions of the index."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from building_image_triplet_model import config
from building_image_triplet_model.engine import plan
from building_image_triplet_model.inputs import records


def fake_index(
    n_targets: int,
    datasets: tuple[int, ...] = (3, 4),
    seed: int = 0,
    first_target: int = 1,
    spread: float = 0.05,
) -> dict[str, np.ndarray]:
    """An index in (source, stem) order: each dataset one source, each target 1 to 5 images."""
    rows: list[tuple[int, int, float, float, int]] = []
    for s, d in enumerate(datasets):
        rng = np.random.default_rng([seed, d])
        for t in range(first_target, first_target + n_targets):
            lat, lon = 40.7 + rng.uniform(-spread, spread), -74.0 + rng.uniform(-spread, spread)
            rows += [(d, t, lat, lon, s)] * int(rng.integers(1, 6))
    return {
        "DatasetID": np.array([r[0] for r in rows], np.int64),
        "TargetID": np.array([r[1] for r in rows], np.int64),
        "target_lat": np.array([r[2] for r in rows]),
        "target_lon": np.array([r[3] for r in rows]),
        "source_idx": np.array([r[4] for r in rows], np.int32),
        "source_names": np.array([f"{d:04d}".encode() for d in datasets]),
    }


def concat(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Index b's sources appended after a's."""
    out = {k: np.concatenate([a[k], b[k]]) for k in a}
    out["source_idx"] = np.concatenate([a["source_idx"], b["source_idx"] + len(a["source_names"])])
    return out


def cfg(**kw: Any) -> config.DataConfig:
    return config.from_mapping({"input_dir": "i", "hdf5_path": "o.h5", **kw})


def splits_by_key(p: dict[str, np.ndarray]) -> dict[int, int]:
    return dict(zip(p["target_keys"].tolist(), p["target_split"].tolist(), strict=True))


def keys_of(index: dict[str, np.ndarray]) -> np.ndarray:
    return records.target_key(index["DatasetID"], index["TargetID"])


# --------------------------------------------------------------------------------------- determinism
def test_the_plan_is_a_function_of_the_index_and_the_seed() -> None:
    idx = fake_index(400)
    a, b = plan.make_plan(idx, cfg(seed=3)), plan.make_plan(idx, cfg(seed=3))
    assert (
        sorted(a)
        == sorted(b)
        == [
            "rows",
            "src_start",
            "target_images",
            "target_keys",
            "target_lat",
            "target_lon",
            "target_split",
        ]
    )
    for key in a:
        assert a[key].dtype == b[key].dtype
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other = plan.make_plan(idx, cfg(seed=4))
    assert (other["target_split"] != a["target_split"]).mean() > 0.2  # another seed, other splits
    sub_a = plan.make_plan(idx, cfg(seed=3, n_samples=50))["target_keys"]
    sub_b = plan.make_plan(idx, cfg(seed=4, n_samples=50))["target_keys"]
    assert len(np.intersect1d(sub_a, sub_b)) < 30  # and another subset


def test_the_target_table() -> None:
    idx = fake_index(30)
    p = plan.make_plan(idx, cfg())
    keys = keys_of(idx)
    uniq, counts = np.unique(keys, return_counts=True)
    np.testing.assert_array_equal(p["target_keys"], uniq)  # sorted by key
    np.testing.assert_array_equal(p["target_images"], counts)
    assert p["target_images"].dtype == np.int32 and p["target_split"].dtype == np.int8
    assert p["target_lat"].dtype == np.float64
    assert np.all(np.diff(keys) >= 0)
    first = np.searchsorted(keys, uniq)
    np.testing.assert_array_equal(p["target_lat"], idx["target_lat"][first])
    np.testing.assert_array_equal(p["rows"], np.arange(len(keys)))  # everything, in index order
    assert p["src_start"].tolist() == [0, int((idx["source_idx"] == 0).sum()), len(keys)]
    # Same TargetID in two datasets: two targets.
    assert records.target_key(3, 5) in p["target_keys"] and records.target_key(4, 5) in p["target_keys"]
    for s, name in enumerate(plan.SPLITS):
        pos = plan.split_targets(p, name)
        assert np.all(p["target_split"][pos] == s)
        assert np.all(np.diff(p["target_keys"][pos]) > 0)  # sorted by key
    assert sum(len(plan.split_targets(p, s)) for s in plan.SPLITS) == len(uniq)


def test_summary() -> None:
    p = plan.make_plan(fake_index(20, datasets=(3, 4, 9)), cfg())
    s = plan.summary(p, ["0003", "0004", "0009"])
    assert s["images"] == len(p["rows"]) and s["targets"] == 60
    assert sum(s["targets_per_split"].values()) == 60
    assert list(s["source_rows"]) == ["0003", "0004", "0009"]
    assert sum(s["source_rows"].values()) == len(p["rows"])
    assert plan.source_counts(p) == list(s["source_rows"].values())


# ----------------------------------------------------------------------------------- growing the input
def test_adding_targets_never_moves_an_existing_target() -> None:
    small = fake_index(300, datasets=(3, 4))
    more_archives = concat(small, fake_index(300, datasets=(9, 12), seed=1))
    more_targets = concat(small, fake_index(200, datasets=(3,), first_target=301, seed=2))
    for strategy in ("target", "cell"):
        c = cfg(split_strategy=strategy, split_cell_m=400.0)
        before = splits_by_key(plan.make_plan(small, c))
        for bigger in (more_archives, more_targets):
            after = splits_by_key(plan.make_plan(bigger, c))
            assert len(after) > len(before)
            assert {k: after[k] for k in before} == before, strategy


def hashed_order(keys: np.ndarray, seed: int) -> np.ndarray:
    return keys[np.argsort(plan.hash01(keys, seed, plan._SALT_SELECT), kind="stable")]


def test_n_samples_is_a_stable_subset_when_targets_are_added() -> None:
    small = fake_index(300, datasets=(3, 4))
    bigger = concat(small, fake_index(300, datasets=(9,), seed=1))
    c = cfg(n_samples=100)
    sel_small = set(plan.make_plan(small, c)["target_keys"].tolist())
    sel_big = set(plan.make_plan(bigger, c)["target_keys"].tolist())
    assert len(sel_small) == len(sel_big) == 100
    old = set(np.unique(keys_of(small)).tolist())
    # No target that was left out comes in: the old targets kept are a subset of the old selection ...
    assert sel_big & old <= sel_small
    # ... and they are dropped only to make room for new ones ranked before them.
    new_in = sel_big - old
    assert len(sel_small - sel_big) == len(new_in)
    order = hashed_order(np.array(sorted(sel_small | new_in)), 0).tolist()
    assert set(order[:100]) == sel_big
    # When the new targets all rank after the selection, the selection is exactly the same.
    cut = plan.hash01(np.array(sorted(sel_small)), 0, plan._SALT_SELECT).max()
    extra = fake_index(300, datasets=(9,), seed=1)
    late = plan.hash01(keys_of(extra), 0, plan._SALT_SELECT) > cut
    assert 0 < late.sum() < len(late)
    only_late = {k: v[late] for k, v in extra.items() if k != "source_names"}
    only_late["source_names"] = extra["source_names"]
    assert set(plan.make_plan(concat(small, only_late), c)["target_keys"].tolist()) == sel_small
    # Selected whole: every image of a selected target is in the rows.
    p = plan.make_plan(small, c)
    keys = keys_of(small)
    assert len(p["rows"]) == int(np.isin(keys, p["target_keys"]).sum())
    assert set(keys[p["rows"]].tolist()) == sel_small


def test_n_samples_as_large_as_the_input_keeps_everything() -> None:
    idx = fake_index(50)
    p = plan.make_plan(idx, cfg(n_samples=10_000))
    np.testing.assert_array_equal(p["rows"], np.arange(len(idx["DatasetID"])))


def test_n_images_keeps_whole_targets() -> None:
    idx = fake_index(200)
    keys = keys_of(idx)
    for limit in (1, 7, 100, 333):
        p = plan.make_plan(idx, cfg(n_images=limit))
        selected = p["target_keys"]
        assert len(p["rows"]) <= limit
        # Every image of a selected target, none of the others.
        np.testing.assert_array_equal(p["rows"], np.flatnonzero(np.isin(keys, selected)))
        assert int(p["target_images"].sum()) == len(p["rows"])
        # The targets are a prefix of the hashed order: the next one would not have fitted.
        order = hashed_order(np.unique(keys), 0)
        n = len(selected)
        assert set(order[:n].tolist()) == set(selected.tolist())
        if n < len(order):
            nxt = int((keys == order[n]).sum())
            assert len(p["rows"]) + nxt > limit
        assert np.all(np.diff(p["rows"]) > 0)  # rows stay in (source, stem) order
    # n_images with n_samples: the images of at most n_samples targets.
    both = plan.make_plan(idx, cfg(n_samples=20, n_images=10_000))
    assert len(both["target_keys"]) == 20


# ------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize(("val", "test"), [(0.15, 0.15), (0.1, 0.25), (0.0, 0.3)])
def test_split_fractions_are_within_the_expected_error(val: float, test: float) -> None:
    idx = fake_index(2500)
    p = plan.make_plan(idx, cfg(val_size=val, test_size=test))
    n = len(p["target_split"])
    frac = np.bincount(p["target_split"], minlength=3) / n
    tol = plan.expected_fraction_error(n)
    assert tol == pytest.approx(3 * np.sqrt(0.25 / n))
    assert abs(frac[0] - (1 - val - test)) < tol
    assert abs(frac[1] - val) < tol
    assert abs(frac[2] - test) < tol
    if val == 0.0:
        assert frac[1] == 0.0


def test_cell_strategy_puts_every_target_of_a_cell_in_one_split() -> None:
    idx = fake_index(2000, spread=0.1)
    p = plan.make_plan(idx, cfg(split_strategy="cell", split_cell_m=300.0))
    cells = plan.cell_ids(p["target_lat"], p["target_lon"], 300.0)
    uniq, inverse = np.unique(cells, return_inverse=True)
    assert len(uniq) < len(cells)  # cells do hold several targets
    for c in range(len(uniq)):
        assert len(np.unique(p["target_split"][inverse == c])) == 1
    assert len(np.unique(p["target_split"])) == 3
    # The splits follow the cells, not the targets: per-target hashing would split these cells.
    per_target = plan.make_plan(idx, cfg())
    assert any(len(np.unique(per_target["target_split"][inverse == c])) > 1 for c in range(len(uniq)))


def test_cell_ids_are_about_the_cell_size() -> None:
    lat = np.full(200, 40.0)
    lon = -74.0 + np.arange(200) * (10.0 / (111_320.0 * np.cos(np.radians(40.0))))  # 10 m steps east
    cells = plan.cell_ids(lat, lon, 500.0)
    runs = np.flatnonzero(np.diff(cells)) + 1
    widths = np.diff(runs)
    assert np.all(np.abs(widths - 50) <= 1)  # 500 m of 10 m steps
    north = plan.cell_ids(40.0 + np.arange(200) * (10.0 / 111_320.0), np.full(200, -74.0), 500.0)
    assert np.all(np.abs(np.diff(np.flatnonzero(np.diff(north)) + 1) - 50) <= 1)


# -------------------------------------------------------------------------------------------- sources
def test_source_rows_are_each_archives_own_rows() -> None:
    idx = fake_index(60, datasets=(3, 4, 9))
    p = plan.make_plan(idx, cfg(n_samples=40))
    per_source = np.bincount(idx["source_idx"], minlength=3)
    first = np.concatenate([[0], np.cumsum(per_source)])
    held = []
    for s in range(3):
        local = plan.source_rows(p, first, s)
        assert np.all((local >= 0) & (local < per_source[s]))
        assert np.all(np.diff(local) > 0)
        mine = p["rows"][idx["source_idx"][p["rows"]] == s]
        np.testing.assert_array_equal(local, mine - first[s])
        held.append(local + first[s])
        assert p["src_start"][s + 1] - p["src_start"][s] == len(local)
    np.testing.assert_array_equal(np.concatenate(held), p["rows"])
    assert plan.source_counts(p) == [len(h) for h in held]
    assert sum(plan.source_counts(p)) == len(p["rows"]) < len(idx["DatasetID"])


def test_an_archive_without_a_selected_row() -> None:
    idx = concat(fake_index(40, datasets=(3,)), fake_index(1, datasets=(4,), seed=5))
    p = plan.make_plan(idx, cfg(n_samples=5))
    counts = plan.source_counts(p)
    assert len(counts) == 2 and sum(counts) == len(p["rows"])
    first = np.array([0, int((idx["source_idx"] == 0).sum()), len(idx["DatasetID"])])
    for s in range(2):
        assert len(plan.source_rows(p, first, s)) == counts[s]
