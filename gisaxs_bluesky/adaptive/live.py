"""Live per-frame DAE results for the adaptive plan: callback -> queue -> plan.

:class:`LiveEncoder` is a light in-process RunEngine subscriber: it pairs each event with its
``stream_datum``, reads the frame from the detector's SWMR HDF5 file, and a worker thread
encodes + bins it (the plan waits on :meth:`LiveEncoder.wait` through ``bps.wait_for``, so the
RunEngine loop stays responsive). Optionally it writes the rows to Tiled with
:class:`gisaxs_bluesky.store.DerivedStore`, in the same layout as the DAE binning callback.

:class:`DerivedCallbackResults` adapts the real ``DAEBinningCallback`` (its ``flush``/``wait``
and its Tiled node) to the same two-method interface, :class:`ResultsSource`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

import numpy as np

from ..h5live import SwmrFrameReader
from .core import ScanResults

__all__ = ["DerivedCallbackResults", "LiveEncoder", "ResultsSource"]

logger = logging.getLogger(__name__)


@runtime_checkable
class ResultsSource(Protocol):
    """What :func:`adaptive_scan` needs from a live analysis: wait for it, then read it."""

    def wait(self, timeout: float = 120.0) -> None:
        """Block until every frame emitted so far has been analysed (raise on failure)."""

    def results(self, run_uid: str) -> ScanResults:
        """Per-frame results of run ``run_uid`` so far."""


def _uri_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"stream_resource uri={uri!r}: only file:// URIs can be read")
    return Path(unquote(parsed.path))


class LiveEncoder:
    """Subscriber that encodes each frame of ``detector`` with ``encoder`` and bins it.

    ``motors`` are the event data keys recorded as positions (default: every non-detector
    number in the event). ``store`` (a :class:`gisaxs_bluesky.store.DerivedStore`) also writes
    the rows to Tiled under ``gisaxs_derived``.
    """

    def __init__(
        self,
        encoder: Any,
        *,
        detector: str = "pilatus",
        motors: Sequence[str] = ("sample_x",),
        binner: Any = None,
        store: Any = None,
    ) -> None:
        from ..models import make_binner

        self.encoder = encoder
        self.detector = detector
        self.motors = tuple(motors)
        self.binner = binner if binner is not None else make_binner(encoder)
        self.store = store
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._resources: dict[str, dict] = {}
        self._datums: dict[str, list[dict]] = {}  # descriptor uid -> stream_datum docs
        self._descriptors: dict[str, dict] = {}
        self._pending: dict[str, list[dict]] = {}  # events waiting for their datum
        self._rows: dict[str, list[dict]] = {}  # run uid -> rows
        self._starts: dict[str, dict] = {}
        self._writers: dict[str, Any] = {}
        self._errors: list[BaseException] = []
        self._h5 = SwmrFrameReader(timeout=10.0)  # worker thread only
        self._thread = threading.Thread(target=self._work, name="gisaxs-live-encoder",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ documents (RE thread)
    def __call__(self, name: str, doc: dict) -> None:
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(doc)

    def _on_start(self, doc: dict) -> None:
        with self._lock:
            self._starts[doc["uid"]] = doc
            self._rows.setdefault(doc["uid"], [])

    def _on_descriptor(self, doc: dict) -> None:
        with self._lock:
            self._descriptors[doc["uid"]] = doc

    def _on_stream_resource(self, doc: dict) -> None:
        if doc.get("data_key") == self.detector:
            with self._lock:
                self._resources[doc["uid"]] = doc

    def _on_stream_datum(self, doc: dict) -> None:
        with self._lock:
            if doc["stream_resource"] not in self._resources:
                return
            self._datums.setdefault(doc["descriptor"], []).append(doc)
            waiting = self._pending.pop(doc["descriptor"], [])
        for event in waiting:
            self._on_event(event)

    def _on_event(self, doc: dict) -> None:
        with self._lock:
            desc = self._descriptors.get(doc["descriptor"])
            if desc is None or self.detector not in desc.get("data_keys", {}):
                return
            item = self._locate(doc)
            if item is None:
                self._pending.setdefault(doc["descriptor"], []).append(doc)
                return
        self._queue.put(item)

    def _locate(self, event: dict) -> dict | None:
        seq = int(event["seq_num"])
        for datum in self._datums.get(event["descriptor"], []):
            s0, s1 = datum["seq_nums"]["start"], datum["seq_nums"]["stop"]
            if s0 <= seq < s1:
                res = self._resources[datum["stream_resource"]]
                index = int(datum["indices"]["start"]) + (seq - s0)
                desc = self._descriptors[event["descriptor"]]
                return {
                    "run": desc["run_start"],
                    "seq_num": seq,
                    "time": float(event["time"]),
                    "path": _uri_path(res["uri"]),
                    "dataset": res["parameters"]["dataset"],
                    "index": index,
                    "positions": {m: float(event["data"].get(m, np.nan)) for m in self.motors},
                }
        return None

    def _on_stop(self, doc: dict) -> None:
        self._queue.put({"stop": doc})

    # --------------------------------------------------------------------- worker thread
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    self._h5.close()
                    return
                if "stop" in item:
                    self._finish(item["stop"])
                else:
                    self._encode(item)
            except BaseException as exc:  # noqa: BLE001 - reported by wait()
                logger.exception("live encoding failed")
                self._errors.append(exc)
            finally:
                self._queue.task_done()

    def _encode(self, item: dict) -> None:
        frame = self._h5.read(item["path"], item["dataset"], item["index"])
        enc = self.encoder.encode(frame)
        assign = self.binner.assign(enc.identity_latent, enc.recon_error)
        row = {
            "seq_num": item["seq_num"],
            "time": item["time"],
            "bin_id": int(assign.bin_id[0]),
            "outlier_score": float(assign.outlier_score[0]),
            "is_outlier": bool(assign.is_outlier[0]),
            "recon_error": float(enc.recon_error[0]),
            "noise_prob": enc.noise_prob[0].astype(float),
            "latent": enc.latent[0].astype(float),
            **item["positions"],
        }
        with self._lock:
            self._rows.setdefault(item["run"], []).append(row)
        if self.store is not None:
            self._write(item["run"], row)

    def _write(self, run: str, row: dict) -> None:
        writer = self._writers.get(run)
        if writer is None:
            start = self._starts.get(run, {})
            writer = self.store.open(
                run,
                scan_id=start.get("scan_id"),
                model=self.encoder.info(),
                binner=self.binner.settings(),
                latent_dim=int(self.encoder.latent_dim),
                noise_kinds=list(self.encoder.noise_kinds),
                motors=list(self.motors),
                extra_metadata={"writer": "gisaxs_bluesky.adaptive.LiveEncoder"},
            )
            self._writers[run] = writer
        cols: dict[str, Any] = {
            k: np.array([row[k]]) for k in
            ("seq_num", "time", "bin_id", "outlier_score", "is_outlier", "recon_error",
             *self.motors)
        }
        cols["latent"] = row["latent"][None]
        cols["noise_prob"] = row["noise_prob"][None]
        writer.append(cols)

    def _finish(self, stop: dict) -> None:
        self._h5.close()
        writer = self._writers.pop(stop["run_start"], None)
        if writer is not None:
            status = "complete" if stop.get("exit_status") == "success" else "failed"
            writer.finish(status)

    # ------------------------------------------------------------------------- plan side
    def wait(self, timeout: float = 120.0) -> None:
        """Block until every queued frame is encoded; re-raise the first worker error."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"live encoding still has {self._queue.unfinished_tasks} frame(s) queued "
                    f"after timeout={timeout} s"
                )
            time.sleep(0.005)
        if self._errors:
            raise RuntimeError(f"live encoding failed: {self._errors[0]!r}") from self._errors[0]

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
                 root: str = "gisaxs_derived") -> None:
        self.callback = callback
        self.client = client
        self.motors = tuple(motors)
        self.root = root

    def wait(self, timeout: float = 120.0) -> None:
        """Block on the callback's ``wait``/``flush``; TimeoutError if it does not drain."""
        fn = getattr(self.callback, "wait", None) or getattr(self.callback, "flush")
        if fn(timeout=timeout) is False:
            raise TimeoutError(f"DAE binning callback still busy after timeout={timeout} s")

    def node_for(self, run_uid: str) -> Any:
        """The callback's derived node of ``run_uid`` (None before its first row)."""
        from ..store import DerivedStore

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
        from ..store import read_derived

        node = self.node_for(run_uid)
        if node is None:
            return ScanResults.empty(self.motors)
        return ScanResults.from_dataset(read_derived(node), self.motors)
