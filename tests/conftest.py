"""Session fixtures for the engine tests (helpers live in engine_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import make_archives, tiny_config

from building_image_triplet_model import config


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Three real archives (640x640 JPEGs) with one of every bad kind planted in each. Read-only."""
    out = tmp_path_factory.mktemp("archives")
    summary = make_archives(out)
    return out, summary


@pytest.fixture(scope="session")
def reference(archives: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> config.DataConfig:
    """An uninterrupted in-process run over the sample archives: the artifact every other run must equal."""
    from building_image_triplet_model.engine import pipeline

    tmp = tmp_path_factory.mktemp("reference")
    cfg = config.load(tiny_config(tmp, archives[0]))
    assert pipeline.execute(cfg) == 0
    return cfg
