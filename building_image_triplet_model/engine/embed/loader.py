"""Step 4: backbone embeddings, each image read, verified and decoded exactly once.

The rows still to embed, archive after archive, are cut into batches; every batch is padded to
``batch_size`` before the model, so an image's embedding never depends on which images share its batch
(on the CPU the numbers are then the same bit for bit whichever run, resumed or incremental, embeds it).
Decoding runs in DataLoader workers; the model thread only moves uint8 pixels to the device, normalises
and runs the model, and hands batch N over only once batch N+1 is queued on the device. A writer thread
turns results into immutable chunk files of each archive's store (embed/store.py) at most every
``embedding_chunk_interval_s`` seconds, off the model's path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from building_image_triplet_model.engine import machine
from building_image_triplet_model.engine.embed.decode import CHANGED, ImageReader, Transform, decode
from building_image_triplet_model.engine.embed.store import EmbeddingStore
from building_image_triplet_model.errors import InputError, disk_full
from building_image_triplet_model.io import faults

log = logging.getLogger(__name__)

MAX_CHUNK_ROWS = 65_536


@dataclass
class Work:
    """The rows of one archive that this run still has to embed."""

    source: int  # position in the run's source list (the reader's index)
    name: str
    store: EmbeddingStore
    rows: np.ndarray  # index rows, sorted
    locators: dict[str, np.ndarray]  # path, offset, size, checksum of each row
    delivered: int = 0
    on_done: Callable[[Work], None] | None = field(default=None, repr=False)


class ChunkWriter(threading.Thread):
    """Collects results per archive and writes them as chunk files of its store.

    A store's buffer is written when it is ``interval_s`` old, when it reaches MAX_CHUNK_ROWS, when its
    archive has nothing left to embed, and on close. Then, if the store holds every row of its archive, it
    is committed.
    """

    def __init__(
        self, works: list[Work], interval_s: float, dtype: str, on_chunk: Callable[[Work], None] | None = None
    ) -> None:
        super().__init__(name="chunk-writer", daemon=True)
        self.works = works
        self.interval_s = interval_s
        self.dtype = np.dtype(dtype)
        self.on_chunk = on_chunk
        self.q: queue.Queue[tuple[int, np.ndarray, np.ndarray, np.ndarray] | None] = queue.Queue(maxsize=256)
        self.error: BaseException | None = None
        self._buf: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._since: dict[int, float] = {}

    def put(self, work: int, rows: np.ndarray, emb: np.ndarray, codes: np.ndarray) -> None:
        if self.error is not None:
            raise RuntimeError("the chunk writer failed") from self.error
        self.q.put((work, rows, emb, codes))

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise RuntimeError("the chunk writer failed") from self.error

    def run(self) -> None:
        try:
            while True:
                wait = None
                if self._since:
                    wait = max(0.0, min(self._since.values()) + self.interval_s - time.monotonic())
                try:
                    item = self.q.get(timeout=wait)
                except queue.Empty:
                    item = ()  # type: ignore[assignment]
                if item is None:
                    for w in list(self._buf):
                        self._flush(w)
                    return
                if item:
                    self._add(*item)
                now = time.monotonic()
                for w, since in list(self._since.items()):
                    if now - since >= self.interval_s:
                        self._flush(w)
        except BaseException as exc:
            self.error = exc
            if disk_full(exc) is None:  # a full disk is reported by the run, in one line
                log.exception("chunk writer failed")
            while self.q.get() is not None:  # keep draining so that the producer never blocks
                pass

    def _add(self, w: int, rows: np.ndarray, emb: np.ndarray, codes: np.ndarray) -> None:
        self._buf.setdefault(w, []).append((rows, emb, codes))
        self._since.setdefault(w, time.monotonic())
        work = self.works[w]
        work.delivered += len(rows)
        if work.delivered >= len(work.rows) or sum(len(r) for r, _, _ in self._buf[w]) >= MAX_CHUNK_ROWS:
            self._flush(w)

    def _flush(self, w: int) -> None:
        parts = self._buf.pop(w, [])
        self._since.pop(w, None)
        if not parts:
            return
        work = self.works[w]
        rows = np.concatenate([r for r, _, _ in parts])
        emb = np.concatenate([e for _, e, _ in parts]).astype(self.dtype, copy=False)
        codes = np.concatenate([c for _, _, c in parts])
        work.store.write(rows, emb, codes)
        faults.point("embed.chunk")
        if self.on_chunk:
            self.on_chunk(work)
        if work.delivered >= len(work.rows) and w not in self._buf:
            work.store.commit_if_full(work.store.done_rows())
            faults.point("embed.source_done")
            if work.on_done:
                work.on_done(work)


class ImageBatches:
    """A map-style dataset whose items are whole batches, read, verified and decoded in DataLoader
    workers."""

    def __init__(
        self,
        reader: ImageReader,
        transform: Transform,
        items: dict[str, np.ndarray],
        batches: list[tuple[int, int]],
    ) -> None:
        self.reader = reader
        self.transform = transform
        self.items = items  # source, path, offset, size, checksum per pending row, batch after batch
        self.batches = batches  # [start, stop) into items

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.batches[i]
        size = self.transform.size
        pixels = np.zeros((b - a, size, size, 3), np.uint8)
        codes = np.zeros(b - a, np.int8)
        it = self.items
        for j in range(a, b):
            data = self.reader.read_verified(
                int(it["source"][j]),
                it["path"][j],
                int(it["offset"][j]),
                int(it["size"][j]),
                int(it["checksum"][j]),
            )
            if data is None:
                codes[j - a] = CHANGED
                continue
            img, code = decode(data, self.transform)
            if img is not None:
                pixels[j - a] = img
            codes[j - a] = code
        return pixels, codes


def embed_all(
    works: list[Work],
    backbone: Any,
    reader: ImageReader,
    cfg: Any,
    stop: threading.Event,
    on_batch: Callable[[int], None] | None = None,
    on_chunk: Callable[[Work], None] | None = None,
    on_changed: Callable[[Work, int], None] | None = None,
) -> bool:
    """Embed every row of every work. True when all are done, False when stopped."""
    import torch

    works = [w for w in works if len(w.rows)]
    if not works:
        return True
    transform = Transform.from_identity(backbone.identity)
    owner = np.concatenate([np.full(len(w.rows), i, np.int32) for i, w in enumerate(works)])
    local = np.concatenate([w.rows for w in works])
    items = {
        "source": np.concatenate([np.full(len(w.rows), w.source, np.int32) for w in works]),
        **{k: np.concatenate([w.locators[k] for w in works]) for k in ("path", "offset", "size", "checksum")},
    }
    b = cfg.batch_size
    bounds = [(a, min(a + b, len(local))) for a in range(0, len(local), b)]
    workers = machine.decode_workers(cfg, backbone.device.type)
    cuda = backbone.device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        ImageBatches(reader, transform, items, bounds),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=False,
    )
    writer = ChunkWriter(works, cfg.embedding_chunk_interval_s, cfg.embedding_dtype, on_chunk)
    writer.start()
    pending: tuple[int, torch.Tensor, np.ndarray, Any] | None = None

    def deliver(p: tuple[int, torch.Tensor, np.ndarray, Any]) -> None:
        i, out, codes, event = p
        if event is not None:
            event.synchronize()
        emb = out.numpy()
        emb[codes != 0] = 0.0
        lo, hi = bounds[i]
        # A batch may span archives: one put per archive it holds.
        for w in np.unique(owner[lo:hi]):
            sel = np.flatnonzero(owner[lo:hi] == w)
            writer.put(int(w), local[lo:hi][sel], emb[sel], codes[sel])
        if on_batch:
            on_batch(hi - lo)
        faults.point("embed.batch")

    it = iter(loader)
    try:
        with torch.inference_mode():
            for i in range(len(bounds)):
                if stop.is_set():
                    break
                pixels_np, codes = next(it)
                codes = np.asarray(codes)
                if (codes == CHANGED).any():
                    j = bounds[i][0] + int(np.flatnonzero(codes == CHANGED)[0])
                    work = works[int(owner[j])]
                    if on_changed:
                        on_changed(work, int(local[j]))
                    raise InputError(
                        f"archive {work.name} changed after it was indexed: the bytes of "
                        f"{items['path'][j].decode(errors='replace')} are not the ones the index recorded; "
                        "it is indexed again at the next run (its old embeddings are not used)"
                    )
                pixels = torch.as_tensor(pixels_np)
                if cuda and not pixels.is_pinned():
                    pixels = pixels.pin_memory()
                n = len(pixels)
                if n < b:  # one static shape: an image's numbers never depend on its batch companions
                    pixels = torch.cat([pixels, pixels.new_zeros((b - n, *pixels.shape[1:]))])
                out = backbone.embed(pixels)[:n].to("cpu", non_blocking=cuda)
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
                if pending is not None:
                    deliver(pending)  # only now: the device already has this batch queued
                pending = (i, out, codes, event)
    finally:
        # Whatever ended the loop (done, a stop request, a killed worker, a changed archive), the last
        # computed batch is good: keep it. Then the writer makes everything durable before returning.
        try:
            if pending is not None:
                deliver(pending)
        finally:
            del it
            writer.close()
    return all(w.delivered >= len(w.rows) for w in works)
