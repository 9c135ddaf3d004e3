"""One archive's embeddings under one model: ``emb/<model key>/<source>-<content key>/``.

The folder is keyed by what decides its contents and nothing else (identity.py), so every run with the same
model over the same archive content reuses it, whatever its selection, splits, seed or KNN settings, and a
scale-out worker's shard is the same kind of thing as a single VM's. Rows are the archive's index rows
(sorted by stem); a run embeds the rows it needs that are not here yet, so a subset run stores a subset.

Files: immutable chunks ``<first row>-<last row>.npz`` holding ``rows`` (sorted index rows, disjoint from
every other chunk's), ``emb`` (one row per entry) and ``codes`` (the decode result: 0, or a reject code),
and ``_SUCCESS.json`` once every row of the archive is here (what a scale-out merge waits for).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import durable, workdir

_ARRAYS = ("rows", "emb", "codes")


def chunk_name(rows: np.ndarray) -> str:
    # Disjoint row sets never share their first row, so the name is unique.
    return f"{int(rows[0]):010d}-{int(rows[-1]):010d}.npz"


@dataclass
class EmbeddingStore:
    folder: Path
    n_rows: int  # the archive's index rows

    @property
    def name(self) -> str:
        return self.folder.name

    def chunks(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("*-*.npz"))

    def _check_rows(self, path: Path, rows: np.ndarray) -> np.ndarray:
        if (
            rows.ndim != 1
            or len(rows) == 0
            or rows[0] < 0
            or rows[-1] >= self.n_rows
            or path.name != chunk_name(rows)
            or (len(rows) > 1 and not (np.diff(rows) > 0).all())
        ):
            raise durable.CorruptFileError(path, f"rows do not belong to an archive of {self.n_rows} rows")
        return rows

    def read_rows(self, path: Path) -> np.ndarray:
        return self._check_rows(path, durable.read_npz(path, ("rows",))["rows"])

    def done_rows(self) -> np.ndarray:
        """Every row embedded so far, sorted (reads only the small ``rows`` array of each chunk)."""
        parts = [self.read_rows(p) for p in self.chunks()]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def read_codes(self, path: Path) -> dict[str, np.ndarray]:
        """A chunk's rows and decode results only (not its embeddings), checked."""
        chunk = durable.read_npz(path, ("rows", "codes"))
        if chunk["codes"].shape != self._check_rows(path, chunk["rows"]).shape:
            raise durable.CorruptFileError(path, "not as many codes as rows")
        return chunk

    def read(self, path: Path, dim: int | None = None) -> dict[str, np.ndarray]:
        """One chunk, checked: rows of this archive, as many embeddings and codes as rows, of the store's
        width."""
        chunk = durable.read_npz(path, _ARRAYS)
        rows, emb, codes = self._check_rows(path, chunk["rows"]), chunk["emb"], chunk["codes"]
        if (
            emb.ndim != 2
            or len(emb) != len(rows)
            or codes.shape != rows.shape
            or (dim and emb.shape[1] != dim)
        ):
            raise durable.CorruptFileError(path, f"{len(rows)} rows but embeddings of shape {emb.shape}")
        return chunk

    def write(self, rows: np.ndarray, emb: np.ndarray, codes: np.ndarray) -> Path:
        path = self.folder / chunk_name(rows)
        durable.write_npz(path, {"rows": rows.astype(np.int64), "emb": emb, "codes": codes.astype(np.int8)})
        return path

    def marker(self) -> dict[str, Any] | None:
        return workdir.committed(self.folder)

    def commit_if_full(self, done: np.ndarray) -> dict[str, Any] | None:
        """Write the commit marker once every row of the archive is here; returns it (or None)."""
        if len(done) != self.n_rows or self.marker():
            return self.marker()
        valid = failed = dim = 0
        for path in self.chunks():
            chunk = self.read(path)
            valid += int((chunk["codes"] == 0).sum())
            failed += int((chunk["codes"] != 0).sum())
            dim = int(chunk["emb"].shape[1])
        marker = {
            "rows": self.n_rows,
            "valid": valid,
            "failed": failed,
            "dim": dim,
            "chunks": len(self.chunks()),
        }
        workdir.commit(self.folder / workdir.SUCCESS, marker)
        return marker

    def width(self) -> int:
        """The embedding width of the stored chunks (0 when there are none)."""
        marker = self.marker()
        if marker and marker.get("dim"):
            return int(marker["dim"])
        for path in self.chunks():
            return int(self.read(path)["emb"].shape[1])
        return 0
