"""One archive's embeddings under one model: ``emb/<model key>/<source>-<content key>/``.

The folder is keyed by what decides its contents and nothing else (identity.py), so every run with the same
model over the same archive content reuses it, whatever its selection, splits, seed or KNN settings, and a
scale-out worker's shard is the same kind of thing as a single VM's. Rows are the archive's index rows
(sorted by stem); a run embeds the rows it needs that are not here yet, so a subset run stores a subset.

Files: immutable chunks ``<first row>-<last row>.npz`` holding ``rows`` (sorted index rows, disjoint from
every other chunk's), ``emb`` (one row per entry), ``codes`` (the decode result: 0, or a reject code) and
``made_for`` (the archive, its content key and the model key the chunk was embedded for), and
``_SUCCESS.json`` once every row of the archive is here (what a scale-out merge waits for), naming the same
keys and the counts of its chunks.

Nothing is trusted by its folder's name: :meth:`EmbeddingStore.audit` checks every chunk's keys, that the
chunks never overlap, and that the marker's keys and counts are what the chunks hold. Chunks written before
they carried their keys are returned to the caller, which proves them by embedding a probe row of each
again (proof.py) or refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from building_image_triplet_model.io import durable, workdir

_ARRAYS = ("rows", "emb", "codes")
MADE_FOR = "made_for"


class UnkeyedChunkError(durable.CorruptFileError):
    """A chunk written by a release that did not record its keys: proven by a probe, or recomputed."""


def chunk_name(rows: np.ndarray) -> str:
    # Disjoint row sets never share their first row, so the name is unique.
    return f"{int(rows[0]):010d}-{int(rows[-1]):010d}.npz"


@dataclass
class EmbeddingStore:
    folder: Path
    n_rows: int  # the archive's index rows
    made_for: tuple[str, str, str] = ("", "", "")  # the archive, its content key, the model key

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

    def _check_keys(self, path: Path, chunk: dict[str, np.ndarray]) -> None:
        if MADE_FOR not in chunk:
            raise UnkeyedChunkError(path, "carries no keys (written by an earlier release)")
        found = tuple(v.decode(errors="replace") for v in np.atleast_1d(chunk[MADE_FOR]).tolist())
        if found != self.made_for:
            what = ("archive", "content key", "model key")
            found = (*found, "", "", "")[:3]
            diff = [
                f"{w} {f!r}, not {e!r}" for w, f, e in zip(what, found, self.made_for, strict=True) if f != e
            ]
            raise durable.CorruptFileError(path, f"made for another store: {'; '.join(diff)}")

    def read_rows(self, path: Path) -> np.ndarray:
        return self._check_rows(path, durable.read_npz(path, ("rows",))["rows"])

    def done_rows(self) -> np.ndarray:
        """Every row embedded so far, sorted (reads only the small ``rows`` array of each chunk)."""
        parts = [self.read_rows(p) for p in self.chunks()]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def read_codes(self, path: Path) -> dict[str, np.ndarray]:
        """A chunk's rows and decode results only (not its embeddings), checked."""
        chunk = durable.read_npz(path, ("rows", "codes"), optional=(MADE_FOR,))
        self._check_keys(path, chunk)
        if chunk["codes"].shape != self._check_rows(path, chunk["rows"]).shape:
            raise durable.CorruptFileError(path, "not as many codes as rows")
        return chunk

    def read(self, path: Path, dim: int | None = None, keyed: bool = True) -> dict[str, np.ndarray]:
        """One chunk, checked: made for this store (``keyed``), rows of this archive, as many embeddings and
        codes as rows, of the store's width."""
        chunk = durable.read_npz(path, _ARRAYS, optional=(MADE_FOR,))
        if keyed:
            self._check_keys(path, chunk)
        rows, emb, codes = self._check_rows(path, chunk["rows"]), chunk["emb"], chunk["codes"]
        if (
            emb.ndim != 2
            or len(emb) != len(rows)
            or codes.shape != rows.shape
            or (dim and emb.shape[1] != dim)
        ):
            raise durable.CorruptFileError(path, f"{len(rows)} rows but embeddings of shape {emb.shape}")
        return chunk

    def _arrays(self, rows: np.ndarray, emb: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
        made_for = np.array([v.encode() for v in self.made_for], dtype="S")
        return {"rows": rows.astype(np.int64), "emb": emb, "codes": codes.astype(np.int8), MADE_FOR: made_for}

    def write(self, rows: np.ndarray, emb: np.ndarray, codes: np.ndarray) -> Path:
        path = self.folder / chunk_name(rows)
        durable.write_npz(path, self._arrays(rows, emb, codes))
        return path

    def adopt(self, path: Path) -> None:
        """Write a proven chunk of an earlier release again, now with its keys (same rows, same numbers)."""
        chunk = self.read(path, keyed=False)
        durable.write_npz(path, self._arrays(chunk["rows"], chunk["emb"], chunk["codes"]))

    def marker(self) -> dict[str, Any] | None:
        return workdir.committed(self.folder)

    def _keys(self) -> dict[str, str]:
        return dict(zip(("source", "content", "model_key"), self.made_for, strict=True))

    def audit(self) -> list[Path]:
        """Check the store against what the run expects, reading only the small arrays of each chunk.

        CorruptFileError (naming the file, which the caller moves aside): a chunk made for another archive,
        content or model; a chunk whose rows overlap another's; a marker whose keys or counts disagree with
        the chunks (a gap: rows it claims that no chunk holds). Returns the chunks written without keys by
        an earlier release, for the caller to prove or recompute. A full store without a valid marker gets
        one (a kill between its last chunk and its marker left it so)."""
        # The marker before the chunks: a run sharing the folder may finish the store meanwhile, and a marker
        # read after the listing would claim chunks the listing missed.
        marker = self.marker()
        seen = np.zeros(self.n_rows, bool)
        unkeyed: list[Path] = []
        valid = chunks = 0
        for path in self.chunks():
            try:
                chunk = self.read_codes(path)
            except UnkeyedChunkError:
                unkeyed.append(path)
                chunk = durable.read_npz(path, ("rows", "codes"))
                if chunk["codes"].shape != self._check_rows(path, chunk["rows"]).shape:
                    raise durable.CorruptFileError(path, "not as many codes as rows") from None
            rows = chunk["rows"]
            if seen[rows].any():
                first = int(rows[seen[rows]][0])
                raise durable.CorruptFileError(path, f"overlaps another chunk of {self.folder} (row {first})")
            seen[rows] = True
            valid += int((chunk["codes"] == 0).sum())
            chunks += 1
        if marker is not None:
            held = {
                "rows": int(seen.sum()),
                "chunks": chunks,
                "valid": valid,
                "failed": int(seen.sum()) - valid,
            }
            claims = {k: marker.get(k) for k in held}
            if claims != held or not seen.all():
                raise durable.CorruptFileError(
                    self.folder / workdir.SUCCESS,
                    f"claims {claims}, its chunks hold {held} of an archive of {self.n_rows} rows",
                )
            keys = {k: marker[k] for k in self._keys() if k in marker}
            if keys and keys != self._keys():
                raise durable.CorruptFileError(
                    self.folder / workdir.SUCCESS, f"made for {keys}, not {self._keys()}"
                )
        if seen.all() and not unkeyed and (marker is None or "model_key" not in marker):
            self.commit(valid, chunks)
        return unkeyed

    def commit(self, valid: int, chunks: int) -> dict[str, Any]:
        marker = {
            **self._keys(),
            "rows": self.n_rows,
            "valid": valid,
            "failed": self.n_rows - valid,
            "dim": self.width(),
            "chunks": chunks,
        }
        workdir.commit(self.folder / workdir.SUCCESS, marker)
        return marker

    def commit_if_full(self, done: np.ndarray) -> dict[str, Any] | None:
        """Write the commit marker once every row of the archive is here; returns it (or None)."""
        if len(done) != self.n_rows or self.marker():
            return self.marker()
        valid = sum(int((self.read_codes(p)["codes"] == 0).sum()) for p in self.chunks())
        return self.commit(valid, len(self.chunks()))

    def width(self) -> int:
        """The embedding width of the stored chunks (0 when there are none)."""
        marker = self.marker()
        if marker and marker.get("dim"):
            return int(marker["dim"])
        for path in self.chunks():
            return int(self.read(path, keyed=False)["emb"].shape[1])
        return 0
