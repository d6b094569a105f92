"""Live DAE binning of area-detector frames as a Bluesky callback, results written to Tiled.

Usage (all a user types)::

    RE.subscribe(TiledWriter(client, batch_size=1))
    RE.subscribe(DAEBinningCallback(client))

Each frame of the image stream is encoded by the denoising autoencoder, assigned a bin by the
online binner and written as one row of the derived node ``/<root>/<raw_uid>-<model>-<ver>``
beside the raw run (see :mod:`gisaxs_bluesky.store`); ``raw_uid`` in its metadata links back.

Where frames come from, per event of the image stream:

* inline: the image array is in the event's ``data`` (2-D, or 3-D with a leading 1);
* ``stream_resource``/``stream_datum`` with ``application/x-hdf5``: read live from the file
  (SWMR, dataset refreshed; a frame that lags behind its datum is retried up to
  ``frame_timeout`` seconds);
* legacy ``resource``/``datum``: through ``handler_registry`` (e.g. ``AD_HDF5`` from
  ``area_detector_handlers`` when installed);
* otherwise from Tiled (``client[raw_uid][stream][image_key][seq_num - 1]``), e.g. when the
  detector files are not visible from this machine but ``TiledWriter`` registered them.

Threading: the RunEngine thread only parses documents and enqueues frame references; a single
worker thread encodes in batches (``batch_size`` frames or ``batch_timeout`` seconds, whichever
first), bins in frame order, and writes to Tiled; behind a backlog a look-ahead thread reads
and preprocesses the next batch meanwhile, so frame reads and preprocessing overlap the model
pass. A run's rows go to Tiled at most once per ``write_interval`` seconds (its first batch at
once; sooner when ``max_write_rows`` rows wait; all of them at :meth:`~DAEBinningCallback.wait`
and at the run's end), since each Tiled write costs about as much as encoding a batch.

Queue-full policy: at most ``max_queue`` frames whose pixels are held in memory (inline
frames, copied on arrival: a detector may reuse its buffer) wait for the worker. When that
bound is reached the frame is *spilled* at once (``put_timeout``: 0 s by default; each second
of it is a second the RunEngine waits per frame) to a folder of this callback's own under
``spill_dir`` as ``.npy`` and queued as a file reference (a few bytes), processed in order when
the worker catches up and counted in ``n_spilled``. Frames read from files or Tiled are always
queued as references. Only if spilling fails too (disk full) is a frame dropped: it still gets a row
(``bin_id == UNPROCESSED_BIN``), its seq_num goes into ``dropped_seq_nums`` and the reason into
the node's ``errors``. No frame disappears silently.

Failures (bad frame shape/dtype/NaN, missing image key, unreadable file, model error, Tiled
down, malformed documents) are logged and recorded (``DerivedRunWriter.record_error``); rows of
unreadable or unencodable frames have ``bin_id == UNPROCESSED_BIN``. Nothing is raised into
the RunEngine. Tiled faults (down, 5xx, a key refused with 401/403) are absorbed by the store's
local backup (rows, final metadata, the reason): re-sent every ``retry_interval`` s and at
:meth:`~DAEBinningCallback.wait`, also after the run has finished (:attr:`pending` lists what
waits); after :meth:`~DAEBinningCallback.close`, ``DerivedStore.flush_backups()`` does it. The
node's write lock (:meth:`DerivedStore.node_lock`) keeps a replay of the same run from writing
it at the same time.

On ``stop`` the worker drains the run's frames, then writes ``status`` (``complete``, or
``failed`` when the raw run did not succeed, rows could not be stored, or no frame could be
encoded), ``bin_summary``, ``outlier_count``, ``n_unprocessed``, ``n_spilled`` and
``dropped_seq_nums``; the binner state is saved so bins stay consistent across scans. The
RunEngine does not wait for this; call :meth:`DAEBinningCallback.wait` to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from event_model import DocumentRouter, unpack_event_page

from ..binning import OnlineBinner
from ..h5live import SwmrFrameReader
from ..pipeline import UNPROCESSED_BIN, BinningPipeline, PreparedFrames
from ..store import DerivedStore

__all__ = [
    "DAEBinningCallback",
    "default_binner_path",
    "default_spill_dir",
    "find_image_key",
    "scanned_motors",
    "serialized",
]

logger = logging.getLogger(__name__)

HDF5_MIMETYPES = ("application/x-hdf5", "application/x-hdf5-swmr")
#: event pages held for descriptors not seen yet (a malformed stream); beyond, they are dropped
MAX_ORPHAN_PAGES = 1000


def _cache_base() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gisaxs_bluesky"


def default_binner_path(model_key: str) -> Path:
    """Per-user binner state file for one model (keyed by sha256), so bins persist across scans."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key) or "unknown"
    return _cache_base() / "binner" / f"{safe}.json"


def default_spill_dir() -> Path:
    """Per-user directory for frames spilled from a full queue."""
    return _cache_base() / "spill"


def find_image_key(data_keys: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The data key holding a 2-D image (shape [H, W] or [1, H, W]); the largest if several."""
    best, best_size = None, 0
    for key, dk in data_keys.items():
        shape = [int(s) for s in (dk.get("shape") or []) if s is not None]
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 2:
            continue
        size = shape[0] * shape[1]
        if size > best_size:
            best, best_size = key, size
    return best


def scanned_motors(start: Mapping[str, Any]) -> list[str]:
    """Motor names from the start document: ``motors``, else ``hints.dimensions`` fields."""
    motors = [str(m) for m in (start.get("motors") or [])]
    if not motors:
        for fields, _stream in (start.get("hints") or {}).get("dimensions") or []:
            motors += [str(f) for f in fields if f != "time"]
    return list(dict.fromkeys(motors))


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


# ---------------------------------------------------------------------------- per-run state
@dataclass
class _Stream:
    name: str
    image_key: str
    shape: tuple[int, ...] | None


@dataclass
class _RunState:
    uid: str
    start: dict
    motors: list[str]
    descriptors: dict[str, _Stream] = field(default_factory=dict)
    image_descriptor: str | None = None
    stream_resources: dict[str, dict] = field(default_factory=dict)
    resources: dict[str, dict] = field(default_factory=dict)
    datums: dict[str, dict] = field(default_factory=dict)
    # (descriptor uid, seq_num) -> loader / waiting event
    datum_by_seq: dict[tuple[str, int], tuple[Callable[[], np.ndarray], str]] = field(
        default_factory=dict)
    events_waiting: dict[tuple[str, int], tuple[float, dict[str, float]]] = field(
        default_factory=dict)
    pending_errors: list[str] = field(default_factory=list)
    writer: Any = None
    writer_failed: str | None = None
    lock: Any = None  # the node's NodeLock while this callback writes it
    fault_noted: str | None = None  # the store fault last recorded in the node's errors
    next_retry: float = 0.0  # finished, rows/status in the local backup: next re-send (monotonic)
    seen: set[tuple[str, int]] = field(default_factory=set)  # (descriptor, seq_num) queued
    h5_paths: set[str] = field(default_factory=set)  # HDF5 files read (closed at the finish)
    n_lost: int = 0  # events that could not become a row (descriptor never came)
    n_enqueued: int = 0
    n_rows: int = 0
    n_unprocessed: int = 0
    n_spilled: int = 0
    dropped: list[int] = field(default_factory=list)
    store_errors: int = 0
    # rows encoded but not yet written (worker only): written at most once per write_interval
    # (the first batch at once), at max_write_rows, on wait()/flush(), and before the finish
    unwritten: list[tuple[dict[str, np.ndarray], list[str]]] = field(default_factory=list)
    last_write: float = float("-inf")
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def n_unwritten(self) -> int:
        return sum(len(rows["seq_num"]) for rows, _ in self.unwritten)

    @property
    def scan_id(self) -> int | None:
        sid = self.start.get("scan_id")
        return int(sid) if isinstance(sid, int | np.integer) else None


@dataclass
class _Frame:
    run: _RunState
    seq_num: int
    time: float
    positions: dict[str, float]
    data: np.ndarray | None = None
    loader: Callable[[], np.ndarray] | None = None
    source: str = "event"
    error: str | None = None
    in_memory: bool = False


@dataclass
class _Finish:
    run: _RunState
    exit_status: str
    reason: str


class _Sentinel:
    pass


_CLOSE = _Sentinel()


# ------------------------------------------------------------------------------ readers
def _uri_to_path(uri: str) -> str:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"stream_resource uri {uri!r}: scheme {parsed.scheme!r} is not a file")
    return unquote(parsed.path) if parsed.scheme else uri


def _default_handlers() -> dict[str, Callable[..., Any]]:
    try:
        from area_detector_handlers.handlers import AreaDetectorHDF5Handler
    except ImportError:
        return {}
    return {"AD_HDF5": AreaDetectorHDF5Handler}


# ---------------------------------------------------------------------------- callback
class DAEBinningCallback(DocumentRouter):
    """Bluesky callback: encode, bin and store every frame of a run's image stream.

    Parameters (all optional except ``client``): ``encoder`` (default ``load_pretrained()``),
    ``binner`` (default: saved state for this model under ``binner_state_path`` or
    ``make_binner(encoder)``), ``image_key`` (default: found in the descriptor),
    ``stream_name`` (default: the first stream with an image), ``root``/``backup_dir`` of the
    :class:`~gisaxs_bluesky.store.DerivedStore`, batching (``batch_size``,
    ``batch_timeout``; Tiled writes: at most one per ``write_interval`` s per run, sooner
    when ``max_write_rows`` wait), queue policy (``max_queue``, ``put_timeout``, ``spill_dir``),
    ``frame_timeout`` (wait for lagging HDF5 frames), ``handler_registry`` for legacy
    resources, ``mask`` (pixels to ignore), ``extra_metadata`` for every derived node,
    ``write_lock`` held around every Tiled write (see :func:`serialized`; needed with SQLite
    table storage), ``read_from_tiled`` to read every non-inline frame from Tiled instead of
    its file (``TiledWriter`` must be subscribed before this callback), ``torch_threads``:
    CPU threads for inference, set process-wide with ``torch.set_num_threads`` ("auto": all
    cores but one, which stays with the RunEngine and TiledWriter; None: leave torch as is).

    Raises ``CheckpointError`` here (not in the RunEngine) if no encoder is given and the
    pretrained weights are missing. Call :meth:`wait` before the process exits: the worker is
    a daemon thread.
    """

    def __init__(
        self,
        client: Any,
        *,
        encoder: Any = None,
        binner: OnlineBinner | None = None,
        image_key: str | None = None,
        stream_name: str | None = None,
        root: str = "gisaxs_derived",
        backup_dir: str | Path | None = None,
        binner_state_path: str | Path | None = None,
        persist_binner: bool | None = None,
        batch_size: int = 16,
        batch_timeout: float = 0.5,
        max_write_rows: int = 256,
        write_interval: float = 1.0,
        max_queue: int = 64,
        put_timeout: float = 0.0,
        spill_dir: str | Path | None = None,
        frame_timeout: float = 5.0,
        handler_registry: Mapping[str, Callable[..., Any]] | None = None,
        mask: np.ndarray | None = None,
        device: str = "auto",
        extra_metadata: Mapping[str, Any] | None = None,
        write_lock: Any = None,
        read_from_tiled: bool = False,
        torch_threads: int | str | None = "auto",
        retry_interval: float = 5.0,
    ) -> None:
        super().__init__()
        from ..models import load_pretrained, make_binner

        if batch_size < 1 or max_queue < 1 or max_write_rows < 1:
            raise ValueError(f"batch_size={batch_size}, max_queue={max_queue} and "
                             f"max_write_rows={max_write_rows} must be >= 1")
        if write_interval < 0:
            raise ValueError(f"write_interval={write_interval} must be >= 0")
        if retry_interval <= 0:
            raise ValueError(f"retry_interval={retry_interval} must be > 0")
        if batch_timeout <= 0 or put_timeout < 0 or frame_timeout < 0:
            raise ValueError(
                f"batch_timeout={batch_timeout} must be > 0, put_timeout={put_timeout} and "
                f"frame_timeout={frame_timeout} >= 0"
            )
        self.client = client
        self.encoder = encoder if encoder is not None else load_pretrained(device)
        if torch_threads is not None and self.encoder.device.type == "cpu":
            import torch

            n = max(1, (os.cpu_count() or 2) - 1) if torch_threads == "auto" else int(torch_threads)
            if n < 1:
                raise ValueError(f"torch_threads={torch_threads} must be >= 1, 'auto' or None")
            torch.set_num_threads(n)
        model_key = self.encoder.sha256 or f"{self.encoder.name}-{self.encoder.version}"
        if persist_binner is None:
            persist_binner = binner is None or binner_state_path is not None
        self.binner_state_path: Path | None = None
        if persist_binner:
            self.binner_state_path = Path(binner_state_path or default_binner_path(model_key))
        if binner is None:
            binner = self._load_binner(make_binner)
        self.pipeline = BinningPipeline(self.encoder, binner, mask=mask, batch_size=batch_size)
        self.image_key = image_key
        self.stream_name = stream_name
        self.root = root
        self.backup_dir = backup_dir
        self.batch_size = int(batch_size)
        self.batch_timeout = float(batch_timeout)
        self.max_write_rows = int(max_write_rows)
        self.write_interval = float(write_interval)
        self.max_queue = int(max_queue)
        self.put_timeout = float(put_timeout)
        self.spill_dir = Path(spill_dir) if spill_dir is not None else default_spill_dir()
        # two callbacks of one account (two models side by side) share spill_dir: each spills
        # into folders of its own, and removes only those
        self._spill_tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.retry_interval = float(retry_interval)
        self.frame_timeout = float(frame_timeout)
        self.handler_registry = dict(_default_handlers(), **(handler_registry or {}))
        self.extra_metadata = dict(extra_metadata or {})
        self.write_lock = write_lock if write_lock is not None else contextlib.nullcontext()
        self.read_from_tiled = bool(read_from_tiled)

        self._runs: dict[str, _RunState] = {}
        self._descriptor_run: dict[str, str] = {}
        self._resource_run: dict[str, str] = {}
        self._datum_run: dict[str, str] = {}
        self._queue: deque[Any] = deque()
        self._cond = threading.Condition()
        self._in_memory = 0
        self._unfinished = 0
        self._store: DerivedStore | None = None
        self._h5 = SwmrFrameReader(self.frame_timeout)
        self._handlers: dict[str, Any] = {}
        self._worker: threading.Thread | None = None
        self._ahead_pool: ThreadPoolExecutor | None = None
        self._unwritten_runs: dict[str, _RunState] = {}
        self._live_runs: dict[str, _RunState] = {}  # worker: runs with an open derived node
        # worker: finished runs whose rows or final metadata wait in the local backup (Tiled
        # down or refusing the key), re-sent every retry_interval s and at wait()
        self._unsettled: dict[str, _RunState] = {}
        # events whose descriptor has not come (yet): descriptor uid -> event pages
        self._orphans: dict[str, list[dict]] = {}
        self._n_orphans = 0
        # under _cond: wait() asks (_flush_gen += 1) for every row and bin summary in Tiled
        # now; the worker answers once its queue is empty (_flushed_gen catches up)
        self._flush_gen = 0
        self._flushed_gen = 0
        self._closed = False
        self._lock_nodes = True  # take each node's NodeLock (replay's callback method holds it)
        self.last_writer: Any = None  # writer of the most recently finished run

    @property
    def binner(self) -> OnlineBinner:
        return self.pipeline.binner

    def _load_binner(self, make_binner: Callable[[Any], OnlineBinner]) -> OnlineBinner:
        fresh = make_binner(self.encoder)
        path = self.binner_state_path
        if path is None or not path.exists():
            return fresh
        try:
            saved = OnlineBinner.load(path)
        except ValueError as exc:
            logger.warning("ignoring binner state %s: %s", path, exc)
            return fresh
        if saved.model_sha256 != fresh.model_sha256:
            logger.warning("binner state %s is for another model; starting fresh bins", path)
            return fresh
        return saved

    # ------------------------------------------------------------------ document entry
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
            try:
                run = self._run_for(name, doc)
            except Exception:  # noqa: BLE001
                run = None
            if run is not None:
                self._note(run, f"{name} document: {type(exc).__name__}: {exc}")
            return name, doc

    def _note(self, run: _RunState, message: str) -> None:
        """Queue an error for the run's derived node (recorded by the worker)."""
        with self._cond:
            run.pending_errors.append(message)

    def _take_errors(self, run: _RunState) -> list[str]:
        with self._cond:
            errors, run.pending_errors = run.pending_errors, []
        return errors

    def _run_for(self, name: str, doc: Mapping[str, Any]) -> _RunState | None:
        uid = None
        if name == "start":
            uid = doc.get("uid")
        elif "run_start" in doc:
            uid = doc.get("run_start")
        elif "descriptor" in doc:
            uid = self._descriptor_run.get(doc["descriptor"])
        elif name in ("datum", "datum_page"):
            uid = self._resource_run.get(doc.get("resource", ""))
        return self._runs.get(uid) if uid else None

    # ---------------------------------------------------------------------- documents
    def start(self, doc: dict) -> None:
        uid = doc["uid"]
        if uid in self._runs:  # the open run keeps its state, frames and node
            self._note(self._runs[uid], f"start document of run {uid} repeated; ignored")
            return
        run = _RunState(uid=uid, start=dict(doc), motors=scanned_motors(doc))
        self._runs[run.uid] = run
        self._ensure_worker()

    def descriptor(self, doc: dict) -> None:
        run = self._runs.get(doc.get("run_start", ""))
        if run is None:
            return
        self._descriptor_run[doc["uid"]] = run.uid
        data_keys = doc.get("data_keys") or {}
        key = self.image_key if self.image_key is not None else find_image_key(data_keys)
        name = doc.get("name", "primary")
        if key is None or key not in data_keys:
            if self.image_key is not None and (self.stream_name in (None, name)):
                self._note(run, 
                    f"stream {name!r}: image_key {self.image_key!r} not in data keys "
                    f"{sorted(data_keys)}"
                )
            return
        if self.stream_name is not None and name != self.stream_name:
            return
        if run.image_descriptor is not None:
            first = run.descriptors[run.image_descriptor]
            if first.name != name:
                logger.info("run %s: ignoring image stream %r (binning %r)", run.uid, name,
                            first.name)
                return
        shape = [int(s) for s in data_keys[key].get("shape") or [] if s is not None]
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if any(s <= 0 for s in shape):  # e.g. [-1, -1]: size not known up front
            shape = []  # the run's first good frame sets it
        run.descriptors[doc["uid"]] = _Stream(name, key, tuple(shape) if shape else None)
        run.image_descriptor = run.image_descriptor or doc["uid"]
        for page in self._orphans.pop(doc["uid"], []):  # events that came before it
            self._n_orphans -= 1
            self.event_page(page)

    def event_page(self, doc: dict) -> None:
        stream = None
        uid = self._descriptor_run.get(doc["descriptor"])
        if uid is None and self._runs:  # its descriptor has not come (yet): keep it
            if self._n_orphans < MAX_ORPHAN_PAGES:
                self._orphans.setdefault(doc["descriptor"], []).append(doc)
                self._n_orphans += 1
            else:
                only = next(iter(self._runs.values())) if len(self._runs) == 1 else None
                if only is not None:
                    only.n_lost += len(doc.get("seq_num") or [])
                    self._note(only, f"event page for unknown descriptor {doc['descriptor']!r} "
                                     f"dropped (seq_nums {list(doc.get('seq_num') or [])})")
            return
        run = self._runs.get(uid or "")
        if run is not None:
            stream = run.descriptors.get(doc["descriptor"])
        if run is None or stream is None:
            return
        for event in unpack_event_page(doc):
            try:
                self._on_event(run, stream, event)
            except Exception as exc:  # noqa: BLE001 - one bad event must not hide the rest
                logger.exception("event seq_num=%s", event.get("seq_num"))
                self._note(run, 
                    f"event seq_num={event.get('seq_num')}: {type(exc).__name__}: {exc}"
                )

    def _on_event(self, run: _RunState, stream: _Stream, event: dict) -> None:
        seq = int(event["seq_num"])
        data = event.get("data") or {}
        positions = {m: _as_float(data.get(m)) for m in run.motors}
        t = float(event.get("time", time.time()))
        key = (event["descriptor"], seq)
        if key in run.seen:
            self._note(run, f"event seq_num={seq} repeated in stream {stream.name!r}: the "
                            "later frame is ignored, the first one binned")
            return
        if stream.image_key in data:
            run.seen.add(key)
            value = data[stream.image_key]
            filled = (event.get("filled") or {}).get(stream.image_key, True)
            if isinstance(value, str) and filled is not True:
                loader, source = self._datum_loader(run, stream, value, seq)
                self._put(_Frame(run, seq, t, positions, loader=loader, source=source))
            elif value is None:
                self._put(_Frame(run, seq, t, positions, source="event data",
                                 error=f"frame seq_num={seq}: image {stream.image_key!r} is "
                                       "None in the event"))
            else:
                # a copy: a detector may reuse one buffer for every frame, and this frame is
                # encoded later, on the worker
                try:
                    value = np.array(value, copy=True)
                except Exception:  # noqa: BLE001 - check_frame names what is wrong
                    pass
                self._put(_Frame(run, seq, t, positions, data=value, source="event data",
                                 in_memory=True))
        elif key in run.datum_by_seq:
            run.seen.add(key)
            loader, source = run.datum_by_seq.pop(key)
            self._put(_Frame(run, seq, t, positions, loader=loader, source=source))
        else:
            run.seen.add(key)
            run.events_waiting[key] = (t, positions)

    def stream_resource(self, doc: dict) -> None:
        run = self._runs.get(doc.get("run_start", ""))
        if run is not None:
            run.stream_resources[doc["uid"]] = dict(doc)
            self._resource_run[doc["uid"]] = run.uid

    def stream_datum(self, doc: dict) -> None:
        run = self._runs.get(self._descriptor_run.get(doc["descriptor"], ""))
        if run is None:
            return
        stream = run.descriptors.get(doc["descriptor"])
        resource = run.stream_resources.get(doc["stream_resource"])
        if stream is None or resource is None or resource.get("data_key") != stream.image_key:
            return
        s0, s1 = int(doc["seq_nums"]["start"]), int(doc["seq_nums"]["stop"])
        i0 = int(doc["indices"]["start"])
        for seq in range(s0, s1):
            loader, source = self._stream_loader(run, stream, resource, i0 + seq - s0, seq)
            key = (doc["descriptor"], seq)
            waiting = run.events_waiting.pop(key, None)
            if waiting is None:
                run.datum_by_seq[key] = (loader, source)
            else:
                t, positions = waiting
                self._put(_Frame(run, seq, t, positions, loader=loader, source=source))

    def resource(self, doc: dict) -> None:
        run = self._runs.get(doc.get("run_start", ""))
        if run is not None:
            run.resources[doc["uid"]] = dict(doc)
            self._resource_run[doc["uid"]] = run.uid

    def datum(self, doc: dict) -> None:
        uid = self._resource_run.get(doc["resource"])
        if uid in self._runs:
            self._runs[uid].datums[doc["datum_id"]] = dict(doc)
            self._datum_run[doc["datum_id"]] = uid

    def stop(self, doc: dict) -> None:
        only = len(self._runs) == 1
        run = self._runs.pop(doc.get("run_start", ""), None)
        if run is None:
            return
        if only and self._orphans:  # events of this run whose descriptor never came
            pages, self._orphans, self._n_orphans = self._orphans, {}, 0
            for desc, ps in pages.items():
                seqs = [int(s) for p in ps for s in p.get("seq_num") or []]
                run.n_lost += len(seqs)
                self._note(run, f"{len(seqs)} event(s) seq_num={seqs[:20]} for descriptor "
                                f"{desc!r}, which never arrived: not binned")
        # frames whose event never came (fly scans): NaN positions; events without frames
        for (desc, seq), (loader, source) in sorted(run.datum_by_seq.items(), key=_by_seq):
            nan = {m: float("nan") for m in run.motors}
            self._put(_Frame(run, seq, float(doc.get("time", time.time())), nan, loader=loader,
                             source=source))
        for (desc, seq), (t, positions) in sorted(run.events_waiting.items(), key=_by_seq):
            self._put(_Frame(run, seq, t, positions, source="event",
                             error=f"frame seq_num={seq}: no frame data arrived for image key "
                                   f"{run.descriptors[desc].image_key!r} by the stop document"))
        run.datum_by_seq.clear()
        run.events_waiting.clear()
        for d in list(run.descriptors):
            self._descriptor_run.pop(d, None)
        for d in [k for k, v in self._descriptor_run.items() if v == run.uid]:
            self._descriptor_run.pop(d, None)
        for r in list(run.stream_resources) + list(run.resources):
            self._resource_run.pop(r, None)
        for d in list(run.datums):
            self._datum_run.pop(d, None)
        if not run.descriptors and not run.n_enqueued and not run.pending_errors:
            run.done.set()  # no image stream: nothing to write
            return
        self._put(_Finish(run, str(doc.get("exit_status", "success")), str(doc.get("reason", ""))))

    # ------------------------------------------------------------------------ loaders
    def _stream_loader(
        self, run: _RunState, stream: _Stream, resource: dict, index: int, seq: int
    ) -> tuple[Callable[[], np.ndarray], str]:
        mimetype = resource.get("mimetype", "")
        if mimetype in HDF5_MIMETYPES and not self.read_from_tiled:
            try:
                path = _uri_to_path(resource["uri"])
            except ValueError:
                path = None
            dataset = (resource.get("parameters") or {}).get("dataset", "/entry/data/data")
            if path is not None and os.path.exists(os.path.dirname(path) or "."):
                tiled = self._tiled_loader(run, stream, seq)
                run.h5_paths.add(path)

                def load() -> np.ndarray:
                    try:
                        return self._h5.read(path, dataset, index)
                    except (OSError, TimeoutError):
                        if not os.path.exists(path):
                            return tiled()
                        raise

                return load, f"{path}:{dataset}[{index}]"
        return self._tiled_loader(run, stream, seq), f"tiled {run.uid}/{stream.name}"

    def _datum_loader(
        self, run: _RunState, stream: _Stream, datum_id: str, seq: int
    ) -> tuple[Callable[[], np.ndarray], str]:
        datum = run.datums.get(datum_id)
        resource = run.resources.get(datum["resource"]) if datum else None
        handler_cls = self.handler_registry.get(resource["spec"]) if resource else None
        if datum is None or resource is None or handler_cls is None or self.read_from_tiled:
            why = ("unknown datum" if datum is None else "unknown resource"
                   if resource is None else "read_from_tiled" if self.read_from_tiled
                   else f"no handler for spec {resource['spec']!r}")
            logger.debug("datum %s: %s; reading from Tiled", datum_id, why)
            return self._tiled_loader(run, stream, seq), f"tiled ({why})"
        rkey = resource["uid"]

        def load() -> np.ndarray:
            handler = self._handlers.get(rkey)
            if handler is None:
                path = os.path.join(resource.get("root", ""), resource["resource_path"])
                handler = handler_cls(path, **resource.get("resource_kwargs", {}))
                self._handlers[rkey] = handler
            return np.asarray(handler(**datum.get("datum_kwargs", {})))

        return load, f"{resource['spec']} {resource['resource_path']} {datum['datum_kwargs']}"

    def _tiled_loader(self, run: _RunState, stream: _Stream, seq: int) -> Callable[[], np.ndarray]:
        uid, stream_name, key, timeout = run.uid, stream.name, stream.image_key, self.frame_timeout

        def load() -> np.ndarray:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    node = self.client[uid][stream_name][key]
                    if node.shape[0] >= seq:
                        return np.asarray(node[seq - 1])
                    last = f"{node.shape[0]} frames stored"
                except KeyError as exc:
                    last = f"KeyError {exc}"
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"frame seq_num={seq} not in Tiled {uid}/{stream_name}/{key} after "
                        f"{timeout:.1f} s ({last})"
                    )
                time.sleep(0.05)

        return load

    # ------------------------------------------------------------------------- queue
    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._closed = False
            self._worker = threading.Thread(target=self._loop, name="dae-binning", daemon=True)
            self._worker.start()

    def _put(self, item: _Frame | _Finish) -> None:
        """Queue an item (RunEngine thread); applies the queue-full policy to in-memory frames."""
        if isinstance(item, _Frame):
            item.run.n_enqueued += 1
        with self._cond:
            if isinstance(item, _Frame) and item.in_memory and self._in_memory >= self.max_queue:
                deadline = time.monotonic() + self.put_timeout
                while self._in_memory >= self.max_queue:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                full = self._in_memory >= self.max_queue
            else:
                full = False
        if full:
            self._spill(item)  # type: ignore[arg-type]
        with self._cond:
            if isinstance(item, _Frame) and item.in_memory:
                self._in_memory += 1
            self._unfinished += 1
            self._queue.append(item)
            self._cond.notify_all()

    def _spill(self, item: _Frame) -> None:
        run = item.run
        path = self._spill_folder(run) / f"seq-{item.seq_num:08d}.npy"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.asarray(item.data), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - disk full, bad object...
            run.dropped.append(item.seq_num)
            item.error = (f"frame seq_num={item.seq_num}: dropped, queue full "
                          f"({self.max_queue} frames) and spill to {path} failed: {exc}")
            logger.error(item.error)
        else:
            run.n_spilled += 1
            item.loader = lambda: _load_and_remove(path)
            item.source = f"spilled {path}"
        item.data = None
        item.in_memory = False

    def _spill_folder(self, run: _RunState) -> Path:
        return self.spill_dir / f"{run.uid}-{self._spill_tag}"

    def _take_batch(self) -> list[Any]:
        """Worker: wait for items; return up to batch_size frames (+ a trailing control item)."""
        with self._cond:
            while not self._queue:
                if self._flush_gen > self._flushed_gen:
                    return []  # a tick: wait() wants everything in Tiled
                dues = [r.last_write + self.write_interval for r in self._unwritten_runs.values()]
                dues += [r.next_retry for r in self._unsettled.values()]
                if dues:
                    remaining = min(dues) - time.monotonic()
                    if remaining <= 0:
                        return []  # a tick: rows are due, or a backup is to be re-sent
                    self._cond.wait(remaining)
                else:
                    self._cond.wait()
            first = self._queue.popleft()
            batch = [first]
            if not isinstance(first, _Frame):
                return batch
            deadline = time.monotonic() + self.batch_timeout
            while len(batch) < self.batch_size:
                if self._queue:
                    item = self._queue.popleft()
                    batch.append(item)
                    if not isinstance(item, _Frame):
                        break
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _loop(self) -> None:
        """Worker: batches in order. Behind a backlog, while a batch is encoded and binned
        here, the next one is read and preprocessed on the look-ahead thread: frame reads and
        preprocessing (numba, no GIL) use the core the model pass leaves free."""
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
                self._write_due(force=flushing or closing)
                if flushing:
                    self._flush_summaries()
                self._retry_unsettled(force=flushing or closing)
            except Exception:  # noqa: BLE001
                logger.exception("DAE binning worker failed writing rows")
            finally:
                with self._cond:
                    self._in_memory -= sum(1 for i in batch if isinstance(i, _Frame)
                                           and i.in_memory)
                    self._unfinished -= len(batch)
                    self._flushed_gen = max(self._flushed_gen, flush_gen)
                    self._cond.notify_all()
            if closing:
                for run in self._unsettled.values():  # flush_backups() may take them over
                    self._release(run)
                self._h5.close()
                if self._ahead_pool is not None:
                    self._ahead_pool.shutdown(wait=False)
                    self._ahead_pool = None
                return

    def _look_ahead(self) -> tuple[list[Any], Future | None] | None:
        """Worker: behind a backlog (a full batch queued), take the next batch and start
        preparing its frames. At a scan's pace there is none: frames then wait up to
        batch_timeout to form a batch, as without look-ahead, which costs the scan less CPU
        than encoding and writing each frame on its own."""
        with self._cond:  # (re-entrant) only this thread takes items: no waiting below
            if len(self._queue) < self.batch_size:
                return None
            batch = self._take_batch()
        if not any(isinstance(item, _Frame) for item in batch):
            return batch, None
        if self._ahead_pool is None:
            self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="dae-binning-prepare")
        return batch, self._ahead_pool.submit(self._prepare_batch, batch)

    @staticmethod
    def _segments(batch: list[Any]) -> list[list[Any]]:
        """Consecutive frames of one run form a segment; a control item is one on its own."""
        segments: list[list[Any]] = []
        frames: list[_Frame] = []
        for item in batch:
            if isinstance(item, _Frame):
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
        return [self._prepare(seg) if isinstance(seg[0], _Frame) else None
                for seg in self._segments(batch)]

    def _handle(self, batch: list[Any], prepared: list[PreparedFrames | None] | None = None
                ) -> None:
        for k, segment in enumerate(self._segments(batch)):
            item = segment[0]
            if isinstance(item, _Frame):
                self._process(segment, None if prepared is None else prepared[k])
            elif isinstance(item, _Finish):
                self._finish(item)

    # ------------------------------------------------------------------------ worker
    def _writer(self, run: _RunState) -> Any:
        if run.writer is not None or run.writer_failed:
            return run.writer
        try:
            if self._store is None:
                self._store = DerivedStore(self.client, root=self.root, backup_dir=self.backup_dir)
            key = self._store.node_key(run.uid, self.encoder.info())
            run.lock = self._store.node_lock(key) if self._lock_nodes else None
            # held by a replay of this run, from this machine: write anyway (stored seq_nums
            # are skipped), the live rows come first
            if run.lock is not None and not run.lock.acquire(timeout=1.0):
                self._note(run, f"node {key} is also being written by {run.lock.holder()} "
                                "(a replay?); rows already stored are not written twice")
                run.lock = None
            stream = run.descriptors.get(run.image_descriptor or "")
            md = {
                "stream": stream.name if stream else None,
                "image_key": stream.image_key if stream else None,
                "plan_name": run.start.get("plan_name"),
                "raw_start_time": run.start.get("time"),
                "producer": "gisaxs_bluesky.callbacks.DAEBinningCallback",
                **self.extra_metadata,
            }
            run.writer = self.pipeline.open_writer(
                self._store, run.uid, scan_id=run.scan_id, motors=run.motors, extra_metadata=md
            )
            self._live_runs[run.uid] = run
        except Exception as exc:  # noqa: BLE001
            run.writer_failed = f"cannot open derived node: {type(exc).__name__}: {exc}"
            logger.exception("run %s: %s", run.uid, run.writer_failed)
        return run.writer

    def _prepare(self, items: list[_Frame]) -> PreparedFrames:
        """Read and preprocess one run's frames (worker or look-ahead thread)."""
        run = items[0].run
        errors: list[str] = []
        frames: list[Any] = []
        for it in items:
            if it.error is not None:
                errors.append(it.error)
                frames.append(None)
                continue
            try:
                frames.append(it.data if it.loader is None else it.loader())
            except Exception as exc:  # noqa: BLE001
                errors.append(f"frame seq_num={it.seq_num}: cannot read from {it.source}: "
                              f"{type(exc).__name__}: {exc}")
                frames.append(None)
            it.data = None
        expected = None
        if run.image_descriptor is not None:
            expected = run.descriptors[run.image_descriptor].shape
        prepared = self.pipeline.prepare(frames, [it.seq_num for it in items],
                                         expected_shape=expected)
        reported = {f"frame seq_num={it.seq_num}: no frame data"
                    for it, f in zip(items, frames, strict=True) if f is None}
        prepared.errors = errors + [e for e in prepared.errors if e not in reported]
        return prepared

    def _process(self, items: list[_Frame], prepared: PreparedFrames | None = None) -> None:
        """Worker: encode and bin a batch of one run's frames (read and preprocessed here
        unless the look-ahead did it); their rows wait in ``run.unwritten`` for Tiled."""
        run = items[0].run
        errors = self._take_errors(run)
        if prepared is None:
            prepared = self._prepare(items)
        positions = {m: [it.positions.get(m, float("nan")) for it in items] for m in run.motors}
        result = self.pipeline.process_prepared(prepared, [it.time for it in items], positions)
        errors += result.errors
        run.n_rows += result.n_rows
        run.n_unprocessed += int(np.count_nonzero(result.rows["bin_id"] == UNPROCESSED_BIN))
        run.unwritten.append((result.rows, errors))
        self._unwritten_runs[run.uid] = run

    def _write_due(self, force: bool = False) -> None:
        """Worker: write a run's encoded rows at most once per ``write_interval`` (its first
        batch at once, so the derived node appears with the first frames), or when
        ``max_write_rows`` wait; all of them when ``force``d (:meth:`wait`, :meth:`close`).
        One Tiled append (+ bin summary) costs about as much as encoding a batch of 16 on 2
        cores, and with SQLite table storage it holds the write lock TiledWriter needs: fewer,
        larger writes raise the frame rate the callback holds and cost the scan less."""
        now = time.monotonic()
        for run in list(self._unwritten_runs.values()):
            if (force or run.n_unwritten >= self.max_write_rows
                    or now - run.last_write >= self.write_interval):
                self._write_rows(run)

    def _flush_summaries(self) -> None:
        """Worker: push bin summaries held back by the store's summary_interval (one try each:
        a writer whose Tiled is down keeps them for later)."""
        for run in list(self._live_runs.values()):
            if run.writer is not None:
                with self.write_lock:
                    run.writer.flush()

    def _write_rows(self, run: _RunState) -> None:
        self._unwritten_runs.pop(run.uid, None)
        if not run.unwritten:
            return
        run.last_write = time.monotonic()
        parts, run.unwritten = run.unwritten, []
        rows = {k: np.concatenate([r[k] for r, _ in parts]) for k in parts[0][0]}
        errors = [e for _, errs in parts for e in errs]
        with self.write_lock:  # only Tiled I/O under the lock, never the model
            self._store_rows(run, rows, errors)

    def _store_rows(self, run: _RunState, rows: dict[str, np.ndarray], errors: list[str]) -> None:
        writer = self._writer(run)
        if writer is None:
            logger.error("run %s: %d rows not stored (%s)", run.uid, len(rows["seq_num"]),
                         run.writer_failed)
            run.store_errors += 1
            return
        try:
            writer.append(rows)
        except Exception as exc:  # noqa: BLE001
            run.store_errors += 1
            errors.append(f"rows seq_num={rows['seq_num'].tolist()} not stored: "
                          f"{type(exc).__name__}: {exc}")
            logger.exception("run %s: append failed", run.uid)
        self._note_fault(run, writer, errors)
        if errors:
            for e in errors:
                logger.warning("run %s: %s", run.uid, e)
            writer.record_error("; ".join(errors))

    @staticmethod
    def _note_fault(run: _RunState, writer: Any, errors: list[str]) -> None:
        """Say on the node (once per fault) that rows wait in the local backup, and why."""
        fault = getattr(writer, "fault", None)
        if fault and writer.pending and fault != run.fault_noted:
            run.fault_noted = fault
            errors.append(f"{fault}: rows kept in the local backup {writer.backup_path}, "
                          "re-sent when Tiled takes them")
            logger.error("run %s: %s", run.uid, errors[-1])

    def _finish(self, item: _Finish) -> None:
        try:
            self._write_rows(item.run)
        except Exception:  # noqa: BLE001
            logger.exception("run %s: writing the last rows failed", item.run.uid)
        # after the last write: a run whose node opened there is no longer live either
        self._live_runs.pop(item.run.uid, None)
        with self.write_lock:
            self._finish_locked(item)

    def _retry_unsettled(self, force: bool = False) -> None:
        """Worker: re-send finished runs whose rows or final status wait in the backup."""
        now = time.monotonic()
        for run in list(self._unsettled.values()):
            if not force and now < run.next_retry:
                continue
            try:
                with self.write_lock:
                    run.writer.flush()
            except Exception:  # noqa: BLE001
                logger.exception("run %s: re-sending the local backup failed", run.uid)
            if run.writer.pending:
                run.next_retry = time.monotonic() + self.retry_interval
            else:
                logger.info("run %s: local backup delivered to Tiled", run.uid)
                self._unsettled.pop(run.uid, None)
                self._release(run)

    @staticmethod
    def _release(run: _RunState) -> None:
        if run.lock is not None:
            run.lock.release()
            run.lock = None

    def _finish_locked(self, item: _Finish) -> None:
        run = item.run
        try:
            pending = self._take_errors(run)
            if pending:
                writer = self._writer(run)
                if writer is not None:
                    writer.record_error("; ".join(pending))
            failed = (
                item.exit_status != "success"
                or run.writer_failed is not None
                or run.store_errors > 0
                or run.n_lost > 0
                or (run.n_rows > 0 and run.n_unprocessed == run.n_rows)
            )
            self._save_binner()
            writer = self._writer(run)
            if writer is not None:
                summary = self.binner.summary()
                writer.finish(
                    "failed" if failed else "complete",
                    raw_exit_status=item.exit_status,
                    raw_reason=item.reason,
                    binner_summary=summary,
                    n_unprocessed=run.n_unprocessed,
                    n_spilled=run.n_spilled,
                    dropped_seq_nums=list(run.dropped),
                )
                self.last_writer = writer
                if writer.pending:  # Tiled down or refusing: re-sent later by the worker
                    run.next_retry = time.monotonic() + self.retry_interval
                    self._unsettled[run.uid] = run
        except Exception:  # noqa: BLE001
            logger.exception("run %s: finishing the derived node failed", run.uid)
        finally:
            if run.uid not in self._unsettled:
                self._release(run)
            for path in run.h5_paths:  # this run's files: not kept open until close()
                self._h5.close(path)
            for r in run.resources:
                self._handlers.pop(r, None)
            spill = self._spill_folder(run)
            if spill.is_dir():
                for p in spill.glob("*.npy"):
                    p.unlink(missing_ok=True)
                try:
                    spill.rmdir()
                except OSError:
                    pass
            run.done.set()

    def _save_binner(self) -> None:
        if self.binner_state_path is None:
            return
        try:
            self.binner.save(self.binner_state_path)
        except Exception as exc:  # noqa: BLE001
            logger.warning("cannot save binner state to %s: %s", self.binner_state_path, exc)

    # ------------------------------------------------------------------------ control
    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued frame and run finish is processed and every encoded row is
        in Tiled (or its local backup: see :attr:`pending`); False on timeout. Backups of
        finished runs are re-sent here too, and every ``retry_interval`` s meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._worker is None or not self._worker.is_alive():
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

    def flush(self, timeout: float | None = None) -> bool:
        """Alias of :meth:`wait`: every frame seen so far encoded and its row written."""
        return self.wait(timeout)

    @property
    def pending(self) -> dict[str, str]:
        """Derived nodes of finished runs whose rows or final status wait in the local backup:
        node key -> why (e.g. "Tiled refused the API key ..."). Re-sent every
        ``retry_interval`` s and at :meth:`wait`; after :meth:`close`, by
        ``DerivedStore(client).flush_backups()``."""
        return {run.writer.key: run.writer.fault or "Tiled unreachable"
                for run in list(self._unsettled.values()) if run.writer is not None}

    def close(self, timeout: float | None = 30.0) -> None:
        """Drain the queue and stop the worker thread (a later run starts it again).

        Runs still open (their stop document never came: the scan was aborted, or a callback
        subscribed before this one raised on it) are closed ``failed`` with that reason.
        """
        worker = self._worker
        if worker is None or not worker.is_alive():
            return
        for run in list(self._runs.values()):
            self._runs.pop(run.uid, None)
            self._put(_Finish(run, "abort", "no stop document reached DAEBinningCallback "
                                            "before close(): the run was aborted, or a "
                                            "callback subscribed before it raised"))
        with self._cond:
            self._closed = True
            self._unfinished += 1
            self._queue.append(_CLOSE)
            self._cond.notify_all()
        worker.join(timeout)

    @property
    def queued(self) -> int:
        """Items (frames and run finishes) not yet processed."""
        with self._cond:
            return self._unfinished


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _by_seq(kv: tuple[tuple[str, int], Any]) -> int:
    return kv[0][1]


def _load_and_remove(path: Path) -> np.ndarray:
    frame = np.load(path, allow_pickle=False)
    path.unlink(missing_ok=True)
    return frame

