"""The one typed object every step takes: what the run is, and what the steps so far have found."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.inputs.sources import Source
from building_image_triplet_model.io.progress import Progress
from building_image_triplet_model.io.workdir import Layout

if TYPE_CHECKING:
    import numpy as np

    from building_image_triplet_model.engine.embed.backbone import Backbone
    from building_image_triplet_model.engine.embed.loader import Work
    from building_image_triplet_model.engine.preflight import Resolved

Mode = Literal["single", "worker", "merge"]


@dataclass
class Hooks:
    """Where a scale-out worker publishes its shards, and where benchmarks watch (all optional)."""

    on_start: Callable[[RunContext], None] | None = None  # the run holds its lock; nothing done yet
    after_index: Callable[[RunContext, list[str]], None] | None = None  # these archives are indexed
    on_chunk: Callable[[RunContext, Work], None] | None = None  # a chunk of an archive's store is on disk
    on_store_done: Callable[[RunContext, Work], None] | None = None  # an archive has nothing left to embed
    on_batch: Callable[[int], None] | None = None  # a batch of n images is embedded
    on_finish: Callable[[RunContext], None] | None = None  # the run's steps are all done


@dataclass
class Counts:
    images_embedded: int = 0  # by this run
    images_reused: int = 0  # needed by this run and already in a store


@dataclass
class RunContext:
    cfg: DataConfig
    layout: Layout
    stop: threading.Event
    progress: Progress
    mode: Mode = "single"
    task: tuple[int, int] | None = None
    follow: bool = False  # wait for the manifest's archives as they arrive (downloads in progress)
    resolved: Resolved | None = None  # the preflight's device, model and weights (None for a merge)
    model_key: str = ""  # the embedding stores of this run
    hooks: Hooks = field(default_factory=Hooks)
    counts: Counts = field(default_factory=Counts)
    # Filled in by the steps, in order.
    names: list[str] = field(default_factory=list)  # every archive of the run (a worker: its share)
    sources: dict[str, Source] = field(default_factory=dict)  # the ones present here
    markers: dict[str, dict[str, Any]] = field(default_factory=dict)  # their index markers
    cache: Any = None  # the merged index (durable.LazyNpz)
    plan: dict[str, np.ndarray] | None = None
    plan_key: str = ""
    knn_key: str = ""
    knn_ks: dict[str, int] = field(default_factory=dict)  # k per split
    audited: set[str] = field(default_factory=set)  # archives whose store was checked this run (steps.py)
    _backbone: Backbone | None = field(default=None, repr=False)
    _loader: threading.Thread | None = field(default=None, repr=False)
    _load_error: BaseException | None = field(default=None, repr=False)

    def reset(self) -> None:
        """Forget what the steps found (after a corrupt file was moved aside: they look again)."""
        self.markers, self.cache, self.plan, self.audited = {}, None, None, set()
        self.counts = Counts()

    # ---- the model: loaded once, in the background while cheap steps run
    def prefetch_model(self) -> None:
        if self._backbone is None and self._loader is None and self.resolved is not None:
            self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        from building_image_triplet_model.engine.embed import backbone

        try:
            self._backbone = backbone.load(self.cfg, self.resolved)  # type: ignore[arg-type]
        except BaseException as exc:
            self._load_error = exc

    def backbone(self) -> Backbone:
        if self._backbone is None:
            if self._loader is None:
                self._load()
            else:
                self._loader.join()
            if self._load_error is not None:
                raise self._load_error
        assert self._backbone is not None
        return self._backbone
