"""Follow derived data in Tiled: Tiled's websocket streaming where offered, else polling.

:func:`~gisaxs_bluesky.tiled_client.probe_streaming` says whether the server streams the
root container (a server started with a streaming cache does). :class:`Watcher` then either
subscribes (root container: new runs, metadata updates; each followed run's ``frames``
table: appended rows arrive with their payload, no re-read) or polls (metadata and table
re-read every ``poll_interval_s``). Either way listeners get ``(event, payload)`` with event
in ``runs``, ``rows``, ``meta``, ``suggestions``, ``status``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from ..adaptive.tiled_io import SUGGESTIONS_SPEC
from ..runtime import DEFAULT_ROOT
from ..store import DERIVED_SPEC, TABLE_KEY, tiled_reachable
from ..tiled_client import probe_streaming
from .data import RunRows, ViewConfig, run_summary

__all__ = ["Watcher"]

logger = logging.getLogger(__name__)

Listener = Callable[[str, dict], None]


class Watcher:
    """Keeps :class:`RunRows` of followed runs up to date and tells listeners what changed."""

    def __init__(
        self,
        client: Any,
        *,
        root: str = DEFAULT_ROOT,
        mode: str = "auto",
        poll_interval_s: float = 0.5,
        config: ViewConfig | None = None,
    ) -> None:
        if mode not in ("auto", "streaming", "polling"):
            raise ValueError(f"mode={mode!r} must be auto, streaming or polling")
        self.client = client
        self.root = root
        self.config = config or ViewConfig()
        self.poll_interval_s = float(poll_interval_s)
        self.requested_mode = mode
        self.mode = "polling"
        self.mode_reason = "not started"
        self.error: str | None = None
        self.rows: dict[str, RunRows] = {}
        self.listeners: list[Listener] = []
        self._subs: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # the health probe saw Tiled come back
        self._reachable = True
        self._thread: threading.Thread | None = None
        self._meta_seen: dict[str, float] = {}
        self._tables: dict[str, Any] = {}  # polling: frames table clients of followed runs
        self._runs: list[dict] | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Choose streaming or polling and start the background thread."""
        self._thread = threading.Thread(target=self._loop, name="gisaxs-view-watch",
                                        daemon=True)
        self._choose_mode()
        self._thread.start()
        # the page hears of an outage even while a request of the loop hangs in the Tiled
        # client's retries (which last longer than a user waits)
        threading.Thread(target=self._health, name="gisaxs-view-health", daemon=True).start()

    def _health(self) -> None:
        """Probe Tiled every second: say when it goes away and when it is back.

        The probe owns the "unreachable" message: it sets it and clears it again, so the
        page's banner goes within a second of Tiled answering even while the loop is still
        inside a request that the Tiled client retries with back-off. While Tiled is away
        the loop sends nothing (no request piles up in those retries).
        """
        while not self._stop.wait(1.0):
            reachable = tiled_reachable(self.client, timeout=5.0)
            if reachable == self._reachable:
                continue
            self._reachable = reachable
            if not reachable:
                self.error = (f"Tiled: ConnectionError: Tiled at {self.client.context.api_uri}"
                              " is unreachable; retrying")
                logger.warning("view: %s", self.error)
            else:
                logger.info("view: Tiled at %s answers again", self.client.context.api_uri)
                self.error = None
                self._wake.set()
            self._emit("status", self.status())

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for sub in list(self._subs.values()):
            try:
                sub.disconnect(wait=False)
            except Exception:  # noqa: BLE001
                pass
        self._subs.clear()
        if self._thread is not None:
            self._thread.join(5)

    def _choose_mode(self) -> None:
        if self.requested_mode == "polling":
            self.mode, self.mode_reason = "polling", "polling chosen with --mode polling"
            return
        ok, reason = self._probe()
        if ok:
            self.mode, self.mode_reason = "streaming", reason
            self._subscribe_root()
        elif self.requested_mode == "streaming":
            raise RuntimeError(f"--mode streaming: {reason}")
        else:
            self.mode = "polling"
            self.mode_reason = f"polling every {self.poll_interval_s:g} s: {reason}"
        logger.info("view updates: %s (%s)", self.mode, self.mode_reason)

    def _probe(self) -> tuple[bool, str]:
        segments = [self.root] if self._root_exists() else []
        return probe_streaming(self.client, segments)

    def _root_exists(self) -> bool:
        try:
            return self.root in self.client
        except Exception:  # noqa: BLE001
            return False

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "mode_reason": self.mode_reason, "error": self.error,
                "poll_interval_s": self.poll_interval_s}

    def _emit(self, event: str, payload: dict) -> None:
        for fn in list(self.listeners):
            try:
                fn(event, payload)
            except Exception:  # noqa: BLE001 - one bad listener must not stop the others
                logger.exception("view listener failed on %s", event)

    # -- runs ---------------------------------------------------------------------------
    def runs(self, refresh: bool = False) -> list[dict]:
        """Derived runs, newest first (suggestion nodes left out)."""
        if self._runs is None or refresh:
            out = []
            if self._root_exists():
                for key, node in self.client[self.root].items():
                    specs = {getattr(s, "name", s) for s in getattr(node, "specs", [])}
                    if SUGGESTIONS_SPEC in specs or key.endswith("-suggestions"):
                        continue
                    if specs and DERIVED_SPEC not in specs:
                        continue
                    out.append(run_summary(key, node.metadata))
            out.sort(key=lambda r: r["created"], reverse=True)
            self._runs = out
        return self._runs

    def node(self, key: str) -> Any:
        return self.client[self.root][key]

    def follow(self, key: str) -> RunRows:
        """Rows of derived node ``key`` (read now, then kept up to date); KeyError if absent."""
        with self._lock:
            if key in self.rows:
                return self.rows[key]
            node = self.node(key)  # KeyError when missing
            rows = RunRows(key, node.metadata, self.config)
            self.rows[key] = rows
        if self.mode == "streaming":
            self._subscribe_table(key, node)
        rows.read_all(node)  # after subscribing: rows in between are merged once
        return rows

    # -- streaming ----------------------------------------------------------------------
    def _subscribe_root(self) -> None:
        if not self._root_exists():
            return  # subscribed by the loop once the root container exists
        from tiled.client.stream import ContainerSubscription

        sub = ContainerSubscription(self.client.context, [self.root])
        sub.child_created.add_callback(self._on_child_created)
        sub.child_metadata_updated.add_callback(self._on_metadata)
        sub.start_in_thread()
        self._subs["/"] = sub

    def _on_child_created(self, update: Any) -> None:
        self.runs(refresh=True)
        self._emit("runs", {"key": update.key})

    def _on_metadata(self, update: Any) -> None:
        key, md = update.key, dict(update.metadata or {})
        if key.endswith("-suggestions"):
            self._emit("suggestions", {"raw_uid": md.get("raw_uid", key[:-12])})
            return
        rows = self.rows.get(key)
        if rows is not None:
            rows.metadata.update(md)
        self._update_run_summary(key, md)
        self._emit("meta", run_summary(key, {**(rows.metadata if rows else {}), **md}))

    def _update_run_summary(self, key: str, md: dict) -> None:
        if self._runs is None:
            return
        for r in self._runs:
            if r["key"] == key:
                r.update({k: v for k, v in run_summary(key, {**r, **md}).items()
                          if k in md or k == "n_errors" and "errors" in md})

    def _subscribe_table(self, key: str, node: Any) -> None:
        if key in self._subs:
            return
        if TABLE_KEY not in node:
            return  # the loop subscribes once the table exists
        from tiled.client.stream import TableSubscription

        sub = TableSubscription(self.client.context, [self.root, key, TABLE_KEY])

        def on_rows(update: Any, k: str = key) -> None:
            self._on_rows(k, update)

        sub.gisaxs_callback = on_rows  # the registry holds callbacks only weakly
        sub.new_data.add_callback(on_rows)
        sub.start_in_thread(max_size=64_000_000)
        self._subs[key] = sub

    def _on_rows(self, key: str, update: Any) -> None:
        rows = self.rows.get(key)
        if rows is None:
            return
        data = update.data()
        df = data.to_pandas() if hasattr(data, "to_pandas") else pd.DataFrame(data)
        self._merge(rows, df)

    def _merge(self, rows: RunRows, df: pd.DataFrame) -> None:
        new = rows.merge(df)
        if not len(new):
            return
        if rows.needs_refit():
            self._emit("reload", {"key": rows.key, "n_frames": rows.n_frames})
        else:
            self._emit("rows", rows.delta(new))

    # -- background loop ----------------------------------------------------------------
    def _loop(self) -> None:
        last_runs = 0.0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                if not self._reachable:
                    self._wake.wait(1.0)  # the health probe says Tiled is away
                    self._wake.clear()
                    continue
                if self.mode == "streaming":
                    self._streaming_housekeeping()
                else:
                    slow = time.monotonic() - last_runs > 2.0  # metadata and run list
                    self._poll_rows(metadata=slow)
                    if slow:
                        self._poll_runs()
                        last_runs = time.monotonic()
                if self.error:
                    self.error = None
                    self._emit("status", self.status())
            except Exception as exc:  # noqa: BLE001 - Tiled down: say so, keep trying
                msg = f"Tiled: {type(exc).__name__}: {exc}"
                if msg != self.error:
                    self.error = msg
                    logger.warning("view: %s", msg)
                    self._emit("status", self.status())
            spent = time.monotonic() - t0
            self._wake.wait(max(self.poll_interval_s - spent, 0.05) if self.mode == "polling"
                            else 1.0)
            self._wake.clear()

    def _streaming_housekeeping(self) -> None:
        """Subscriptions that could not be made yet (root or table did not exist)."""
        if "/" not in self._subs and self._root_exists():
            self._subscribe_root()
            self.runs(refresh=True)
            self._emit("runs", {})
        for key, rows in list(self.rows.items()):
            if key not in self._subs:
                node = self.node(key)
                if TABLE_KEY in node:
                    self._subscribe_table(key, node)
                    self._merge(rows, node[TABLE_KEY].read(columns=rows.columns))

    def _poll_rows(self, metadata: bool = True) -> None:
        """Re-read followed runs' tables (one request each); their metadata when asked."""
        for key, rows in list(self.rows.items()):
            if metadata or key not in self._tables:
                node = self.node(key)
                md = dict(node.metadata)
                if md.get("updated") != self._meta_seen.get(key):
                    self._meta_seen[key] = md.get("updated")
                    rows.metadata.update(md)
                    self._emit("meta", run_summary(key, md))
                if TABLE_KEY in node:
                    self._tables[key] = node[TABLE_KEY]
            table = self._tables.get(key)
            if table is not None:
                self._merge(rows, table.read(columns=rows.columns))

    def _poll_runs(self) -> None:
        before = {(r["key"], r["status"], r["n_frames"]) for r in (self._runs or [])}
        runs = self.runs(refresh=True)
        if {(r["key"], r["status"], r["n_frames"]) for r in runs} != before:
            self._emit("runs", {})
        if self._root_exists():
            for key, node in self.client[self.root].items():
                if key.endswith("-suggestions"):
                    upd = (node.metadata.get("updated"), node.metadata.get("decisions_updated"))
                    if self._meta_seen.get(key) != upd:
                        self._meta_seen[key] = upd
                        self._emit("suggestions", {"raw_uid": node.metadata.get("raw_uid")})
