"""Where a replayed run's frames come from: its array nodes in Tiled, or its documents."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..frames import (
    FrameGeometry,
    FrameReaders,
    FrameRef,
    RunFrames,
    RunFramesOptions,
    geometry_summary,
    scanned_motors,
    stream_descriptor,
)
from ..frames import find_image_key as frames_image_key
from .options import ReplayError, ReplayOptions

logger = logging.getLogger(__name__)

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
    if image_key is not None:
        if image_key not in data_keys:
            raise ReplayError(
                f"{where}: image_key {image_key!r} not found (data keys: {sorted(data_keys)})"
            )
        if frames_image_key({image_key: data_keys[image_key]}) is None:
            raise ReplayError(
                f"{where}: field {image_key!r} has shape {data_keys[image_key].get('shape')}, "
                "not a 2-D image"
            )
        return image_key
    key = frames_image_key(data_keys)
    if key is None:
        shapes = {k: dk.get("shape") for k, dk in data_keys.items()}
        raise ReplayError(f"{where} has no 2-D image field (data keys and shapes: {shapes})")
    return key


@dataclass
class _Chunk:
    seq: np.ndarray
    times: np.ndarray
    frames: list[Any]
    positions: dict[str, np.ndarray]
    geometries: list[Any]  # each frame's, as the frame layer resolves it


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
        self.motors = scanned_motors(self.start)
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
        # the geometry: the stream's descriptor, and the incidence motor's column (theta scan)
        geometry = FrameGeometry(options.geometry, fallback=options.geometry_fallback)
        self.descriptor = stream_descriptor(options.stream, self.stream.metadata)
        key = geometry.incidence_key(self.start, self.descriptor)
        readings = {}
        if key in self.positions:
            readings = {key: self.positions[key]}
        elif key is not None and key in keys:
            readings = {key: np.asarray(self.stream[key].read(), dtype=np.float64).reshape(-1)}
        self.geometries = geometry.for_readings(self.start, self.descriptor, readings,
                                                len(self.seq_nums))
        self.geometry_summary = geometry_summary(self.geometries[0] if self.geometries
                                                 else None)

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
                [self.geometries[i] for i in idx],
            )
            pos += hi - lo


class _DocumentRun:
    """Frames of a run from its documents, through the frame-source layer the live callback
    uses (inline frames, HDF5 stream resources, legacy resources through their handlers)."""

    def __init__(self, docs: Iterable[tuple[str, dict]], uid: str, options: ReplayOptions):
        self.uid = uid
        self.options = options
        self._docs = iter(docs)
        self._buffer: list[tuple[str, dict]] = []
        self.start: dict[str, Any] = {}
        self.descriptor: dict[str, Any] | None = None
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
        self.image_key = find_image_key(self.descriptor["data_keys"], options.image_key,
                                        where=self.where)
        self.motors = scanned_motors(self.start)
        n = self.start.get("num_points")
        self.n_frames = int(n) if isinstance(n, int) else None
        self.geometry = FrameGeometry(options.geometry, fallback=options.geometry_fallback)
        self.router: RunFrames | None = None

    @property
    def geometry_summary(self) -> dict | None:
        """The first frame's geometry (None until the documents have given a frame)."""
        return None if self.router is None else self.router.geometry_summary

    def chunks(self, skip: set[int], size: int, errors: list[str]) -> Iterator[_Chunk]:
        refs: list[FrameRef] = []
        router = self.router = RunFrames(
            self.start, emit=refs.append, readers=FrameReaders(),
            options=RunFramesOptions(image_key=self.image_key, stream_name=self.options.stream,
                                     geometry=self.geometry),
            note=lambda message: errors.append(f"run {self.uid}: {message}"))
        missing: list[int] = []
        try:
            for name, doc in [*self._buffer, *self._docs]:
                router(name, doc)
                while len(refs) >= size:
                    chunk, refs[:size] = self._chunk(refs[:size], skip, errors, missing), []
                    if chunk is not None:
                        yield chunk
                if name == "stop":
                    break
            for i in range(0, len(refs), size):
                chunk = self._chunk(refs[i:i + size], skip, errors, missing)
                if chunk is not None:
                    yield chunk
        finally:
            router.release()
        if missing:  # events whose frame never arrived
            errors.append(
                f"run {self.uid} field {self.image_key!r}: no frame data for seq_nums "
                f"{missing[:10]}{'...' if len(missing) > 10 else ''}"
            )

    def _chunk(self, refs: list[FrameRef], skip: set[int], errors: list[str],
               missing: list[int]) -> _Chunk | None:
        """Frames not yet stored, read (None where unreadable: no row, a later replay
        retries them); events that never got a frame are only reported."""
        todo = []
        for ref in refs:
            if ref.seq_num in skip:
                continue
            if ref.error is not None and ref.loader is None and ref.data is None:
                missing.append(ref.seq_num)
                continue
            todo.append(ref)
        if not todo:
            return None
        frames: list[Any] = []
        for ref in todo:
            try:
                frames.append(ref.load())
            except Exception as exc:  # noqa: BLE001 - reported per frame, run goes on
                errors.append(f"run {self.uid} field {self.image_key!r} seq_num="
                              f"{ref.seq_num}: cannot read {ref.source}: "
                              f"{type(exc).__name__}: {exc}")
                frames.append(None)
        return _Chunk(
            np.asarray([r.seq_num for r in todo], dtype=np.int64),
            np.asarray([r.time for r in todo], dtype=np.float64),
            frames,
            {m: np.asarray([r.positions.get(m, np.nan) for r in todo], dtype=np.float64)
             for m in self.motors},
            [r.metadata.get("geometry") for r in todo],
        )


def _is_sql_run(run: Any) -> bool:
    for spec in getattr(run, "specs", []):
        if getattr(spec, "name", None) == "BlueskyRun":
            return str(getattr(spec, "version", "")).startswith("3.")
    return False


def open_source(catalog: Any, uid: str, options: ReplayOptions) -> Any:
    run = catalog[uid]  # KeyError when missing
    method = options.method
    if method == "auto":
        method = "arrays" if _is_sql_run(run) else "documents"
    if method == "arrays":
        if not _is_sql_run(run):
            raise ReplayError(f"run {uid}: method='arrays' needs a SQL-backed (v3) BlueskyRun")
        return _ArrayRun(run, uid, options)
    return _DocumentRun(run.documents(), uid, options)

