"""The callback's queue and worker: a bounded queue with spill to disk, batches, look-ahead.

The RunEngine thread only puts items (:meth:`BinningWorker.put` never waits longer than
``put_timeout``, 0 s by default); one worker thread takes batches (``batch_size`` frames or
whatever came within ``batch_timeout``), encodes and bins them in frame order and hands the
rows to the write policy. Behind a backlog a look-ahead thread reads and preprocesses the next
batch meanwhile (numba and torch release the GIL), so frame reads and preprocessing overlap the
model pass.

Queue-full policy: at most ``max_queue`` frames whose pixels are held in memory (inline
frames, copied on arrival) wait. Beyond, a frame is *spilled* to a folder of this worker's own
under ``spill_dir`` (two callbacks of one account never share one) as ``.npy`` and queued as a
file reference, processed in order when the worker catches up (``n_spilled``). Only if spilling
fails too (disk full) is a frame dropped: it still gets a row (``UNPROCESSED_BIN``), its
seq_num goes into ``dropped_seq_nums`` and the reason into the node's errors.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..derived import UNPROCESSED_BIN
from ..pipeline import BinningPipeline, PreparedFrames
from ..runtime import RuntimeConfig
from .run import Finish, RunBinning, WorkItem
from .writes import WritePolicy

__all__ = ["BinningWorker"]

logger = logging.getLogger(__name__)


class _Close:
    """The item that stops the worker."""


_CLOSE = _Close()


class BinningWorker:
    """Queue + worker thread of one callback (started on the first item, again after close)."""

    def __init__(self, pipeline: BinningPipeline, writes: WritePolicy, config: RuntimeConfig
                 ) -> None:
        self.pipeline = pipeline
        self.writes = writes
        self.config = config
        self.spill_dir = config.spill_path
        self.spill_tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._queue: deque[Any] = deque()
        self._cond = threading.Condition()
        self._in_memory = 0
        self._unfinished = 0
        self._thread: threading.Thread | None = None
        self._ahead_pool: ThreadPoolExecutor | None = None
        # under _cond: wait() asks (_flush_gen += 1) for every row and bin summary in Tiled
        # now; the worker answers once its queue is empty (_flushed_gen catches up)
        self._flush_gen = 0
        self._flushed_gen = 0
        self._closed = False

    # -------------------------------------------------------------------- RunEngine thread
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._closed = False
            self._thread = threading.Thread(target=self._loop, name="dae-binning", daemon=True)
            self._thread.start()

    def put(self, item: WorkItem | Finish) -> None:
        """Queue an item; an in-memory frame beyond ``max_queue`` is spilled to disk."""
        self.start()
        max_queue, put_timeout = self.config.max_queue, self.config.put_timeout
        with self._cond:
            full = False
            if isinstance(item, WorkItem) and item.in_memory and self._in_memory >= max_queue:
                deadline = time.monotonic() + put_timeout
                while self._in_memory >= max_queue:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                full = self._in_memory >= max_queue
        if full:
            self._spill(item)  # type: ignore[arg-type]
        with self._cond:
            if isinstance(item, WorkItem) and item.in_memory:
                self._in_memory += 1
            self._unfinished += 1
            self._queue.append(item)
            self._cond.notify_all()

    def spill_folder(self, run: RunBinning) -> Path:
        return self.spill_dir / f"{run.uid}-{self.spill_tag}"

    def _spill(self, item: WorkItem) -> None:
        run, frame = item.run, item.frame
        path = self.spill_folder(run) / f"seq-{frame.seq_num:08d}.npy"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.asarray(frame.data), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - disk full, bad object...
            run.dropped.append(frame.seq_num)
            frame.error = (f"frame seq_num={frame.seq_num}: dropped, queue full "
                           f"({self.config.max_queue} frames) and spill to {path} failed: {exc}")
            logger.error(frame.error)
        else:
            run.n_spilled += 1
            frame.loader = lambda: _load_and_remove(path)
            frame.source = f"spilled {path}"
        frame.data = None
        item.in_memory = False

    def remove_spill(self, run: RunBinning) -> None:
        spill = self.spill_folder(run)
        if spill.is_dir():
            for p in spill.glob("*.npy"):
                p.unlink(missing_ok=True)
            try:
                spill.rmdir()
            except OSError:
                pass

    # ------------------------------------------------------------------------ control
    def wait(self, timeout: float | None = None) -> bool:
        """True once every item put so far is processed and every row is written (to Tiled
        or its local backup); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                return self._unfinished == 0
            self._flush_gen += 1
            gen = self._flush_gen
            self._cond.notify_all()
            while self._unfinished > 0 or self._flushed_gen < gen:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Drain the queue and stop the thread."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        with self._cond:
            self._closed = True
            self._unfinished += 1
            self._queue.append(_CLOSE)
            self._cond.notify_all()
        thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        with self._cond:
            return self._unfinished

    # ------------------------------------------------------------------------- worker
    def _take_batch(self) -> list[Any]:
        """Wait for items; return up to batch_size frames (+ a trailing control item)."""
        with self._cond:
            while not self._queue:
                if self._flush_gen > self._flushed_gen:
                    return []  # a tick: wait() wants everything in Tiled
                due = self.writes.next_due()
                if due is not None:
                    remaining = due - time.monotonic()
                    if remaining <= 0:
                        return []  # a tick: rows are due, or a backup is to be re-sent
                    self._cond.wait(remaining)
                else:
                    self._cond.wait()
            first = self._queue.popleft()
            batch = [first]
            if not isinstance(first, WorkItem):
                return batch
            deadline = time.monotonic() + self.config.batch_timeout
            while len(batch) < self.config.batch_size:
                if self._queue:
                    item = self._queue.popleft()
                    batch.append(item)
                    if not isinstance(item, WorkItem):
                        break
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _loop(self) -> None:
        ahead: tuple[list[Any], Future | None] | None = None
        while True:
            if ahead is None:
                batch, future = self._take_batch(), None
            else:
                (batch, future), ahead = ahead, None
            closing = any(item is _CLOSE for item in batch)
            try:
                prepared = None
                if future is not None:
                    try:
                        prepared = future.result()
                    except Exception:  # noqa: BLE001 - prepared again below
                        logger.exception("DAE binning look-ahead failed; preparing again")
                if not closing:
                    ahead = self._look_ahead()
                self._handle(batch, prepared)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                logger.exception("DAE binning worker failed on a batch")
            with self._cond:  # wait() is answered when no frame is left to encode
                idle = not self._queue and ahead is None
                flush_gen = self._flush_gen if idle else self._flushed_gen
            flushing = flush_gen > self._flushed_gen
            try:
                self.writes.tick(force=flushing or closing, flushing=flushing)
            except Exception:  # noqa: BLE001
                logger.exception("DAE binning worker failed writing rows")
            finally:
                with self._cond:
                    self._in_memory -= sum(1 for i in batch
                                           if isinstance(i, WorkItem) and i.in_memory)
                    self._unfinished -= len(batch)
                    self._flushed_gen = max(self._flushed_gen, flush_gen)
                    self._cond.notify_all()
            if closing:
                self.writes.close()
                if self._ahead_pool is not None:
                    self._ahead_pool.shutdown(wait=False)
                    self._ahead_pool = None
                return

    def _look_ahead(self) -> tuple[list[Any], Future | None] | None:
        """Behind a backlog (a full batch queued), take the next batch and start preparing
        its frames. At a scan's pace there is none: frames then wait up to batch_timeout to
        form a batch, which costs the scan less CPU than encoding each frame on its own."""
        with self._cond:  # (re-entrant) only this thread takes items: no waiting below
            if len(self._queue) < self.config.batch_size:
                return None
            batch = self._take_batch()
        if not any(isinstance(item, WorkItem) for item in batch):
            return batch, None
        if self._ahead_pool is None:
            self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="dae-binning-prepare")
        return batch, self._ahead_pool.submit(self._prepare_batch, batch)

    @staticmethod
    def _segments(batch: list[Any]) -> list[list[Any]]:
        """Consecutive frames of one run form a segment; a control item is one on its own."""
        segments: list[list[Any]] = []
        frames: list[WorkItem] = []
        for item in batch:
            if isinstance(item, WorkItem):
                if frames and frames[-1].run is not item.run:
                    segments.append(frames)
                    frames = []
                frames.append(item)
                continue
            if frames:
                segments.append(frames)
                frames = []
            segments.append([item])
        if frames:
            segments.append(frames)
        return segments

    def _prepare_batch(self, batch: list[Any]) -> list[PreparedFrames | None]:
        """Look-ahead thread: read and preprocess each frame segment of ``batch``."""
        return [self._prepare(seg) if isinstance(seg[0], WorkItem) else None
                for seg in self._segments(batch)]

    def _handle(self, batch: list[Any], prepared: list[PreparedFrames | None] | None = None
                ) -> None:
        for k, segment in enumerate(self._segments(batch)):
            item = segment[0]
            if isinstance(item, WorkItem):
                self._process(segment, None if prepared is None else prepared[k])
            elif isinstance(item, Finish):
                self.writes.finish(item)
                self.remove_spill(item.run)

    def _prepare(self, items: list[WorkItem]) -> PreparedFrames:
        """Read and preprocess one run's frames (worker or look-ahead thread)."""
        run = items[0].run
        errors: list[str] = []
        frames: list[Any] = []
        for it in items:
            f = it.frame
            if f.error is not None:
                errors.append(f.error)
                frames.append(None)
                continue
            try:
                frames.append(f.load())
            except Exception as exc:  # noqa: BLE001
                errors.append(f"frame seq_num={f.seq_num}: cannot read from {f.source}: "
                              f"{type(exc).__name__}: {exc}")
                frames.append(None)
            f.data = None
        prepared = self.pipeline.prepare(frames, [it.frame.seq_num for it in items],
                                         expected_shape=run.expected_shape,
                                         geometries=[it.frame.metadata.get("geometry")
                                                     for it in items])
        reported = {f"frame seq_num={it.frame.seq_num}: no frame data"
                    for it, f in zip(items, frames, strict=True) if f is None}
        prepared.errors = errors + [e for e in prepared.errors if e not in reported]
        return prepared

    def _process(self, items: list[WorkItem], prepared: PreparedFrames | None = None) -> None:
        """Encode and bin a batch of one run's frames (read and preprocessed here unless the
        look-ahead did it); their rows wait in ``run.unwritten`` for Tiled."""
        run = items[0].run
        errors = run.take_errors()
        if prepared is None:
            prepared = self._prepare(items)
        positions = {m: [it.frame.positions.get(m, float("nan")) for it in items]
                     for m in run.motors}
        result = self.pipeline.process_prepared(prepared, [it.frame.time for it in items],
                                                positions)
        errors += result.errors
        run.n_rows += result.n_rows
        run.n_unprocessed += int(np.count_nonzero(result.rows["bin_id"] == UNPROCESSED_BIN))
        self.writes.add(run, result.rows, errors)


def _load_and_remove(path: Path) -> np.ndarray:
    frame = np.load(path, allow_pickle=False)
    path.unlink(missing_ok=True)
    return frame
