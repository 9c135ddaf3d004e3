"""Chunks of an earlier release, which did not record inside a chunk the keys it was made for.

Their folder's name says which archive, content and model made them, and a name is not proof: a store of
another model (another image size: the same width) copied under this model's folder looks the same. What
proves a chunk is its own numbers: one row of it (a decoded one where there is one) is embedded again with
this run's model and compared. A chunk that agrees is written again with its keys (embed/store.py); one that
does not is moved aside, and its rows are embedded again. The cost is one image per chunk and one rewrite
of the store, against the store's whole GPU time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from building_image_triplet_model.engine import index
from building_image_triplet_model.engine.context import RunContext
from building_image_triplet_model.engine.embed import loader as embed
from building_image_triplet_model.engine.embed.decode import ImageReader
from building_image_triplet_model.engine.embed.store import EmbeddingStore
from building_image_triplet_model.errors import InputError, Interrupted

log = logging.getLogger(__name__)

# How far a probe row embedded again may be from the stored one (relative L2 error) and still prove the
# chunk: CPU fp32 gives the same numbers bit for bit; a GPU at reduced precision, close ones. Another model,
# weights or input size is far beyond either.
PROOF_TOLERANCE = {"exact": 1e-4, "reduced": 5e-2}


def prove_unkeyed(
    ctx: RunContext, s: int, store: EmbeddingStore, unkeyed: list[Path], reader: ImageReader
) -> None:
    """Prove each chunk of ``unkeyed`` by a probe row, or move it aside. A merge has no archives and no
    model: it refuses them (InputError naming the first), and so does a run whose archive is gone."""
    name = store.made_for[0]
    if ctx.mode == "merge" or name not in ctx.sources or ctx.resolved is None:
        raise InputError(
            f"{unkeyed[0]}: written by an earlier release without the keys it was made for ({len(unkeyed)} "
            f"such chunks in {store.folder}), and the archive is not here to prove them: run the worker of "
            f"archive {name} again (it proves and keeps them, or embeds them again), then merge"
        )
    probes: dict[Path, tuple[int, np.ndarray, int]] = {}
    for path in unkeyed:
        chunk = store.read(path, keyed=False)
        decoded = np.flatnonzero(chunk["codes"] == 0)
        i = int(decoded[0]) if len(decoded) else 0
        probes[path] = (int(chunk["rows"][i]), chunk["emb"][i], int(chunk["codes"][i]))
    rows = np.array(sorted({row for row, _, _ in probes.values()}), np.int64)
    shard = index.load_shard(ctx.layout, name, ctx.markers[name], lazy=True)
    sink = ProbeSink(store.folder, store.n_rows, store.made_for)
    work = embed.Work(
        s, name, sink, rows, {k: shard[k][rows] for k in ("path", "offset", "size", "checksum")}
    )
    log.info(
        "%s: proving %d chunks of an earlier release by embedding one row of each again",
        store.folder,
        len(rows),
    )
    if not embed.embed_all([work], ctx.backbone(), reader, ctx.cfg, ctx.stop):
        raise Interrupted
    assert ctx.resolved is not None
    ident = ctx.resolved.identity
    exact = ident.device_type == "cpu" and ident.precision == "fp32"
    tolerance = PROOF_TOLERANCE["exact" if exact else "reduced"]
    for path, (row, stored, code) in probes.items():
        fresh, fresh_code = sink.got[row]
        if fresh_code == code and (code != 0 or relative_error(fresh, stored) <= tolerance):
            store.adopt(path)
            continue
        ctx.layout.quarantine(
            path,
            f"row {row} embedded again by this run's model differs from the stored one "
            f"(relative error {relative_error(fresh, stored):.3g}, decode codes {fresh_code}/{code}): "
            "made by another model",
        )


def relative_error(fresh: np.ndarray, stored: np.ndarray) -> float:
    a, b = fresh.astype(np.float64), stored.astype(np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))


class ProbeSink(EmbeddingStore):
    """Where the probe rows' embeddings go: kept in memory, never written."""

    def __init__(self, folder: Path, n_rows: int, made_for: tuple[str, str, str]) -> None:
        super().__init__(folder, n_rows, made_for)
        self.got: dict[int, tuple[np.ndarray, int]] = {}

    def write(self, rows: np.ndarray, emb: np.ndarray, codes: np.ndarray) -> Path:
        for row, e, c in zip(rows.tolist(), emb, codes.tolist(), strict=True):
            self.got[int(row)] = (e.copy(), int(c))
        return self.folder

    def done_rows(self) -> np.ndarray:
        return np.array(sorted(self.got), np.int64)

    def commit_if_full(self, done: np.ndarray) -> None:
        return None
