"""Live per-frame DAE results for the adaptive plan: callback -> queue -> plan.

:class:`LiveEncoder` is a light in-process RunEngine subscriber: frames come through the
package's frame-source layer (:mod:`gisaxs_bluesky.frames`, as in the live callback), and a
worker thread encodes + bins them (the plan waits on :meth:`LiveEncoder.wait` through ``bps.wait_for``, so the
RunEngine loop stays responsive). Optionally it writes the rows to Tiled with
:class:`gisaxs_bluesky.store.DerivedStore`, in the same layout as the DAE binning callback.

:class:`DerivedCallbackResults` adapts the real ``DAEBinningCallback`` (its ``wait`` and its
Tiled node) to the same two-method interface, :class:`ResultsSource`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from event_model import RunRouter

from ..frames import FrameGeometry, FrameReaders, FrameRef, RunFrames, RunFramesOptions
from ..models import make_binner
from ..pipeline import BinningPipeline
from ..runtime import DEFAULT_ROOT
from ..store import DerivedStore, read_derived
from .results import ScanResults

__all__ = ["DerivedCallbackResults", "LiveEncoder", "ResultsSource"]

logger = logging.getLogger(__name__)


@runtime_checkable
class ResultsSource(Protocol):
    """What :func:`adaptive_scan` needs from a live analysis: wait for it, then read it."""

    def wait(self, timeout: float | None = None) -> bool:
        """True once every frame emitted so far has been analysed; False on timeout."""

    def results(self, run_uid: str) -> ScanResults:
        """Per-frame results of run ``run_uid`` so far."""


@dataclass
class _RunEnd:
    run: RunFrames
    stop: dict


class LiveEncoder:
    """Subscriber that encodes each frame of ``detector`` with ``encoder`` and bins it.

    Frames come through the package's frame-source layer (:class:`~gisaxs_bluesky.frames.
    RunFrames`, the live callback's too); ``motors`` are the event readings recorded as
    positions. ``store`` (a :class:`gisaxs_bluesky.store.DerivedStore`) also writes the rows
    to Tiled, in the same layout as the DAE binning callback. A frame that cannot be read or
    encoded gets an unprocessed row, and the reason is kept in :attr:`errors`. Each frame's
    geometry (``geometry`` / ``geometry_fallback`` as for the live callback, then the run's
    ``gisaxs_geometry`` and incidence motor) goes to the encoder; a q-grid encoder needs it.
    """

    def __init__(
        self,
        encoder: Any,
        *,
        detector: str = "pilatus",
        motors: Sequence[str] = ("sample_x",),
        binner: Any = None,
        store: Any = None,
        geometry: Any = None,
        geometry_fallback: Any = None,
    ) -> None:
        self.encoder = encoder
        self.detector = detector
        self.motors = tuple(motors)
        self.binner = binner if binner is not None else make_binner(encoder)
        self.pipeline = BinningPipeline(encoder, self.binner, batch_size=1)
        self.store = store
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._rows: dict[str, list[dict]] = {}  # run uid -> rows
        self._starts: dict[str, dict] = {}
        self._runs: dict[str, RunFrames] = {}
        self._writers: dict[str, Any] = {}
        self._readers = FrameReaders(frame_timeout=10.0)
        # each frame's geometry (a q-grid encoder needs it), as DAEBinningCallback(geometry=)
        self._options = RunFramesOptions(
            image_key=detector, motors=self.motors,
            geometry=FrameGeometry(geometry, fallback=geometry_fallback))
        self._router = RunRouter([self._factory])
        self._thread = threading.Thread(target=self._work, name="gisaxs-live-encoder",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ documents (RE thread)
    def __call__(self, name: str, doc: dict) -> None:
        try:
            self._router(name, doc)
        except Exception as exc:  # noqa: BLE001 - never abort the scan
            logger.exception("LiveEncoder failed on a %r document", name)
            self.errors.append(f"{name} document: {type(exc).__name__}: {exc}")

    def _factory(self, name: str, start: dict) -> tuple[list, list]:
        with self._lock:
            self._starts[start["uid"]] = dict(start)
            self._rows.setdefault(start["uid"], [])
        run = RunFrames(start, emit=self._queue.put, readers=self._readers,
                        options=self._options, note=self.errors.append)
        with self._lock:
            self._runs[start["uid"]] = run

        def on_stop(doc_name: str, doc: dict) -> None:
            if doc_name == "stop":
                self._queue.put(_RunEnd(run, doc))

        return [run, on_stop], []

    # --------------------------------------------------------------------- worker thread
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    self._readers.close()
                    return
                if isinstance(item, _RunEnd):
                    self._finish(item)
                else:
                    self._encode(item)
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything
                logger.exception("live encoding failed")
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                self._queue.task_done()

    def _encode(self, frame: FrameRef) -> None:
        pixels = None
        errors = []
        try:
            pixels = frame.load()
        except Exception as exc:  # noqa: BLE001 - an unprocessed row says so
            errors.append(f"frame seq_num={frame.seq_num}: cannot read from {frame.source}: "
                          f"{type(exc).__name__}: {exc}")
        result = self.pipeline.process(
            [pixels], [frame.seq_num], [frame.time],
            {m: [frame.positions.get(m, np.nan)] for m in self.motors},
            geometries=[frame.metadata.get("geometry")])
        self.errors += errors + [e for e in result.errors if not errors]
        row = {k: v[0] for k, v in result.rows.items()}
        with self._lock:
            self._rows.setdefault(frame.run_uid, []).append(row)
        if self.store is not None:
            self._writer(frame.run_uid).append(result.rows)

    def _writer(self, run: str) -> Any:
        writer = self._writers.get(run)
        if writer is None:
            start = self._starts.get(run, {})
            frames = self._runs.get(run)
            writer = self._writers[run] = self.pipeline.open_writer(
                self.store, run, scan_id=start.get("scan_id"), motors=list(self.motors),
                extra_metadata={"writer": "gisaxs_bluesky.adaptive.LiveEncoder"},
                geometry=None if frames is None else frames.geometry_summary)
        return writer

    def _finish(self, end: _RunEnd) -> None:
        end.run.release()
        with self._lock:
            self._runs.pop(end.run.uid, None)
        writer = self._writers.pop(end.run.uid, None)
        if writer is not None:
            status = "complete" if end.stop.get("exit_status") == "success" else "failed"
            writer.finish(status)

    # ------------------------------------------------------------------------- plan side
    def wait(self, timeout: float | None = 120.0) -> bool:
        """True once every frame seen so far is encoded (and written); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def rows(self, run_uid: str) -> list[dict]:
        """Copies of the result rows of ``run_uid`` (seq_num order)."""
        with self._lock:
            rows = [dict(r) for r in self._rows.get(run_uid, [])]
        return sorted(rows, key=lambda r: r["seq_num"])

    def start_doc(self, run_uid: str) -> dict:
        """The start document of ``run_uid`` (KeyError if never seen)."""
        with self._lock:
            return dict(self._starts[run_uid])

    def results(self, run_uid: str) -> ScanResults:
        """:class:`ScanResults` of ``run_uid`` so far (empty if nothing was encoded)."""
        return ScanResults.from_rows(self.rows(run_uid), self.motors,
                                     tuple(self.encoder.noise_kinds))

    def close(self) -> None:
        """Stop the worker thread (after the queue drains)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)


class DerivedCallbackResults:
    """Reads results the DAE binning callback wrote to Tiled (after its ``flush``/``wait``).

    ``node_for(run_uid)`` defaults to the single node under ``gisaxs_derived`` whose
    ``raw_uid`` metadata is ``run_uid``.
    """

    def __init__(self, callback: Any, client: Any, motors: Sequence[str] = ("sample_x",),
                 root: str = DEFAULT_ROOT) -> None:
        self.callback = callback
        self.client = client
        self.motors = tuple(motors)
        self.root = root

    def wait(self, timeout: float | None = 120.0) -> bool:
        """The callback's :meth:`~gisaxs_bluesky.callbacks.DAEBinningCallback.wait`: True once
        every frame is binned and its row is in Tiled; False on timeout."""
        return bool(self.callback.wait(timeout=timeout))

    def node_for(self, run_uid: str) -> Any:
        """The callback's derived node of ``run_uid`` (None before its first row)."""
        if self.root not in self.client:
            return None
        root = self.client[self.root]
        encoder = getattr(self.callback, "encoder", None)
        if encoder is not None:
            key = DerivedStore.node_key(run_uid, encoder.info())
            return root[key] if key in root else None
        from tiled.queries import Key

        hits = root.search(Key("raw_uid") == run_uid)
        keys = [k for k in hits if not k.endswith("-suggestions")]
        return hits[keys[-1]] if keys else None

    def results(self, run_uid: str) -> ScanResults:
        node = self.node_for(run_uid)
        if node is None:
            return ScanResults.empty(self.motors)
        return ScanResults.from_dataset(read_derived(node), self.motors)
