"""What is done and what remains, read one way: the steps (engine/steps.py) and the status report
(report/status.py) both call these, so the report cannot disagree with what the next run does."""

from __future__ import annotations

from typing import Any

import numpy as np

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.engine import identity, plan
from building_image_triplet_model.io import durable
from building_image_triplet_model.io.workdir import Layout


def plan_key(cfg: DataConfig, names: list[str], markers: dict[str, Any]) -> str:
    """The key of the plan these archives (their index markers, in order) and this config make."""
    return identity.plan_key(cfg, identity.inputs_key([(n, markers[n]["digest"]) for n in names]))


def stored_plan(layout: Layout, key: str) -> dict[str, np.ndarray] | None:
    """The stored plan when its marker holds ``key``, else None. Raises CorruptFileError."""
    recorded = durable.read_json(layout.plan_json) or {}
    if recorded.get("key") == key and layout.plan.exists():
        return durable.read_npz(layout.plan)
    return None


def rows_needed(p: dict[str, np.ndarray], names: list[str], markers: dict[str, Any], s: int) -> np.ndarray:
    """The rows of archive ``s``'s own index that the plan ``p`` puts in the artifact."""
    first = np.cumsum([0] + [int(markers[n]["images"]) for n in names])
    return plan.source_rows(p, first, s)
