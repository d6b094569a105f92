"""One run as the callback sees it: its documents routed to frames, and the state of its node.

:class:`RunBinning` is the per-run :class:`~event_model.DocumentRouter` the callback's
``RunRouter`` makes for each start document. It owns everything of its run: the frame
pairing (it is a :class:`~gisaxs_bluesky.frames.RunFrames`), the counters the finish writes,
the rows waiting for Tiled and the node's writer and lock. It dies with the run; no reverse
index outlives it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..frames import FrameReaders, FrameRef, RunFrames, RunFramesOptions

__all__ = ["Finish", "RunBinning", "WorkItem"]


@dataclass
class WorkItem:
    """A frame of ``run`` queued for the worker (pixels held in memory, or a loader)."""

    run: RunBinning
    frame: FrameRef
    in_memory: bool = False


@dataclass
class Finish:
    """A run's end, queued behind its frames: the worker then finishes the node."""

    run: RunBinning
    exit_status: str
    reason: str


class RunBinning(RunFrames):
    """The frames of one run go to ``put`` (the worker's queue), its end after them."""

    def __init__(
        self,
        start: Mapping[str, Any],
        *,
        put: Callable[[WorkItem | Finish], None],
        readers: FrameReaders,
        options: RunFramesOptions,
    ) -> None:
        self._lock = threading.Lock()
        self.pending_errors: list[str] = []  # for the node's errors (recorded by the worker)
        super().__init__(start, emit=self._queue_frame, readers=readers, options=options,
                         note=self.note)
        self._put = put
        # the node (worker thread only)
        self.writer: Any = None
        self.writer_failed: str | None = None
        self.lock: Any = None  # the node's NodeLock while this callback writes it
        self.fault_noted: str | None = None  # the store fault last recorded in the node
        self.next_retry = 0.0  # finished, rows/status in the local backup: next re-send
        # rows encoded but not yet written: at most once per write_interval (the first batch
        # at once), at max_write_rows, on wait(), and before the finish
        self.unwritten: list[tuple[dict[str, np.ndarray], list[str]]] = []
        self.last_write = float("-inf")
        # counters of the finish
        self.n_lost = 0  # events that could not become a row (their descriptor never came)
        self.n_rows = 0
        self.n_unprocessed = 0
        self.n_spilled = 0
        self.dropped: list[int] = []
        self.store_errors = 0
        self.finished = False  # a Finish is queued
        self.done = threading.Event()

    # ------------------------------------------------------------------------ documents
    def note(self, message: str) -> None:
        """Keep a problem for the node's ``errors`` (any thread)."""
        with self._lock:
            self.pending_errors.append(message)

    def take_errors(self) -> list[str]:
        with self._lock:
            errors, self.pending_errors = self.pending_errors, []
        return errors

    def _queue_frame(self, frame: FrameRef) -> None:
        self._put(WorkItem(self, frame, in_memory=frame.in_memory))

    def stop(self, doc: dict) -> None:
        super().stop(doc)  # frames still unpaired go first
        self.end(str(doc.get("exit_status", "success")), str(doc.get("reason", "")))

    def end(self, exit_status: str, reason: str) -> None:
        """Queue the run's finish (once); a run without an image stream writes nothing."""
        if self.finished:
            return
        self.finished = True
        if not self.streams and not self.n_frames and not self.pending_errors:
            self.done.set()
            return
        self._put(Finish(self, exit_status, reason))

    # ----------------------------------------------------------------------------- state
    @property
    def n_unwritten(self) -> int:
        return sum(len(rows["seq_num"]) for rows, _ in self.unwritten)

    @property
    def scan_id(self) -> int | None:
        sid = self.start_doc.get("scan_id")
        return int(sid) if isinstance(sid, int | np.integer) else None

    @property
    def image_descriptor(self) -> dict | None:
        for stream in self.streams.values():
            return stream.descriptor
        return None
