"""Replay catalogued runs through the binning pipeline and write the same derived nodes.

Sources
-------
* Tiled catalogs written by ``TiledWriter`` (SQL-backed ``BlueskyRun`` v3): frames are read
  from the run's array node for the 2-D image key of the stream (``method="arrays"``), or from
  ``run.documents()`` when the server registers the ``json_seq_exporter``
  (``method="documents"``; HDF5 ``stream_resource`` files must then be readable locally).
* databroker 2 MongoDB-backed catalogs (``BlueskyRun`` v2): documents from ``run.documents()``
  (inline frames, or ``stream_resource``/``stream_datum`` HDF5 on shared storage).
* ``method="callback"`` feeds the run's documents into ``DAEBinningCallback`` instead.

Every run goes through :class:`gisaxs_bluesky.pipeline.BinningPipeline` and
:class:`gisaxs_bluesky.store.DerivedStore`, like the live callback, so the derived node has the
same key (``<uid>-<model>-<version>``), metadata and columns.

Idempotent and resumable: seq_nums already stored for (run, model) are skipped (not even
read); before continuing a partly written node the binner is re-seeded by re-assigning the
stored identity latents in seq order, so bins continue as if the replay had not stopped.
Another model version writes its own node beside the first.

Faults (missing uid, no 2-D image field, unreadable frame, Tiled down) are reported per run
in :class:`RunSummary`; the batch goes on. One writer per derived node on a machine: a replay
takes the node's lock (:meth:`gisaxs_bluesky.store.DerivedStore.node_lock`) and reports a run
another replay or the live callback is writing as "busy", writing nothing (no duplicate rows).
A run without a stop document yet is replayed as far as it is stored and reported "partial".
Frames that cannot be *read* get no row (a later replay retries them); frames that are read
but invalid get the pipeline's UNPROCESSED row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

__all__ = [
    "ReplayError",
    "RunSummary",
    "ReplayOptions",
    "build_queries",
    "select_runs",
    "load_model",
    "load_binner_state",
    "find_image_key",
    "replay_run",
    "replay_runs",
    "replay_distributed",
    "connect",
    "add_arguments",
    "run",
]

logger = logging.getLogger(__name__)

#: statuses of a RunSummary
SUMMARY_STATUSES = ("complete", "up-to-date", "partial", "interrupted", "failed", "missing",
                    "no-image", "busy")


class ReplayError(RuntimeError):
    """A replay problem that stops one run (message names the run and field)."""


# --------------------------------------------------------------------------------- results
@dataclass
class RunSummary:
    """Outcome of replaying one run."""

    uid: str
    status: str = "failed"
    scan_id: int | None = None
    node_key: str | None = None
    model_id: str | None = None
    n_frames: int | None = None  # frames in the raw run (None when unknown)
    frames_written: int = 0  # rows appended by this replay
    frames_skipped: int = 0  # seq_nums already stored (not re-read)
    frames_failed: int = 0  # frames that could not be read (no row written)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("complete", "up-to-date")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReplayOptions:
    """Settings shared by every run of a replay (picklable: sent to Dask workers)."""

    model: str = "pretrained"  # "pretrained", a checkpoint path, or "untrained[:seed]"
    device: str = "cpu"
    root: str = "gisaxs_derived"
    backup_dir: str | None = None
    method: str = "auto"  # auto | arrays | documents | callback
    stream: str = "primary"
    image_key: str | None = None
    chunk_size: int = 16
    batch_size: int = 16
    binner_state: str | None = None  # initial binner (JSON from OnlineBinner.save)
    max_frames: int | None = None  # stop a run after this many new rows (partial replay)
    # wait this long (s) for another writer of the same node on this machine (another replay,
    # the live callback) before reporting the run "busy"
    lock_timeout: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in ("auto", "arrays", "documents", "callback"):
            raise ValueError(
                f"method={self.method!r}: expected auto, arrays, documents or callback"
            )
        if int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size={self.chunk_size!r} must be >= 1")


# -------------------------------------------------------------------------------- selection
def _parse_time(value: float | str) -> float:
    """Unix time from a number or an ISO-8601 string."""
    if isinstance(value, int | float):
        return float(value)
    from datetime import datetime

    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError as exc:
        raise ValueError(f"time {value!r}: expected unix seconds or ISO-8601") from exc


def build_queries(
    *,
    scan_ids: tuple[int | None, int | None] | None = None,
    plan_name: str | None = None,
    since: float | str | None = None,
    until: float | str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Tiled queries on the start document: scan_id range (inclusive), plan, time, key=value."""
    from tiled.queries import Eq, Key

    queries: list[Any] = []
    if scan_ids is not None:
        lo, hi = scan_ids
        if lo is not None:
            queries.append(Key("start.scan_id") >= int(lo))
        if hi is not None:
            queries.append(Key("start.scan_id") <= int(hi))
    if plan_name:
        queries.append(Eq("start.plan_name", plan_name))
    if since is not None:
        queries.append(Key("start.time") >= _parse_time(since))
    if until is not None:
        queries.append(Key("start.time") <= _parse_time(until))
    for key, value in (metadata or {}).items():
        queries.append(Eq(f"start.{key}", value))
    return queries


def select_runs(
    catalog: Any,
    *queries: Any,
    uids: Sequence[str] | None = None,
    root: str = "gisaxs_derived",
    limit: int | None = None,
) -> list[str]:
    """Run uids matching all ``queries`` (server-side), in catalogue order, then ``uids``.

    Explicit ``uids`` are kept as given (a missing one is reported by the replay); nodes that are
    not Bluesky runs (e.g. the derived ``root`` container) are left out of query results.
    """
    out: list[str] = []
    if queries or not uids:
        results = catalog
        for q in queries:
            results = results.search(q)
        for key, node in results.items():
            if key == root:
                continue
            specs = {getattr(s, "name", s) for s in getattr(node, "specs", [])}
            if specs and "BlueskyRun" not in specs:
                continue
            out.append(key)
            if limit is not None and len(out) >= limit:
                break
    for uid in uids or ():
        if uid not in out:
            out.append(uid)
    return out


# ------------------------------------------------------------------------------------ model
_MODEL_CACHE: dict[tuple[str, str], Any] = {}


def load_model(spec: str | Any = "pretrained", device: str = "cpu") -> Any:
    """Encoder from ``spec``: an Encoder, "pretrained", "untrained[:seed]" or a checkpoint path.

    Cached per process, so Dask workers load a model once.
    """
    from .models import Encoder, GisaxsDAE, load_encoder, load_pretrained

    if isinstance(spec, Encoder):
        return spec
    key = (str(spec), str(device))
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    text = str(spec)
    if text == "pretrained":
        encoder = load_pretrained(device)
    elif text == "untrained" or text.startswith("untrained:"):
        import torch

        try:
            seed = int(text.split(":", 1)[1]) if ":" in text else 0
        except ValueError:
            raise ReplayError(f"model {text!r}: the seed after 'untrained:' must be an integer, "
                              "e.g. 'untrained:0'") from None
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = GisaxsDAE()
        encoder = Encoder(model, {"name": "untrained", "version": f"seed{seed}"}, device)
    else:
        if not Path(text).is_file():
            raise ReplayError(f"model {text!r}: not 'pretrained', 'untrained[:seed]' or a file")
        encoder = load_encoder(text, device)
    _MODEL_CACHE[key] = encoder
    return encoder


def load_binner_state(path: str | Path) -> Any:
    """OnlineBinner from a state file (OnlineBinner.save), also one saved before any frame."""
    from .binning import OnlineBinner
    from .config import BinnerConfig

    try:
        state = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReplayError(f"binner state {str(path)!r} cannot be read: {exc}") from exc
    if state.get("ids"):
        return OnlineBinner.from_state(state)
    # OnlineBinner.from_state cannot reshape an empty centroid list: build it directly
    return OnlineBinner(BinnerConfig(**state["config"]), spread=state["spread"],
                        recon_threshold=state["recon_threshold"],
                        model_sha256=state.get("model_sha256", ""))


def _make_binner(encoder: Any, options: ReplayOptions) -> Any:
    from .models import make_binner

    if options.binner_state:
        return load_binner_state(options.binner_state)
    return make_binner(encoder)


# ---------------------------------------------------------------------------- frame sources
def find_image_key(
    data_keys: Mapping[str, Mapping[str, Any]],
    image_key: str | None = None,
    *,
    where: str = "stream",
) -> str:
    """The 2-D image data key (as the live callback picks it: the largest [H, W]/[1, H, W]).

    Raises ReplayError naming the stream and its keys when there is none, or when
    ``image_key`` is given but missing or not 2-D.
    """
    from .callbacks.dae_binning import find_image_key as live_find

    if image_key is not None:
        if image_key not in data_keys:
            raise ReplayError(
                f"{where}: image_key {image_key!r} not found (data keys: {sorted(data_keys)})"
            )
        if live_find({image_key: data_keys[image_key]}) is None:
            raise ReplayError(
                f"{where}: field {image_key!r} has shape {data_keys[image_key].get('shape')}, "
                "not a 2-D image"
            )
        return image_key
    key = live_find(data_keys)
    if key is None:
        shapes = {k: dk.get("shape") for k, dk in data_keys.items()}
        raise ReplayError(f"{where} has no 2-D image field (data keys and shapes: {shapes})")
    return key


def _motor_names(start: Mapping[str, Any]) -> list[str]:
    """Motors as the live callback records them (start ``motors``, else hinted dimensions)."""
    from .callbacks.dae_binning import scanned_motors

    return scanned_motors(start)


@dataclass
class _Chunk:
    seq: np.ndarray
    times: np.ndarray
    frames: list[Any]
    positions: dict[str, np.ndarray]


class _ArrayRun:
    """Frames of a SQL-backed (TiledWriter) run read from its array nodes over Tiled."""

    def __init__(self, run: Any, uid: str, options: ReplayOptions) -> None:
        self.run = run
        self.uid = uid
        self.start = dict(run.metadata["start"])
        self.scan_id = self.start.get("scan_id")
        if options.stream not in run:
            raise ReplayError(
                f"run {uid}: no stream {options.stream!r} (streams: {list(run)})"
            )
        self.stream = run[options.stream]
        data_keys = dict(self.stream.metadata.get("data_keys", {}))
        where = f"run {uid} stream {options.stream!r}"
        self.image_key = find_image_key(data_keys, options.image_key, where=where)
        self.motors = _motor_names(self.start)
        self.seq_nums = np.asarray(self.stream["seq_num"].read(), dtype=np.int64).reshape(-1)
        self.times = np.asarray(self.stream["time"].read(), dtype=np.float64).reshape(-1)
        keys = set(self.stream)
        self.positions = {
            m: (np.asarray(self.stream[m].read(), dtype=np.float64).reshape(-1)
                if m in keys and not (data_keys.get(m, {}).get("shape") or [])
                else np.full(len(self.seq_nums), np.nan))
            for m in self.motors
        }
        self.image = self.stream[self.image_key]
        self.n_frames = int(min(len(self.seq_nums), self.image.shape[0]))
        self.where = where

    def _read(self, lo: int, hi: int, errors: list[str]) -> list[Any]:
        """Frames [lo, hi) (None where unreadable); one request, per-frame on failure."""
        try:
            block = np.asarray(self.image[lo:hi])
            if block.ndim == 4 and block.shape[1] == 1:
                block = block[:, 0]
            return list(block)
        except Exception as exc:  # noqa: BLE001 - fall back to frame by frame
            if hi - lo > 1:
                logger.warning("%s: block read [%d, %d) failed (%s); per frame", self.where,
                               lo, hi, exc)
            out: list[Any] = []
            for i in range(lo, hi):
                try:
                    out.append(np.asarray(self.image[i]))
                except Exception as exc2:  # noqa: BLE001
                    errors.append(
                        f"run {self.uid} field {self.image_key!r} seq_num="
                        f"{int(self.seq_nums[i])}: cannot read frame: "
                        f"{type(exc2).__name__}: {exc2}"
                    )
                    out.append(None)
            return out

    def chunks(self, skip: set[int], size: int, errors: list[str]) -> Iterator[_Chunk]:
        todo = [i for i in range(self.n_frames) if int(self.seq_nums[i]) not in skip]
        pos = 0
        while pos < len(todo):
            # contiguous index runs, at most `size` frames, one request each
            lo = todo[pos]
            hi = lo + 1
            while pos + (hi - lo) < len(todo) and todo[pos + (hi - lo)] == hi and hi - lo < size:
                hi += 1
            idx = np.arange(lo, hi)
            frames = self._read(lo, hi, errors)
            yield _Chunk(
                self.seq_nums[idx], self.times[idx], frames,
                {m: v[idx] for m, v in self.positions.items()},
            )
            pos += hi - lo


def _file_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ReplayError(f"resource uri {uri!r}: only local file:// URIs can be read")
    return Path(unquote(parsed.path))


class _DocumentRun:
    """Frames of a run from its documents (inline frames or HDF5 stream resources)."""

    def __init__(self, docs: Iterable[tuple[str, dict]], uid: str, options: ReplayOptions):
        self.uid = uid
        self.options = options
        self._docs = iter(docs)
        self._buffer: list[tuple[str, dict]] = []
        self.start: dict[str, Any] = {}
        self.descriptor: dict[str, Any] | None = None
        self._descriptor_uids: set[str] = set()
        self._resources: dict[str, dict] = {}
        self._h5: dict[str, Any] = {}
        self.where = f"run {uid} stream {options.stream!r}"
        for name, doc in self._docs:  # read ahead to the first descriptor of the stream
            self._buffer.append((name, doc))
            if name == "start":
                self.start = dict(doc)
            elif name == "descriptor" and doc.get("name") == options.stream:
                self.descriptor = dict(doc)
                break
        if not self.start:
            raise ReplayError(f"run {uid}: documents have no start document")
        if self.descriptor is None:
            raise ReplayError(f"run {uid}: no descriptor for stream {options.stream!r}")
        self.scan_id = self.start.get("scan_id")
        data_keys = self.descriptor["data_keys"]
        self.image_key = find_image_key(data_keys, options.image_key, where=self.where)
        self.motors = _motor_names(self.start)
        n = self.start.get("num_points")
        self.n_frames = int(n) if isinstance(n, int) else None

    def _stream_frames(self, sdoc: Mapping[str, Any], errors: list[str]) -> dict[int, Any]:
        """seq_num -> frame for one stream_datum of the image key."""
        res = self._resources[sdoc["stream_resource"]]
        lo, hi = int(sdoc["indices"]["start"]), int(sdoc["indices"]["stop"])
        s0 = int(sdoc["seq_nums"]["start"])
        try:
            if res.get("mimetype") not in (None, "application/x-hdf5"):
                raise ReplayError(f"mimetype {res.get('mimetype')!r} is not supported")
            import h5py

            path = _file_path(res["uri"])
            f = self._h5.get(str(path))
            if f is None:
                f = self._h5[str(path)] = h5py.File(path, "r", swmr=True)
            data = f[res["parameters"]["dataset"]][lo:hi]
            return {s0 + i: data[i] for i in range(hi - lo)}
        except Exception as exc:  # noqa: BLE001 - reported per frame, run goes on
            errors.append(
                f"run {self.uid} field {self.image_key!r} seq_nums {s0}..{s0 + hi - lo - 1}: "
                f"cannot read {res.get('uri')!r}: {type(exc).__name__}: {exc}"
            )
            return {s0 + i: None for i in range(hi - lo)}

    def chunks(self, skip: set[int], size: int, errors: list[str]) -> Iterator[_Chunk]:
        pending: dict[int, dict[str, Any]] = {}  # seq -> {time, pos, frame?}
        external = bool(self.descriptor["data_keys"][self.image_key].get("external"))
        frames_by_seq: dict[int, Any] = {}

        def ready() -> list[int]:
            return sorted(s for s, r in pending.items() if not external or s in frames_by_seq)

        def emit(seqs: list[int]) -> _Chunk:
            rows = [pending.pop(s) for s in seqs]
            frames = [r["frame"] if not external else frames_by_seq.pop(s)
                      for s, r in zip(seqs, rows)]
            return _Chunk(
                np.asarray(seqs, dtype=np.int64),
                np.asarray([r["time"] for r in rows], dtype=np.float64),
                frames,
                {m: np.asarray([r["pos"].get(m, np.nan) for r in rows], dtype=np.float64)
                 for m in self.motors},
            )

        def events(name: str, doc: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
            if name == "event":
                yield {"seq_num": doc["seq_num"], "time": doc["time"], "data": doc["data"]}
            else:  # event_page
                for i, s in enumerate(doc["seq_num"]):
                    yield {"seq_num": s, "time": doc["time"][i],
                           "data": {k: v[i] for k, v in doc["data"].items()}}

        docs = iter([*self._buffer, *self._docs])
        self._descriptor_uids.add(self.descriptor["uid"])
        for name, doc in docs:
            if name == "descriptor" and doc.get("name") == self.options.stream:
                self._descriptor_uids.add(doc["uid"])
            elif name in ("event", "event_page") and doc["descriptor"] in self._descriptor_uids:
                for ev in events(name, doc):
                    s = int(ev["seq_num"])
                    if s in skip:
                        continue
                    row = {"time": float(ev["time"]),
                           "pos": {m: _as_float(ev["data"].get(m)) for m in self.motors}}
                    if not external:
                        row["frame"] = ev["data"].get(self.image_key)
                    pending[s] = row
            elif name == "stream_resource" and doc.get("data_key") == self.image_key:
                self._resources[doc["uid"]] = doc
            elif name == "stream_datum" and doc["stream_resource"] in self._resources:
                if doc.get("descriptor") in self._descriptor_uids:
                    for s, fr in self._stream_frames(doc, errors).items():
                        if s not in skip:
                            frames_by_seq[s] = fr
            elif name in ("resource", "datum", "datum_page") and external:
                if name == "resource":
                    errors.append(
                        f"run {self.uid} field {self.image_key!r}: legacy resource/datum "
                        f"(spec {doc.get('spec')!r}) is not supported; use method='arrays'"
                    )
            elif name == "stop":
                break
            r = ready()
            while len(r) >= size:
                yield emit(r[:size])
                r = r[size:]
        r = ready()
        for i in range(0, len(r), size):
            yield emit(r[i:i + size])
        if pending:  # events whose external frame never arrived
            missing = sorted(pending)
            errors.append(
                f"run {self.uid} field {self.image_key!r}: no frame data for seq_nums "
                f"{missing[:10]}{'...' if len(missing) > 10 else ''}"
            )
        for f in self._h5.values():
            with contextlib.suppress(Exception):
                f.close()


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _is_sql_run(run: Any) -> bool:
    for spec in getattr(run, "specs", []):
        if getattr(spec, "name", None) == "BlueskyRun":
            return str(getattr(spec, "version", "")).startswith("3.")
    return False


def _open_source(catalog: Any, uid: str, options: ReplayOptions) -> Any:
    run = catalog[uid]  # KeyError when missing
    method = options.method
    if method == "auto":
        method = "arrays" if _is_sql_run(run) else "documents"
    if method == "arrays":
        if not _is_sql_run(run):
            raise ReplayError(f"run {uid}: method='arrays' needs a SQL-backed (v3) BlueskyRun")
        return _ArrayRun(run, uid, options)
    return _DocumentRun(run.documents(), uid, options)


# ----------------------------------------------------------------------------------- replay
def _reseed_binner(binner: Any, writer: Any, identity_dim: int) -> int:
    """Re-assign stored identity latents (seq order) so bins continue; returns rows used."""
    node = writer.node
    if node is None or not writer.stored_seq_nums:
        return 0
    from .store import TABLE_KEY

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
    from .pipeline import BinningPipeline

    options = options or ReplayOptions()
    t0 = time.perf_counter()
    summary = summary if summary is not None else RunSummary(uid=uid)
    summary.model_id = f"{encoder.name}-{encoder.version}"
    errors: list[str] = summary.errors
    writer = None
    lock = None
    try:
        try:
            source = _open_source(catalog, uid, options)
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
        )
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
                )
                shape = shape or next(
                    (np.asarray(chunk.frames[i]).shape[-2:] for i in readable), None
                )
                summary.frames_written += result.n_rows
                for e in result.errors:
                    errors.append(f"run {uid} field {source.image_key!r} {e}")
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
        from .store import describe_fault

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
    from .callbacks.dae_binning import DAEBinningCallback
    from .store import DerivedStore

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
            cb = _make_callback(DAEBinningCallback, target, encoder, options)
            cb._lock_nodes = False  # this replay holds the node's lock
            for name, doc in run.documents():
                cb(name, doc)
            for meth in ("flush", "wait"):
                if hasattr(cb, meth):
                    getattr(cb, meth)()
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


def _make_callback(cls: Any, client: Any, encoder: Any, options: ReplayOptions) -> Any:
    """DAEBinningCallback with whatever of our settings its signature accepts."""
    import inspect

    params = inspect.signature(cls).parameters
    wanted = {"encoder": encoder, "binner": _make_binner(encoder, options),
              "persist_binner": False,
              "root": options.root, "backup_dir": options.backup_dir,
              "batch_size": options.batch_size, "image_key": options.image_key,
              "stream_name": options.stream}
    kwargs = {k: v for k, v in wanted.items() if k in params and v is not None}
    return cls(client, **kwargs)


def _reachable(client: Any, timeout: float = 2.0) -> bool:
    """One quick request (no retries) to the client's server; False when it does not answer."""
    import httpx

    ctx = getattr(client, "context", None)
    if ctx is None:
        return True
    try:
        if type(ctx.http_client).__name__ == "TestClient":  # in-process app
            r = ctx.http_client.get(ctx.api_uri)
        else:
            r = ctx.http_client.get(ctx.api_uri, timeout=timeout)
    except httpx.HTTPError:
        return False
    return r.status_code < 500


def _server_of(client: Any) -> str:
    try:
        return str(client.context.api_uri).split("?")[0]
    except Exception:  # noqa: BLE001
        return "?"


def replay_runs(
    catalog: Any,
    uids: Sequence[str],
    *,
    encoder: Any = None,
    target: Any = None,
    options: ReplayOptions | None = None,
    show_progress: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[RunSummary]:
    """Replay ``uids`` of ``catalog`` serially; derived nodes go to ``target`` (default: catalog).

    Returns one RunSummary per uid.  Ctrl-C stops the batch after storing what was done: the
    current run is marked "interrupted", the rest are not started (not listed).
    """
    from tqdm.auto import tqdm

    from .store import DerivedStore

    options = options or ReplayOptions()
    encoder = load_model(encoder if encoder is not None else options.model, options.device)
    target = catalog if target is None else target
    store = DerivedStore(target, root=options.root, backup_dir=options.backup_dir)
    summaries: list[RunSummary] = []
    bar = tqdm(total=None, unit="frame", desc="replay", disable=not show_progress,
               leave=False)

    def tick(n: int) -> None:
        bar.update(n)
        if progress is not None:
            progress(n)

    try:
        for uid in uids:
            bar.set_postfix_str(uid[:8])
            down = [c for c in ([catalog] if target is catalog else [catalog, target])
                    if not _reachable(c)]
            if down:  # fail fast instead of the client's long retry loop
                summaries.append(RunSummary(uid=uid, status="failed", errors=[
                    f"run {uid}: Tiled unreachable at {_server_of(down[0])} (run not started)"
                ]))
                continue
            if options.method == "callback":
                summaries.append(_replay_run_callback(catalog, uid, encoder=encoder,
                                                      target=target, options=options))
                continue
            summary = RunSummary(uid=uid)
            try:
                replay_run(catalog, uid, encoder=encoder, store=store, options=options,
                           progress=tick, summary=summary)
            except KeyboardInterrupt:
                summaries.append(summary)
                logger.warning("replay interrupted during run %s; rows so far are stored", uid)
                break
            summaries.append(summary)
    finally:
        bar.close()
    return summaries


# ------------------------------------------------------------------------------ distributed
_CLIENTS: dict[tuple[str, str | None], Any] = {}


def _redact(text: str, secrets: Sequence[str | None] = ()) -> str:
    """``text`` without API keys: ``api_key=...`` query values and the given secrets."""
    import re

    text = re.sub(r"(api_key=)[^&\s'\"]+", r"\1***", str(text))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def connect(uri: str, api_key: str | None = None) -> Any:
    """Tiled client for ``uri``; ReplayError naming the server (never the API key) and what
    went wrong: unreachable, key refused (401/403), or a server error (5xx)."""
    from tiled.client import from_uri

    import httpx

    from .store import describe_fault

    key = (uri, api_key)
    if key in _CLIENTS:
        return _CLIENTS[key]
    where = uri.split("?")[0]
    uri_key = dict(p.split("=", 1) for p in urlparse(uri).query.split("&") if "=" in p)
    secrets = [api_key, unquote(uri_key.get("api_key", "")) or None, uri_key.get("api_key")]
    try:  # one quick probe first: the client itself retries for a long time
        httpx.get(uri, timeout=5.0, headers={"Authorization": f"Apikey {api_key}"}
                  if api_key else None)
    except httpx.HTTPError as exc:
        raise ReplayError(f"cannot reach Tiled at {where!r}: {type(exc).__name__}: "
                          f"{_redact(str(exc), secrets)}") from exc
    try:
        client = from_uri(uri, api_key=api_key) if api_key else from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - turn into a clear message
        if isinstance(exc, httpx.HTTPStatusError):
            raise ReplayError(f"{describe_fault(exc)} at {where!r}") from None
        raise ReplayError(f"cannot connect to Tiled at {where!r}: {type(exc).__name__}: "
                          f"{_redact(str(exc), secrets)}") from None
    _CLIENTS[key] = client
    return client


def _worker_replay(
    uri: str, api_key: str | None, uid: str, options: ReplayOptions,
    target_uri: str | None = None,
) -> dict[str, Any]:
    """Dask task: own Tiled client and model per worker process; returns a summary dict."""
    try:
        catalog = connect(uri, api_key)
        target = connect(target_uri, api_key) if target_uri else catalog
        encoder = load_model(options.model, options.device)
        from .store import DerivedStore

        store = DerivedStore(target, root=options.root, backup_dir=options.backup_dir)
        if options.method == "callback":
            s = _replay_run_callback(catalog, uid, encoder=encoder, target=target,
                                     options=options)
        else:
            s = replay_run(catalog, uid, encoder=encoder, store=store, options=options)
    except Exception as exc:  # noqa: BLE001 - reported, batch goes on
        s = RunSummary(uid=uid, status="failed",
                       errors=[f"run {uid}: {type(exc).__name__}: {exc}"])
    out = s.to_dict()
    out["worker_pid"] = os.getpid()
    return out


def replay_distributed(
    uri: str,
    uids: Sequence[str],
    *,
    api_key: str | None = None,
    options: ReplayOptions | None = None,
    scheduler: str | None = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    target_uri: str | None = None,
    show_progress: bool = True,
) -> list[RunSummary]:
    """Fan runs out over Dask: a LocalCluster of ``n_workers`` processes, or ``scheduler``.

    Each worker opens its own Tiled client (``uri`` + ``api_key``), loads the model once and
    writes its runs' derived nodes.  Summaries come back in ``uids`` order.
    """
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    options = options or ReplayOptions()
    cluster = None
    # set_as_default=False: otherwise every dask computation in this process (a Tiled server
    # in the same process computes its arrays with dask) goes to the cluster whose workers are
    # waiting on that very server, and the reads time out
    if scheduler:
        client = Client(scheduler, set_as_default=False)
    else:
        env = {"PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent),
             *filter(None, [os.environ.get("PYTHONPATH")])])}
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                               processes=True, dashboard_address=None,
                               env=env)
        client = Client(cluster, set_as_default=False)
    try:
        futures = {
            client.submit(_worker_replay, uri, api_key, uid, options, target_uri, pure=False,
                          key=f"replay-{uid}-{i}"): i
            for i, uid in enumerate(uids)
        }
        results: dict[int, RunSummary] = {}
        with tqdm(total=len(futures), unit="run", desc="replay",
                  disable=not show_progress, leave=False) as bar:
            for fut in as_completed(futures, loop=client.loop):
                i = futures[fut]
                try:
                    d = fut.result()
                    d.pop("worker_pid", None)
                    results[i] = RunSummary(**d)
                except Exception as exc:  # noqa: BLE001 - worker died etc.
                    results[i] = RunSummary(uid=uids[i], status="failed",
                                            errors=[f"run {uids[i]}: worker failed: {exc}"])
                bar.update(1)
        return [results[i] for i in range(len(uids))]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gisaxs-bluesky replay``."""
    src = parser.add_argument_group("source")
    src.add_argument("--tiled-uri", help="Tiled server with the raw runs (TiledWriter or "
                     "databroker/Mongo); default env GISAXS_TILED_URI")
    src.add_argument("--api-key", default=None, help="Tiled API key (default env TILED_API_KEY)")
    src.add_argument("--target-uri", default=None,
                     help="write derived nodes to this Tiled instead (e.g. for a read-only "
                     "Mongo catalog)")
    sel = parser.add_argument_group("run selection")
    sel.add_argument("uids", nargs="*", help="run uids (added to query results)")
    sel.add_argument("--uid-file", help="file with one uid per line")
    sel.add_argument("--scan-ids", metavar="LO:HI", help="inclusive scan_id range, e.g. 10:20")
    sel.add_argument("--plan-name")
    sel.add_argument("--since", help="start time >= (unix seconds or ISO-8601)")
    sel.add_argument("--until", help="start time <= (unix seconds or ISO-8601)")
    sel.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                     help="start-document metadata, e.g. sample=S1 (JSON values accepted)")
    sel.add_argument("--limit", type=int)
    opt = parser.add_argument_group("replay")
    opt.add_argument("--model", default="pretrained",
                     help="'pretrained', a checkpoint .pt, or 'untrained[:seed]'")
    opt.add_argument("--device", default="cpu")
    opt.add_argument("--method", default="auto",
                     choices=["auto", "arrays", "documents", "callback"])
    opt.add_argument("--stream", default="primary")
    opt.add_argument("--image-key", default=None)
    opt.add_argument("--root", default="gisaxs_derived")
    opt.add_argument("--chunk-size", type=int, default=16)
    opt.add_argument("--binner-state", default=None, help="initial binner state (JSON)")
    opt.add_argument("--max-frames", type=int, default=None)
    opt.add_argument("--backup-dir", default=None)
    dist = parser.add_argument_group("distributed")
    dist.add_argument("--dask", action="store_true", help="fan runs out over Dask workers")
    dist.add_argument("--scheduler", default=None, help="tcp://host:port of a Dask scheduler "
                      "(implies --dask; default: a LocalCluster)")
    dist.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print summaries as JSON")
    parser.add_argument("--no-progress", action="store_true")


def _parse_where(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ReplayError(f"--where {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _parse_range(text: str | None) -> tuple[int | None, int | None] | None:
    if not text:
        return None
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            return int(lo), int(lo)
        return (int(lo) if lo else None, int(hi) if hi else None)
    except ValueError as exc:
        raise ReplayError(f"--scan-ids {text!r}: expected LO:HI integers") from exc


def _print_summaries(summaries: Sequence[RunSummary], as_json: bool) -> None:
    if as_json:
        print(json.dumps([s.to_dict() for s in summaries], indent=2, default=str))
        return
    print(f"{'uid':10} {'scan':>5} {'status':12} {'written':>8} {'skipped':>8} {'failed':>7}")
    for s in summaries:
        print(f"{s.uid[:10]:10} {s.scan_id if s.scan_id is not None else '-':>5} "
              f"{s.status:12} {s.frames_written:8d} {s.frames_skipped:8d} {s.frames_failed:7d}")
        for e in s.errors[:5]:
            print(f"    ! {e}")


def run(args: argparse.Namespace) -> int:
    """``gisaxs-bluesky replay``: 0 when every run is complete/up-to-date, 1 if any is not,
    2 on a usage or connection error, 130 when interrupted."""
    uri = args.tiled_uri or os.environ.get("GISAXS_TILED_URI")
    api_key = args.api_key or os.environ.get("TILED_API_KEY")
    try:
        if not uri:
            raise ReplayError("no Tiled URI: pass --tiled-uri or set GISAXS_TILED_URI")
        options = ReplayOptions(
            model=args.model, device=args.device, root=args.root,
            backup_dir=args.backup_dir, method=args.method, stream=args.stream,
            image_key=args.image_key, chunk_size=args.chunk_size,
            binner_state=args.binner_state, max_frames=args.max_frames,
        )
        uids = list(args.uids)
        if args.uid_file:
            uids += [ln.strip() for ln in Path(args.uid_file).read_text().splitlines()
                     if ln.strip() and not ln.startswith("#")]
        queries = build_queries(
            scan_ids=_parse_range(args.scan_ids), plan_name=args.plan_name,
            since=args.since, until=args.until, metadata=_parse_where(args.where),
        )
        catalog = connect(uri, api_key)
        selected = select_runs(catalog, *queries, uids=uids, root=args.root, limit=args.limit)
        if not selected:
            print("no runs match the selection", file=sys.stderr)
            return 1
        print(f"replaying {len(selected)} run(s) with model {args.model!r}", file=sys.stderr)
        if args.dask or args.scheduler:
            summaries = replay_distributed(
                uri, selected, api_key=api_key, options=options, scheduler=args.scheduler,
                n_workers=args.workers, target_uri=args.target_uri,
                show_progress=not args.no_progress,
            )
        else:
            target = connect(args.target_uri, api_key) if args.target_uri else None
            summaries = replay_runs(catalog, selected, target=target, options=options,
                                    show_progress=not args.no_progress)
    except (ReplayError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    _print_summaries(summaries, args.json)
    if any(s.status == "interrupted" for s in summaries):
        return 130
    return 0 if summaries and all(s.ok for s in summaries) else 1
