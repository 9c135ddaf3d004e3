"""Step 4: backbone embeddings, each image read and decoded exactly once.

Work is laid out per source on a fixed grid of batches ([0, B), [B, 2B), ...), so a resumed run forms
exactly the batches an uninterrupted one would (same numbers on the CPU). Decoding runs in DataLoader
workers; the model thread only moves uint8 pixels to the device, normalises, and runs the model; a writer
thread turns results into immutable chunk files ``emb/<source>/<a>-<b>.npz`` at most every
``checkpoint_interval_s`` seconds, off the critical path. A restarted run skips the batches its chunks
cover without reading their images.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import faults, workdir
from .records import REASON_CODE

log = logging.getLogger(__name__)

MAX_CHUNK_ROWS = 65_536


chunk_name = workdir.range_name
done_chunks = workdir.done_ranges


def covered(chunks: list[tuple[int, int]], n: int) -> bool:
    pos = 0
    for a, b in chunks:
        if a > pos:
            return False
        pos = max(pos, b)
    return pos >= n


@dataclass
class SourceWork:
    name: str
    n: int  # rows of this source in the artifact
    folder: Path
    complete: bool = False
    pending: list[tuple[int, int]] = field(default_factory=list)  # batches still to embed


def plan_work(names: list[str], counts: list[int], emb_root: Path, batch_size: int) -> list[SourceWork]:
    """Which batches of which source still need embeddings."""
    out = []
    for name, n in zip(names, counts, strict=True):
        folder = emb_root / name
        work = SourceWork(name, n, folder)
        if workdir.read_json(folder / workdir.SUCCESS):
            work.complete = True
        else:
            chunks = done_chunks(folder)  # sorted, never overlapping: one pass over batches and chunks
            i = 0
            for a in range(0, n, batch_size):
                b = min(a + batch_size, n)
                while i < len(chunks) and chunks[i][1] <= a:
                    i += 1
                if not (i < len(chunks) and chunks[i][0] <= a and b <= chunks[i][1]):
                    work.pending.append((a, b))
        out.append(work)
    return out


def finish_source(work: SourceWork, dim: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Write the source's commit marker once its chunks cover every row."""
    chunks = done_chunks(work.folder)
    if not covered(chunks, work.n):
        raise RuntimeError(f"{work.folder}: chunks do not cover rows 0..{work.n}")
    valid = failed = 0
    for a, b in chunks:
        codes = workdir.read_npz(work.folder / chunk_name(a, b))["codes"]
        valid += int((codes == 0).sum())
        failed += int((codes != 0).sum())
    marker = {"rows": work.n, "valid": valid, "failed": failed, "dim": dim, "chunks": len(chunks), **extra}
    workdir.write_json(work.folder / workdir.SUCCESS, marker)
    work.complete = True
    return marker


class ChunkWriter(threading.Thread):
    """Collects results per source and writes each contiguous run of batches as one chunk file.

    A chunk is written when it is ``interval_s`` old, when it reaches MAX_CHUNK_ROWS, when its source is
    complete, when the next result does not continue it, and on close.
    """

    def __init__(
        self,
        works: list[SourceWork],
        interval_s: float,
        dtype: str,
        on_chunk: Callable[[SourceWork, int, int], None] | None = None,
        on_source_done: Callable[[SourceWork], None] | None = None,
    ) -> None:
        super().__init__(name="chunk-writer", daemon=True)
        self.works = works
        self.interval_s = interval_s
        self.dtype = np.dtype(dtype)
        self.on_chunk = on_chunk
        self.on_source_done = on_source_done
        self.q: queue.Queue[tuple[int, int, int, np.ndarray, np.ndarray] | None] = queue.Queue(maxsize=256)
        self.error: BaseException | None = None
        self.dim: int | None = None
        self._buf: list[tuple[np.ndarray, np.ndarray]] = []
        self._src = -1
        self._start = self._end = 0
        self._since = 0.0

    def put(self, source: int, a: int, b: int, emb: np.ndarray, codes: np.ndarray) -> None:
        if self.error is not None:
            raise RuntimeError("the chunk writer failed") from self.error
        self.q.put((source, a, b, emb, codes))

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise RuntimeError("the chunk writer failed") from self.error

    def run(self) -> None:
        try:
            while True:
                wait = None
                if self._buf:
                    wait = max(0.0, self._since + self.interval_s - time.monotonic())
                try:
                    item = self.q.get(timeout=wait)
                except queue.Empty:
                    self._flush()
                    continue
                if item is None:
                    self._flush()
                    return
                self._add(*item)
        except BaseException as exc:
            self.error = exc
            log.exception("chunk writer failed")
            # Keep draining so that the producer never blocks on a full queue.
            while self.q.get() is not None:
                pass

    def _add(self, source: int, a: int, b: int, emb: np.ndarray, codes: np.ndarray) -> None:
        if self._buf and (source != self._src or a != self._end):
            self._flush()
        if not self._buf:
            self._src, self._start, self._since = source, a, time.monotonic()
        self._buf.append((emb, codes))
        self._end = b
        self.dim = emb.shape[1]
        work = self.works[source]
        if (
            b >= work.n
            or self._end - self._start >= MAX_CHUNK_ROWS
            or time.monotonic() - self._since >= self.interval_s
        ):
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        work = self.works[self._src]
        emb = np.concatenate([e for e, _ in self._buf]).astype(self.dtype, copy=False)
        codes = np.concatenate([c for _, c in self._buf])
        workdir.write_npz(work.folder / chunk_name(self._start, self._end), {"emb": emb, "codes": codes})
        faults.point("embed.chunk")
        if self.on_chunk:
            self.on_chunk(work, self._start, self._end)
        done_source = self._end >= work.n
        self._buf = []
        if done_source and covered(done_chunks(work.folder), work.n):
            finish_source(work, self.dim, {})
            if self.on_source_done:
                self.on_source_done(work)
            faults.point("embed.source_done")


class ImageBatches:
    """A map-style dataset whose items are whole batches, decoded in DataLoader workers."""

    def __init__(
        self, reader: Any, transform: Any, items: dict[str, np.ndarray], batches: list[tuple[int, int]]
    ):
        self.reader = reader
        self.transform = transform
        self.items = items  # source, path, offset, size per pending row, batch after batch
        self.batches = batches  # [start, stop) into items

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        from .decode import decode

        a, b = self.batches[i]
        size = self.transform.size
        pixels = np.zeros((b - a, size, size, 3), np.uint8)
        codes = np.zeros(b - a, np.int8)
        for j in range(a, b):
            data = self.reader.read(
                int(self.items["source"][j]),
                self.items["path"][j],
                int(self.items["offset"][j]),
                int(self.items["size"][j]),
            )
            img, code = decode(data, self.transform)
            if img is not None:
                pixels[j - a] = img
            codes[j - a] = code
        return pixels, codes


def embed_all(
    works: list[SourceWork],
    items_for: Callable[[int, int, int], dict[str, np.ndarray]],
    backbone: Any,
    reader: Any,
    cfg: Any,
    stop: threading.Event,
    on_batch: Callable[[int], None] | None = None,
    on_source_done: Callable[[SourceWork], None] | None = None,
    on_chunk: Callable[[SourceWork, int, int], None] | None = None,
) -> bool:
    """Embed every pending batch. True when all sources are complete, False when stopped."""
    import torch

    from .decode import Transform

    order = [(s, a, b) for s, w in enumerate(works) for a, b in w.pending]
    if not order:
        return True
    transform = Transform.from_data_config(backbone.data_config, cfg.fast_decode)
    parts = [items_for(s, a, b) for s, a, b in order]
    items = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    bounds = np.cumsum([0] + [b - a for _, a, b in order])
    dataset = ImageBatches(
        reader, transform, items, list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    )
    cuda = backbone.device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=cuda,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        persistent_workers=False,
    )
    writer = ChunkWriter(works, cfg.checkpoint_interval_s, cfg.embedding_dtype, on_chunk, on_source_done)
    writer.start()
    pending: tuple[tuple[int, int, int], torch.Tensor, np.ndarray, Any] | None = None

    def deliver(p: tuple[tuple[int, int, int], torch.Tensor, np.ndarray, Any]) -> None:
        (s, a, b), out, codes, event = p
        if event is not None:
            event.synchronize()
        emb = out.numpy()
        emb[codes != REASON_CODE["ok"]] = 0.0
        writer.put(s, a, b, emb, codes)
        if on_batch:
            on_batch(b - a)
        faults.point("embed.batch")

    it = iter(loader)
    try:
        with torch.inference_mode():
            for key in order:
                if stop.is_set():
                    break
                pixels_np, codes = next(it)
                pixels = torch.as_tensor(pixels_np)
                if cuda:
                    pixels = pixels.pin_memory() if not pixels.is_pinned() else pixels
                n = len(pixels)
                if cfg.compile and n < cfg.batch_size:
                    # One static shape for the compiled graph: each archive's last, shorter batch is padded
                    # instead of compiling the model again for its size.
                    pad = pixels.new_zeros((cfg.batch_size - n, *pixels.shape[1:]))
                    pixels = torch.cat([pixels, pad])
                out = backbone.embed(pixels)[:n].to("cpu", non_blocking=cuda)
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
                # Hand the previous batch over only now: the device already has this one queued.
                if pending is not None:
                    deliver(pending)
                pending = (key, out, np.asarray(codes), event)
    finally:
        # Whatever ended the loop (done, a stop request, a killed worker), the last computed batch is
        # good: keep it. Then the writer makes everything durable before this step returns.
        try:
            if pending is not None:
                deliver(pending)
        finally:
            del it
            writer.close()
    return all(w.complete for w in works)
