"""The callback's write policy: when rows go to Tiled, how a run's node is finished, what
happens while Tiled is down or refuses the key.

A run's rows go to Tiled at most once per ``write_interval`` s (its first batch at once, so
the node appears with the first frames; sooner when ``max_write_rows`` wait; all of them at
``wait()`` and at the run's end): one Tiled append costs about as much as encoding a batch,
and with SQLite table storage it holds the write lock TiledWriter needs. Faults (Tiled down,
5xx, a key refused with 401/403) are absorbed by the store's local backup, rows, final
metadata and the reason: a finished run whose node is not yet complete in Tiled is re-sent
every ``retry_interval`` s and at ``wait()`` (:attr:`WritePolicy.pending` lists them). The
node's lock (:meth:`DerivedStore.node_lock`) keeps a replay of the same run from writing it
at the same time.

On the finish the node gets ``status`` (``complete``, or ``failed`` when the raw run did not
succeed, rows could not be stored, events were lost or no frame could be encoded),
``bin_summary``, ``outlier_count``, ``n_unprocessed``, ``n_spilled`` and
``dropped_seq_nums``; the binner state is saved so bins stay consistent across scans.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..pipeline import BinningPipeline
from ..runtime import RuntimeConfig
from ..store import DerivedStore
from .run import Finish, RunBinning

__all__ = ["WritePolicy"]

logger = logging.getLogger(__name__)


class WritePolicy:
    """Rows and node lifecycle of every run of one callback (worker thread only)."""

    def __init__(
        self,
        client: Any,
        pipeline: BinningPipeline,
        config: RuntimeConfig,
        *,
        write_lock: Any = None,
        extra_metadata: Mapping[str, Any] | None = None,
        binner_state_path: Path | None = None,
        retry_interval: float = 5.0,
        lock_nodes: bool = True,
    ) -> None:
        if retry_interval <= 0:
            raise ValueError(f"retry_interval={retry_interval} must be > 0")
        self.client = client
        self.pipeline = pipeline
        self.config = config
        self.write_lock = write_lock if write_lock is not None else contextlib.nullcontext()
        self.extra_metadata = dict(extra_metadata or {})
        self.binner_state_path = binner_state_path
        self.retry_interval = float(retry_interval)
        self.lock_nodes = bool(lock_nodes)  # replay's callback method holds the lock itself
        self._store: DerivedStore | None = None
        self._unwritten: dict[str, RunBinning] = {}
        self._live: dict[str, RunBinning] = {}  # runs with an open derived node
        # finished runs whose rows or final metadata wait in the local backup (Tiled down or
        # refusing the key), re-sent every retry_interval s and at wait()
        self._unsettled: dict[str, RunBinning] = {}

    # ----------------------------------------------------------------------- the worker
    def add(self, run: RunBinning, rows: dict[str, np.ndarray], errors: list[str]) -> None:
        """Encoded rows of ``run``, written when due."""
        run.unwritten.append((rows, errors))
        self._unwritten[run.uid] = run

    def next_due(self) -> float | None:
        """When (monotonic s) rows are due or a backup is to be re-sent; None: nothing waits."""
        dues = [r.last_write + self.config.write_interval for r in self._unwritten.values()]
        dues += [r.next_retry for r in self._unsettled.values()]
        return min(dues) if dues else None

    def tick(self, *, force: bool = False, flushing: bool = False) -> None:
        """After a batch: rows that are due (all when ``force``d), held-back bin summaries
        when ``flushing`` (wait()), backups of finished runs when due."""
        self._write_due(force=force)
        if flushing:
            for run in list(self._live.values()):
                if run.writer is not None:
                    with self.write_lock:
                        run.writer.flush()
        self._retry_unsettled(force=force)

    def close(self) -> None:
        """The worker stops: runs still unsettled are left to ``flush_backups()``."""
        for run in self._unsettled.values():
            self._release(run)

    @property
    def pending(self) -> dict[str, str]:
        """Node key -> why, for finished runs whose rows or status wait in the local backup."""
        return {run.writer.key: run.writer.fault or "Tiled unreachable"
                for run in list(self._unsettled.values()) if run.writer is not None}

    # ------------------------------------------------------------------------- writing
    def _writer(self, run: RunBinning) -> Any:
        if run.writer is not None or run.writer_failed:
            return run.writer
        try:
            if self._store is None:
                self._store = DerivedStore(self.client, root=self.config.root,
                                           backup_dir=self.config.backup_dir,
                                           probe_timeout=self.config.probe_timeout,
                                           summary_interval=self.config.summary_interval)
            key = self._store.node_key(run.uid, self.pipeline.encoder.info())
            run.lock = self._store.node_lock(key) if self.lock_nodes else None
            # held by a replay of this run, from this machine: write anyway (stored seq_nums
            # are skipped), the live rows come first
            if run.lock is not None and not run.lock.acquire(timeout=1.0):
                run.note(f"node {key} is also being written by {run.lock.holder()} "
                         "(a replay?); rows already stored are not written twice")
                run.lock = None
            descriptor = run.image_descriptor
            md = {
                "stream": run.image_stream,
                "image_key": run.streams[descriptor["uid"]].image_key if descriptor else None,
                "plan_name": run.start_doc.get("plan_name"),
                "raw_start_time": run.start_doc.get("time"),
                "producer": "gisaxs_bluesky.callbacks.DAEBinningCallback",
                **self.extra_metadata,
            }
            run.writer = self.pipeline.open_writer(
                self._store, run.uid, scan_id=run.scan_id, motors=run.motors, extra_metadata=md,
                geometry=run.geometry_summary)
            self._live[run.uid] = run
        except Exception as exc:  # noqa: BLE001
            run.writer_failed = f"cannot open derived node: {type(exc).__name__}: {exc}"
            logger.exception("run %s: %s", run.uid, run.writer_failed)
        return run.writer

    def _write_due(self, force: bool = False) -> None:
        now = time.monotonic()
        for run in list(self._unwritten.values()):
            if (force or run.n_unwritten >= self.config.max_write_rows
                    or now - run.last_write >= self.config.write_interval):
                self._write_rows(run)

    def _write_rows(self, run: RunBinning) -> None:
        self._unwritten.pop(run.uid, None)
        if not run.unwritten:
            return
        run.last_write = time.monotonic()
        parts, run.unwritten = run.unwritten, []
        rows = {k: np.concatenate([r[k] for r, _ in parts]) for k in parts[0][0]}
        errors = [e for _, errs in parts for e in errs]
        with self.write_lock:  # only Tiled I/O under the lock, never the model
            self._store_rows(run, rows, errors)

    def _store_rows(self, run: RunBinning, rows: dict[str, np.ndarray], errors: list[str]
                    ) -> None:
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
    def _note_fault(run: RunBinning, writer: Any, errors: list[str]) -> None:
        """Say on the node (once per fault) that rows wait in the local backup, and why."""
        fault = getattr(writer, "fault", None)
        if fault and writer.pending and fault != run.fault_noted:
            run.fault_noted = fault
            errors.append(f"{fault}: rows kept in the local backup {writer.backup_path}, "
                          "re-sent when Tiled takes them")
            logger.error("run %s: %s", run.uid, errors[-1])

    # -------------------------------------------------------------------------- finish
    def finish(self, item: Finish) -> None:
        run = item.run
        try:
            self._write_rows(run)
        except Exception:  # noqa: BLE001
            logger.exception("run %s: writing the last rows failed", run.uid)
        # after the last write: a run whose node opened there is no longer live either
        self._live.pop(run.uid, None)
        with self.write_lock:
            self._finish_locked(item)

    def _finish_locked(self, item: Finish) -> None:
        run = item.run
        try:
            pending = run.take_errors()
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
                writer.finish(
                    "failed" if failed else "complete",
                    raw_exit_status=item.exit_status,
                    raw_reason=item.reason,
                    binner_summary=self.pipeline.binner.summary(),
                    n_unprocessed=run.n_unprocessed,
                    n_spilled=run.n_spilled,
                    dropped_seq_nums=list(run.dropped),
                )
                if writer.pending:  # Tiled down or refusing: re-sent later by the worker
                    run.next_retry = time.monotonic() + self.retry_interval
                    self._unsettled[run.uid] = run
        except Exception:  # noqa: BLE001
            logger.exception("run %s: finishing the derived node failed", run.uid)
        finally:
            if run.uid not in self._unsettled:
                self._release(run)
            run.release()  # this run's files and handlers: not kept open until close()
            run.done.set()

    def _retry_unsettled(self, force: bool = False) -> None:
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
    def _release(run: RunBinning) -> None:
        if run.lock is not None:
            run.lock.release()
            run.lock = None

    def _save_binner(self) -> None:
        if self.binner_state_path is None:
            return
        try:
            self.pipeline.binner.save(self.binner_state_path)
        except Exception as exc:  # noqa: BLE001
            logger.warning("cannot save binner state to %s: %s", self.binner_state_path, exc)
