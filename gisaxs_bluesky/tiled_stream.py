"""The serve consumer driven by Tiled instead of 0MQ: bin each run as TiledWriter writes it.

Analysis side (any machine that reaches Tiled; the RunEngine only runs TiledWriter)::

    gisaxs-bluesky serve --tiled-stream http://tiled:8000/api/v1 --api-key KEY

:class:`TiledStreamConsumer` subscribes to Tiled's root container (websocket streaming, which
needs a Tiled server with a streaming cache, e.g. Redis) and, for each new ``BlueskyRun``, to
the run container and its stream's ``internal`` event table. Each notification wakes a worker
that reads the frames not binned yet from the run's arrays (the same reads as ``replay``) and
writes rows to the run's derived node through :class:`~gisaxs_bluesky.pipeline.BinningPipeline`;
the run's stop document (in the run's metadata) finishes the node. Without streaming on the
server it polls the same way every ``poll_interval_s``. Restarting resumes: rows already
stored are skipped.

The command, ``gisaxs-bluesky serve --tiled-stream`` or ``--zmq`` (the 0MQ consumer of
:mod:`gisaxs_bluesky.serve`), is :mod:`gisaxs_bluesky.serve_cli`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from .callbacks.dae_binning import scanned_motors
from .frames import FrameGeometry, geometry_summary, stream_descriptor
from .models import make_binner
from .pipeline import BinningPipeline
from .replay import find_image_key
from .runtime import DEFAULT_ROOT, RuntimeConfig
from .store import DerivedStore
from .tiled_client import probe_streaming

__all__ = ["TiledStreamConsumer"]

logger = logging.getLogger(__name__)


def _is_bluesky_run(specs: Any) -> bool:
    return any((getattr(s, "name", None) or (s.get("name") if isinstance(s, dict) else s))
               == "BlueskyRun" for s in specs or [])


def _events_table(stream: Any) -> Any:
    """TiledWriter's ``internal`` event table of a stream (a composite node hides it behind
    its flattened columns: ``stream.base``), or None."""
    base = getattr(stream, "base", stream)
    try:
        return base["internal"] if "internal" in base else None
    except Exception:  # noqa: BLE001 - not a container of tables
        return None


class _Follow:
    """One run being binned: its writer and which seq_nums are done."""

    def __init__(self, uid: str) -> None:
        self.uid = uid
        self.writer: Any = None
        self.done: set[int] = set()
        self.image_key: str | None = None
        self.shape: tuple[int, ...] | None = None
        self.finished = False
        self.subs: list[Any] = []
        self.start: dict = {}
        self.descriptor: dict = {}
        self.geometry_recorded = False


class TiledStreamConsumer:
    """Bins new BlueskyRuns in Tiled as they are written; ``start()``/``stop()``.

    ``runs_done`` lists (uid, status) of runs finished; ``errors`` problems seen (never raised
    to the caller: one bad run must not stop the consumer).
    """

    def __init__(
        self,
        client: Any,
        encoder: Any,
        *,
        binner: Any = None,
        root: str = DEFAULT_ROOT,
        stream: str = "primary",
        image_key: str | None = None,
        batch_size: int = RuntimeConfig.batch_size,
        backup_dir: Any = None,
        mode: str = "auto",
        poll_interval_s: float = 1.0,
        existing: bool = False,
        derived_client: Any = None,
        geometry: Any = None,
        geometry_fallback: Any = None,
    ) -> None:
        if mode not in ("auto", "streaming", "polling"):
            raise ValueError(f"mode={mode!r} must be auto, streaming or polling")
        self.client = client
        self.root = root
        self.stream = stream
        self.image_key = image_key
        self.requested_mode = mode
        self.mode = "polling"
        self.mode_reason = ""
        self.poll_interval_s = float(poll_interval_s)
        self.pipeline = BinningPipeline(encoder, binner or make_binner(encoder),
                                        batch_size=batch_size)
        # each frame's geometry, as the frame layer resolves it (DAEBinningCallback(geometry=))
        self.geometry = FrameGeometry(geometry, fallback=geometry_fallback)
        # runs are read from ``client``; derived nodes go to ``derived_client`` (default: same)
        self.store = DerivedStore(derived_client or client, root=root, backup_dir=backup_dir)
        self.follows: dict[str, _Follow] = {}
        self.runs_done: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._known: set[str] = set()
        self._wake: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._root_sub: Any = None
        self._existing = existing
        self._callbacks: list[Any] = []  # Tiled's registries hold callbacks weakly

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> TiledStreamConsumer:
        self._known = set() if self._existing else set(self.client)
        if self.requested_mode != "polling":
            ok, reason = probe_streaming(self.client, [])
            if ok:
                self.mode, self.mode_reason = "streaming", reason
                self._subscribe_root()
            elif self.requested_mode == "streaming":
                raise RuntimeError(reason)
            else:
                self.mode_reason = reason
        logger.info("tiled-stream consumer: %s %s", self.mode, self.mode_reason)
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="gisaxs-tiled-stream")
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.put(None)
        for sub in [self._root_sub, *(s for f in self.follows.values() for s in f.subs)]:
            if sub is not None:
                try:
                    sub.disconnect(wait=False)
                except Exception:  # noqa: BLE001
                    pass
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, uid: str, timeout: float = 60.0) -> bool:
        """Block until run ``uid`` is finished (its stop seen, every frame binned)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            f = self.follows.get(uid)
            if f is not None and f.finished:
                return True
            time.sleep(0.05)
        return False

    # -- subscriptions --------------------------------------------------------------------
    def _subscribe_root(self) -> None:
        from tiled.client.stream import ContainerSubscription

        sub = ContainerSubscription(self.client.context, [])

        def on_child(update: Any) -> None:
            if _is_bluesky_run(update.specs):
                self._wake.put(update.key)

        def on_meta(update: Any) -> None:
            if update.key in self.follows:
                self._wake.put(update.key)  # e.g. the stop document arrived

        self._callbacks += [on_child, on_meta]
        sub.child_created.add_callback(on_child)
        sub.child_metadata_updated.add_callback(on_meta)
        sub.start_in_thread()
        self._root_sub = sub

    def _subscribe_run(self, follow: _Follow, run: Any) -> None:
        """Wake on the run's own updates (streams created) and its events table."""
        if self.mode != "streaming":
            return
        from tiled.client.stream import ContainerSubscription, TableSubscription

        have = {type(s).__name__ + "/".join(s.segments) for s in follow.subs}

        def wake(_update: Any, uid: str = follow.uid) -> None:
            self._wake.put(uid)

        self._callbacks.append(wake)
        targets = [(ContainerSubscription, [follow.uid], "child_created")]
        if self.stream in run and _events_table(run[self.stream]) is not None:
            targets.append((TableSubscription, [follow.uid, self.stream, "internal"],
                            "new_data"))
        for cls, segments, registry in targets:
            if cls.__name__ + "/".join(segments) in have:
                continue
            sub = cls(self.client.context, segments)
            getattr(sub, registry).add_callback(wake)
            sub.start_in_thread(max_size=64_000_000)
            follow.subs.append(sub)

    # -- work -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                uid = self._wake.get(timeout=self.poll_interval_s)
            except queue.Empty:
                uid = ""
            if self._stop.is_set():
                break
            try:
                if uid:
                    self._visit(uid)
                self._scan_new_runs()
                for f in list(self.follows.values()):
                    if not f.finished and (not uid or f.uid != uid):
                        self._visit(f.uid)
            except Exception as exc:  # noqa: BLE001 - Tiled down: keep trying
                msg = f"{type(exc).__name__}: {exc}"
                if not self.errors or self.errors[-1] != msg:
                    self.errors.append(msg)
                    logger.warning("tiled-stream consumer: %s", msg)

    def _scan_new_runs(self) -> None:
        """New top-level BlueskyRuns (the polling path, and a check behind streaming)."""
        if self.mode == "streaming" and self._known:
            return  # the root subscription reports new runs
        for key, node in self.client.items():
            if key in self._known or key == self.root:
                continue
            self._known.add(key)
            if _is_bluesky_run(getattr(node, "specs", [])):
                self._visit(key)

    def _visit(self, uid: str) -> None:
        self._known.add(uid)
        follow = self.follows.get(uid)
        if follow is None:
            follow = self.follows[uid] = _Follow(uid)
        if follow.finished:
            return
        run = self.client[uid]
        self._subscribe_run(follow, run)
        if self.stream not in run:
            return self._maybe_finish(follow, run, available=0)
        stream = run[self.stream]
        if follow.image_key is None:
            data_keys = dict(stream.metadata.get("data_keys", {}))
            try:
                follow.image_key = find_image_key(data_keys, self.image_key,
                                                  where=f"run {uid} stream {self.stream!r}")
            except Exception as exc:  # noqa: BLE001 - no 2-D image: nothing to bin
                follow.finished = True
                self.runs_done.append((uid, "no-image"))
                self.errors.append(str(exc))
                return None
        keys = set(stream)
        if follow.image_key not in keys or "seq_num" not in keys:
            return self._maybe_finish(follow, run, available=0)
        if follow.writer is None:
            start = follow.start = dict(run.metadata.get("start", {}))
            follow.descriptor = stream_descriptor(self.stream, stream.metadata)

            follow.writer = self.pipeline.open_writer(
                self.store, uid, scan_id=start.get("scan_id"), motors=scanned_motors(start),
                extra_metadata={"stream": self.stream, "image_key": follow.image_key,
                                "plan_name": start.get("plan_name"),
                                "raw_start_time": start.get("time"),
                                "producer": "gisaxs_bluesky.tiled_stream"})
            follow.done = set(follow.writer.stored_seq_nums)
        incidence = self.geometry.incidence_key(follow.start, follow.descriptor)
        events = self._events(stream, keys, [*follow.writer.layout.motors, *(
            [incidence] if incidence and incidence not in follow.writer.layout.motors else [])])
        image = stream[follow.image_key]
        seq = events["seq_num"].to_numpy(np.int64)
        n = int(min(len(seq), image.shape[0]))
        todo = [i for i in range(n) if int(seq[i]) not in follow.done]
        if todo:
            self._bin(follow, image, events, todo)
        self._maybe_finish(follow, run, available=n)
        return None

    @staticmethod
    def _events(stream: Any, keys: set[str], motors: list[str]) -> Any:
        """seq_num, time and motor columns of the stream's events, in seq_num order.

        One read of TiledWriter's ``internal`` table (reading its columns one by one as arrays
        races with the appends: the structure can be ahead of the rows)."""
        import pandas as pd

        table = _events_table(stream)
        if table is not None:
            cols = [c for c in ["seq_num", "time", *motors] if c in table.columns]
            df = table.read(columns=cols)
        else:
            df = pd.DataFrame({c: np.asarray(stream[c].read()).reshape(-1)
                               for c in ["seq_num", "time", *motors] if c in keys})
        for c in ["time", *motors]:
            if c not in df:
                df[c] = np.nan
        return df.sort_values("seq_num").reset_index(drop=True)

    def _bin(self, follow: _Follow, image: Any, events: Any, todo: list[int]) -> None:
        lo, hi = todo[0], todo[-1] + 1  # TiledWriter appends in order: one block read
        block = np.asarray(image[lo:hi])
        if block.ndim == 4 and block.shape[1] == 1:
            block = block[:, 0]
        idx = np.asarray(todo)
        frames = [block[i - lo] for i in idx]
        rows = events.iloc[idx]
        geometries = self.geometry.for_readings(follow.start, follow.descriptor, {
            c: rows[c].to_numpy(np.float64) for c in rows.columns}, len(rows))
        if not follow.geometry_recorded:  # the node records the run's geometry
            follow.writer.update_metadata(geometry=geometry_summary(geometries[0]))
            follow.geometry_recorded = True
        result = self.pipeline.process_and_write(
            follow.writer, frames, rows["seq_num"].to_numpy(np.int64),
            rows["time"].to_numpy(np.float64),
            {m: rows[m].to_numpy(np.float64) for m in follow.writer.layout.motors},
            expected_shape=follow.shape, geometries=geometries)
        follow.shape = follow.shape or np.asarray(frames[0]).shape[-2:]
        follow.done.update(int(s) for s in rows["seq_num"])
        for e in result.errors:
            self.errors.append(f"run {follow.uid}: {e}")

    def _maybe_finish(self, follow: _Follow, run: Any, available: int) -> None:
        stop = (run.metadata or {}).get("stop")
        if not stop:
            return
        # the stop document says how many events the stream has: wait for their frames
        expected = (stop.get("num_events") or {}).get(self.stream)
        if expected is not None and available < int(expected):
            return
        status = "complete" if stop.get("exit_status") == "success" else "failed"
        if follow.writer is not None:
            follow.writer.finish(status, binner_summary=self.pipeline.binner.summary())
        follow.finished = True
        for sub in follow.subs:
            try:
                sub.disconnect(wait=False)
            except Exception:  # noqa: BLE001
                pass
        self.runs_done.append((follow.uid, status))
        logger.info("run %s binned (%s, %d frames)", follow.uid, status, len(follow.done))


