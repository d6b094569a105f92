"""Live DAE binning of area-detector frames as a Bluesky callback, results written to Tiled.

Usage (all a user types)::

    RE.subscribe(TiledWriter(client, batch_size=1))
    RE.subscribe(DAEBinningCallback(client))

Each frame of the image stream is encoded by the denoising autoencoder, assigned a bin by the
online binner and written as one row of the derived node ``/<root>/<raw_uid>-<model>-<ver>``
beside the raw run (see :mod:`gisaxs_bluesky.store`); ``raw_uid`` in its metadata links back.

The callback is a thin facade, as ``TiledWriter`` is: an :class:`event_model.RunRouter` makes
one :class:`~gisaxs_bluesky.callbacks.run.RunBinning` per run (the run's frames through the
frame-source layer :mod:`gisaxs_bluesky.frames`: inline, HDF5 read live with SWMR, legacy
handlers, or Tiled; and the run's state, which dies with it); the queue, spill and worker
thread are in :mod:`~gisaxs_bluesky.callbacks.worker`, the write policy (when rows go to
Tiled, finishing a node, faults and the local backup) in
:mod:`~gisaxs_bluesky.callbacks.writes`. The RunEngine thread only routes documents and
queues frames. Nothing is raised into the RunEngine: bad frames, malformed documents, model
errors and Tiled faults are logged and recorded in the node's ``errors``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from event_model import DocumentRouter, RunRouter

from ..binning import OnlineBinner
from ..frames import FrameGeometry, FrameReaders, RunFramesOptions, find_image_key, scanned_motors
from ..models import load_binner, load_pretrained
from ..models.qmodel import plain_encoder
from ..pipeline import BinningPipeline
from ..runtime import RuntimeConfig, cache_dir
from .run import RunBinning
from .worker import BinningWorker
from .writes import WritePolicy

__all__ = [
    "DAEBinningCallback",
    "default_binner_path",
    "default_spill_dir",
    "find_image_key",
    "scanned_motors",
    "serialized",
]

logger = logging.getLogger(__name__)

#: event pages held for descriptors not seen yet (a malformed stream); beyond, they are dropped
MAX_ORPHAN_PAGES = 1000


def default_binner_path(model_key: str) -> Path:
    """Per-user binner state file for one model (keyed by sha256), so bins persist across scans."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key) or "unknown"
    return cache_dir() / "binner" / f"{safe}.json"


def default_spill_dir() -> Path:
    """Per-user directory for frames spilled from a full queue."""
    return RuntimeConfig().spill_path


def serialized(callback: Callable[[str, dict], Any], lock: Any) -> Callable[[str, dict], Any]:
    """``callback`` called under ``lock``: pair with ``DAEBinningCallback(write_lock=lock)``.

    Needed when Tiled keeps tables in SQLite (one writer at a time; a concurrent append
    fails with "database is locked"): wrap ``TiledWriter`` with the same lock so raw and
    derived writes never overlap. Not needed with PostgreSQL table storage.
    """

    def locked(name: str, doc: dict) -> Any:
        with lock:
            return callback(name, doc)

    locked.__wrapped__ = callback  # type: ignore[attr-defined]
    return locked


class _NoFill:
    """RunRouter's filler: pixels are read on the worker thread (through the run's own
    Filler in :class:`~gisaxs_bluesky.frames.RunFrames`), never on the RunEngine thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def _same(self, doc: dict) -> dict:
        return doc

    descriptor = event_page = resource = datum = datum_page = _same
    stream_resource = stream_datum = _same


class DAEBinningCallback(DocumentRouter):
    """Bluesky callback: encode, bin and store every frame of a run's image stream.

    Runtime settings (Tiled ``root``, ``backup_dir``, ``spill_dir``, ``batch_size``,
    ``batch_timeout``, ``write_interval``, ``max_write_rows``, ``summary_interval``,
    ``max_queue``, ``put_timeout``, ``frame_timeout``, ``probe_timeout``, ``torch_threads``)
    come from ``config`` (:class:`~gisaxs_bluesky.runtime.RuntimeConfig`) and may be given
    as keyword arguments too. Everything else is optional: ``encoder`` (default
    ``load_pretrained(device)``), ``binner`` (default: the state saved for this model under
    ``binner_state_path``, else fresh), ``persist_binner``, ``image_key`` / ``stream_name``
    (default: the 2-D data key of the first stream with one), ``handler_registry`` for legacy
    resources, ``read_from_tiled`` (read every non-inline frame from Tiled; TiledWriter must
    be subscribed first), ``mask`` (pixels to ignore), ``extra_metadata`` for every node,
    ``write_lock`` held around every Tiled write (see :func:`serialized`), ``retry_interval``
    between re-sends of a finished run's local backup.

    Geometry: each frame's is resolved by the frame layer
    (:class:`~gisaxs_bluesky.frames.FrameGeometry`): ``geometry`` (an ``InstrumentGeometry``,
    a mapping of ``gisaxs_geometry`` keys, or a PONI / JSON file path) first, then the start
    document's ``gisaxs_geometry``, the descriptor's configuration, the incidence motor of
    each event, and last ``geometry_fallback`` (fields the user chose to assume). A q-grid
    encoder needs it: a frame without it gets a row flagged with the missing key; the pixel
    model ignores it. Either way the node's metadata records the run's geometry.

    Raises ``CheckpointError`` here (not in the RunEngine) if no encoder is given and the
    pretrained weights are missing. Call :meth:`wait` before the process exits: the worker is
    a daemon thread.
    """

    def __init__(
        self,
        client: Any,
        config: RuntimeConfig | None = None,
        *,
        encoder: Any = None,
        binner: OnlineBinner | None = None,
        image_key: str | None = None,
        stream_name: str | None = None,
        binner_state_path: str | Path | None = None,
        persist_binner: bool | None = None,
        handler_registry: Mapping[str, Callable[..., Any]] | None = None,
        read_from_tiled: bool = False,
        mask: np.ndarray | None = None,
        device: str = "auto",
        extra_metadata: Mapping[str, Any] | None = None,
        write_lock: Any = None,
        retry_interval: float = 5.0,
        lock_nodes: bool = True,
        geometry: Any = None,
        geometry_fallback: Any = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.config = (config or RuntimeConfig()).replace(**settings)
        self.client = client
        self.encoder = plain_encoder(encoder) if encoder is not None else load_pretrained(device)
        threads = self.config.n_torch_threads
        if threads is not None and self.encoder.device.type == "cpu":
            import torch

            torch.set_num_threads(threads)
        model_key = self.encoder.sha256 or f"{self.encoder.name}-{self.encoder.version}"
        if persist_binner is None:
            persist_binner = binner is None or binner_state_path is not None
        state_path = (Path(binner_state_path or default_binner_path(model_key))
                      if persist_binner else None)
        if binner is None:
            binner = load_binner(state_path, self.encoder)
        self.pipeline = BinningPipeline(self.encoder, binner, mask=mask,
                                        batch_size=self.config.batch_size)
        self.readers = FrameReaders(client, frame_timeout=self.config.frame_timeout,
                                    read_from_tiled=read_from_tiled,
                                    handler_registry=handler_registry)
        self.frame_options = RunFramesOptions(
            image_key=image_key, stream_name=stream_name,
            geometry=FrameGeometry(geometry, fallback=geometry_fallback))
        self.writes = WritePolicy(client, self.pipeline, self.config, write_lock=write_lock,
                                  extra_metadata=extra_metadata, binner_state_path=state_path,
                                  retry_interval=retry_interval, lock_nodes=lock_nodes)
        self.worker = BinningWorker(self.pipeline, self.writes, self.config)
        self._router = RunRouter([self._factory], filler_class=_NoFill)
        self._open: dict[str, RunBinning] = {}  # runs whose stop has not come
        # events whose descriptor has not come (yet): descriptor uid -> event pages
        self._orphans: dict[str, list[dict]] = {}

    @property
    def binner(self) -> OnlineBinner:
        return self.pipeline.binner

    @property
    def binner_state_path(self) -> Path | None:
        return self.writes.binner_state_path

    @property
    def spill_dir(self) -> Path:
        return self.worker.spill_dir

    # ---------------------------------------------------------------------- documents
    def _factory(self, name: str, start: dict) -> tuple[list, list]:
        run = RunBinning(start, put=self.worker.put, readers=self.readers,
                         options=self.frame_options)
        self._open[run.uid] = run
        self.worker.start()
        return [run], []

    def __call__(self, name: str, doc: dict, validate: bool = False) -> tuple[str, dict]:
        """Route a document; any exception is logged and recorded, never raised."""
        if not isinstance(doc, Mapping):
            logger.error("DAEBinningCallback: %r document is a %s, not a mapping; ignored",
                         name, type(doc).__name__)
            return name, doc
        try:
            return super().__call__(name, doc, validate)
        except Exception as exc:  # noqa: BLE001 - must never abort the scan
            logger.exception("DAEBinningCallback failed on %r document", name)
            run = self._open.get(doc.get("run_start") or doc.get("uid") or "")
            if run is None and len(self._open) == 1:
                run = next(iter(self._open.values()))
            if run is not None:
                run.note(f"{name} document: {type(exc).__name__}: {exc}")
            return name, doc

    def start(self, doc: dict) -> None:
        run = self._open.get(doc.get("uid", ""))
        if run is not None:  # the open run keeps its state, frames and node
            run.note(f"start document of run {run.uid} repeated; ignored")
            return
        self._router("start", doc)

    def descriptor(self, doc: dict) -> None:
        self._router("descriptor", doc)
        for page in self._orphans.pop(doc["uid"], []):  # events that came before it
            self.event_page(page)

    def event_page(self, doc: dict) -> None:
        try:
            self._router("event_page", doc)
        except KeyError:  # its descriptor has not come (yet): keep it
            if sum(len(p) for p in self._orphans.values()) < MAX_ORPHAN_PAGES:
                self._orphans.setdefault(doc["descriptor"], []).append(doc)
            elif len(self._open) == 1:
                run = next(iter(self._open.values()))
                run.n_lost += len(doc.get("seq_num") or [])
                run.note(f"event page for unknown descriptor {doc['descriptor']!r} dropped "
                         f"(seq_nums {list(doc.get('seq_num') or [])})")

    def stream_resource(self, doc: dict) -> None:
        self._router("stream_resource", doc)

    def stream_datum(self, doc: dict) -> None:
        self._router("stream_datum", doc)

    def resource(self, doc: dict) -> None:
        self._router("resource", doc)

    def datum(self, doc: dict) -> None:
        self._router("datum", doc)

    def datum_page(self, doc: dict) -> None:
        self._router("datum_page", doc)

    def stop(self, doc: dict) -> None:
        run = self._open.pop(doc.get("run_start", ""), None)
        if run is not None and not self._open and self._orphans:
            # events of this run whose descriptor never came
            pages, self._orphans = self._orphans, {}
            for desc, ps in pages.items():
                seqs = [int(s) for p in ps for s in p.get("seq_num") or []]
                run.n_lost += len(seqs)
                run.note(f"{len(seqs)} event(s) seq_num={seqs[:20]} for descriptor {desc!r}, "
                         "which never arrived: not binned")
        self._router("stop", doc)

    # ------------------------------------------------------------------------ control
    def wait(self, timeout: float | None = None) -> bool:
        """True once every frame seen so far is encoded and binned and its row and the bin
        summary are in Tiled (or its local backup: see :attr:`pending`); False on timeout.
        Backups of finished runs are re-sent here too, and every ``retry_interval`` s."""
        return self.worker.wait(timeout)

    @property
    def pending(self) -> dict[str, str]:
        """Derived nodes of finished runs whose rows or final status wait in the local backup:
        node key -> why (e.g. "Tiled refused the API key ..."). Re-sent every
        ``retry_interval`` s and at :meth:`wait`; after :meth:`close`, by
        ``DerivedStore(client).flush_backups()``."""
        return self.writes.pending

    def close(self, timeout: float | None = 30.0) -> None:
        """Drain the queue and stop the worker thread (a later run starts it again).

        Runs still open (their stop document never came: the scan was aborted, or a callback
        subscribed before this one raised on it) are closed ``failed`` with that reason.
        """
        if not self.worker.alive:
            return
        for run in list(self._open.values()):
            self._open.pop(run.uid, None)
            run.end("abort", "no stop document reached DAEBinningCallback before close(): "
                             "the run was aborted, or a callback subscribed before it raised")
        self._router = RunRouter([self._factory], filler_class=_NoFill)  # the aborted runs' documents go with it
        self.worker.close(timeout)

    @property
    def queued(self) -> int:
        """Items (frames and run finishes) not yet processed."""
        return self.worker.queued
