"""Replay of one run: idempotent, resumable, the same node the live callback writes."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..callbacks import DAEBinningCallback
from ..models import ModelSpecError, make_binner, read_binner_state
from ..pipeline import BinningPipeline
from ..store import TABLE_KEY, DerivedStore, describe_fault
from .options import ReplayError, ReplayOptions, RunSummary
from .sources import _ArrayRun, _DocumentRun, _is_sql_run, open_source

logger = logging.getLogger(__name__)

def _make_binner(encoder: Any, options: ReplayOptions) -> Any:
    """The binner a replay starts from: ``options.binner_state``, else fresh for ``encoder``."""
    if not options.binner_state:
        return make_binner(encoder)
    try:
        return read_binner_state(options.binner_state)
    except ModelSpecError as exc:
        raise ReplayError(str(exc)) from exc


def _reseed_binner(binner: Any, writer: Any, identity_dim: int) -> int:
    """Re-assign stored identity latents (seq order) so bins continue; returns rows used."""
    node = writer.node
    if node is None or not writer.stored_seq_nums:
        return 0

    cols = ["seq_num", "recon_error", *[f"latent_{i}" for i in range(identity_dim)]]
    df = node[TABLE_KEY].read(columns=cols).sort_values("seq_num")
    z = np.stack([df[f"latent_{i}"].to_numpy("float32") for i in range(identity_dim)], axis=1)
    binner.assign(z, df["recon_error"].to_numpy("float32"))
    return len(df)


def replay_run(
    catalog: Any,
    uid: str,
    *,
    encoder: Any,
    store: Any,
    options: ReplayOptions | None = None,
    progress: Callable[[int], None] | None = None,
    summary: RunSummary | None = None,
) -> RunSummary:
    """Replay one run into ``store``; never raises for run-level faults (see the summary).

    ``progress(n)`` is called after each chunk with the frames handled; KeyboardInterrupt
    (from there or Ctrl-C) is re-raised after the rows so far are safely stored, with
    ``summary`` (filled in place when given) marked "interrupted".
    """

    options = options or ReplayOptions()
    t0 = time.perf_counter()
    summary = summary if summary is not None else RunSummary(uid=uid)
    summary.model_id = f"{encoder.name}-{encoder.version}"
    errors: list[str] = summary.errors
    writer = None
    lock = None
    try:
        try:
            source = open_source(catalog, uid, options)
        except KeyError:
            summary.status = "missing"
            errors.append(f"run {uid!r}: not found in the catalog")
            return summary
        summary.scan_id = source.scan_id
        summary.n_frames = source.n_frames
        summary.node_key = store.node_key(uid, encoder.info())
        lock = store.node_lock(summary.node_key)
        if not lock.acquire(options.lock_timeout):
            summary.status = "busy"
            errors.append(f"run {uid}: node {summary.node_key} is being written by "
                          f"{lock.holder()} (another replay, or the live callback); not "
                          "replayed, nothing written: replay it again when that one is done")
            lock = None
            return summary
        pipeline = BinningPipeline(encoder, _make_binner(encoder, options),
                                   batch_size=options.batch_size)
        writer = pipeline.open_writer(
            store, uid, scan_id=source.scan_id, motors=source.motors,
            extra_metadata={
                "stream": options.stream,
                "image_key": source.image_key,
                "plan_name": source.start.get("plan_name"),
                "raw_start_time": source.start.get("time"),
                "producer": "gisaxs_bluesky.replay",
            },
            geometry=source.geometry_summary,
        )
        geometry_recorded = source.geometry_summary is not None
        summary.node_key = writer.key
        skip = set(writer.stored_seq_nums)
        if writer.duplicate_rows:
            errors.append(f"run {uid}: {writer.duplicate_rows} duplicate rows in "
                          f"{writer.key} (a seq_num stored twice by writers on two hosts at "
                          "once); readers keep the first row of each seq_num")
            writer.update_metadata(duplicate_rows=writer.duplicate_rows)
            writer.record_error(errors[-1])
        running = _still_running(source)
        if running:
            errors.append(f"run {uid}: no stop document yet (still being written, or its "
                          "writer died): replaying the frames stored so far; replay again "
                          "once the run has ended")
        if isinstance(source, _ArrayRun) and not running:
            all_seq = {int(s) for s in source.seq_nums[: source.n_frames]}
            summary.frames_skipped = len(all_seq & skip)
            if all_seq <= skip:
                summary.status = "up-to-date"
                if writer.node is not None and writer.node.metadata.get("status") != "complete":
                    writer.finish("complete")
                return summary
        if skip:
            _reseed_binner(pipeline.binner, writer, encoder.identity_dim)
        shape = None
        n_read_errors = 0
        for chunk in source.chunks(skip, options.chunk_size, errors):
            readable = [i for i, f in enumerate(chunk.frames) if f is not None]
            summary.frames_failed += len(chunk.frames) - len(readable)
            if readable:
                idx = np.asarray(readable)
                result = pipeline.process_and_write(
                    writer,
                    [chunk.frames[i] for i in readable],
                    chunk.seq[idx], chunk.times[idx],
                    {m: v[idx] for m, v in chunk.positions.items()},
                    expected_shape=shape,
                    geometries=[chunk.geometries[i] for i in readable],
                )
                shape = shape or next(
                    (np.asarray(chunk.frames[i]).shape[-2:] for i in readable), None
                )
                summary.frames_written += result.n_rows
                for e in result.errors:
                    errors.append(f"run {uid} field {source.image_key!r} {e}")
            if not geometry_recorded and source.geometry_summary is not None:
                writer.update_metadata(geometry=source.geometry_summary)  # documents: now known
                geometry_recorded = True
            if len(errors) > n_read_errors:
                for e in errors[n_read_errors:]:
                    logger.warning("%s", e)
                n_read_errors = len(errors)
            if progress is not None:
                progress(len(chunk.frames))
            if options.max_frames is not None and summary.frames_written >= options.max_frames:
                summary.status = "partial"
                writer.update_metadata(status="running")
                return summary
        if isinstance(source, _DocumentRun):
            summary.frames_skipped = len(skip)
            if summary.n_frames is None or summary.frames_written + len(skip) > summary.n_frames:
                summary.n_frames = summary.frames_written + len(skip) + summary.frames_failed
        if running:
            summary.status = "partial"
            writer.update_metadata(status="running")
            writer.flush()
        elif summary.frames_failed or any("legacy resource" in e or "no frame data for" in e
                                          for e in errors):
            summary.status = "partial"
            writer.record_error("; ".join(errors[-5:]))
            writer.finish("failed", binner_summary=pipeline.binner.summary())
        else:
            summary.status = "complete"
            writer.finish("complete", binner_summary=pipeline.binner.summary())
        if writer.pending_rows:
            errors.append(
                f"run {uid}: Tiled unreachable, {writer.pending_rows} rows kept in the local "
                "backup (re-sent on the next replay)"
            )
            summary.status = "partial"
        return summary
    except KeyboardInterrupt:
        summary.status = "interrupted"
        errors.append(f"run {uid}: interrupted after {summary.frames_written} new frames")
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.update_metadata(status="running")
        raise
    except ReplayError as exc:
        summary.status = "no-image" if "2-D image" in str(exc) else "failed"
        errors.append(str(exc))
        return summary
    except Exception as exc:  # noqa: BLE001 - one run must not stop the batch
        logger.exception("replay of run %s failed", uid)

        summary.status = "failed"
        hint = ""
        with contextlib.suppress(Exception):
            if _is_sql_run(catalog[uid]) and catalog[uid].metadata.get("stop") is None:
                hint = (" (the run has no stop document yet: still being written? replay it "
                        "once it has ended)")
        errors.append(f"run {uid}: {describe_fault(exc)}{hint}")
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.record_error(errors[-1])
        return summary
    finally:
        summary.seconds = time.perf_counter() - t0
        if lock is not None:
            lock.release()


def _still_running(source: Any) -> bool:
    """Whether the raw run has no stop document (yet) in the catalog."""
    if isinstance(source, _ArrayRun):
        return source.run.metadata.get("stop") is None
    return False


def _replay_run_callback(
    catalog: Any, uid: str, *, encoder: Any, target: Any, options: ReplayOptions
) -> RunSummary:
    """Feed ``run.documents()`` to DAEBinningCallback (the live callback) for one run."""

    t0 = time.perf_counter()
    summary = RunSummary(uid=uid, model_id=f"{encoder.name}-{encoder.version}")
    try:
        run = catalog[uid]
    except KeyError:
        summary.status = "missing"
        summary.errors.append(f"run {uid!r}: not found in the catalog")
        return summary
    try:
        store = DerivedStore(target, root=options.root, backup_dir=options.backup_dir)
        key = store.node_key(uid, encoder.info())
        lock = store.node_lock(key)
        if not lock.acquire(options.lock_timeout):
            summary.status = "busy"
            summary.errors.append(f"run {uid}: node {key} is being written by {lock.holder()};"
                                  " not replayed, nothing written")
            return summary
        try:
            before = _stored_rows(store, key)
            cb = _make_callback(target, encoder, options)
            for name, doc in run.documents():
                cb(name, doc)
            cb.wait()
            cb.close()
        finally:
            lock.release()
        after = _stored_rows(store, key)
        summary.node_key = key
        summary.scan_id = run.metadata["start"].get("scan_id")
        summary.frames_written = max(after - before, 0)
        summary.frames_skipped = before
        summary.n_frames = after
        summary.status = "complete" if after else "no-image"
        if not after:
            summary.errors.append(f"run {uid}: the callback wrote no rows (no 2-D image?)")
    except Exception as exc:  # noqa: BLE001
        summary.status = "failed"
        summary.errors.append(f"run {uid}: {type(exc).__name__}: {exc}")
    summary.seconds = time.perf_counter() - t0
    return summary


def _stored_rows(store: Any, key: str) -> int:
    root = store.root_node()
    if key not in root:
        return 0
    md = root[key].metadata
    return int(md.get("n_frames", 0))


def _make_callback(client: Any, encoder: Any, options: ReplayOptions) -> Any:
    """The live callback with this replay's settings (it holds the node's lock itself)."""

    return DAEBinningCallback(
        client, encoder=encoder, binner=_make_binner(encoder, options), persist_binner=False,
        lock_nodes=False, image_key=options.image_key, stream_name=options.stream,
        root=options.root, backup_dir=options.backup_dir, batch_size=options.batch_size,
        geometry=options.geometry, geometry_fallback=options.geometry_fallback)
