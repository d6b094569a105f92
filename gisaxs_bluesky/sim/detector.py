"""Simulated GISAXS area detector that writes HDF5 like an areaDetector HDF5 plugin.

Composed like ophyd-async's ``SimBlobDetector`` (0.21 detector-logic API): a trigger
logic (remembers how many exposures), an acquire logic (computes frames from the
current motor positions and appends them to an SWMR HDF5 file, flushing each frame),
and a data logic (emits ``stream_resource``/``stream_datum`` with mimetype
``application/x-hdf5``).  ``bluesky_tiled_plugins.TiledWriter`` registers the file,
so Tiled serves the frames back, also while the scan is still running.

Data keys (for a detector named ``pilatus``):

* ``pilatus``        -- the 2-D frame, descriptor ``shape: [ny, nx]``, HDF5 ``/entry/data/data``
* ``pilatus-total``  -- per-frame sum (float64), HDF5 ``/entry/sum``
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from event_model import DataKey
from ophyd_async.core import (
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    StandardDetector,
    StaticPathProvider,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
    UUIDFilenameProvider,
    soft_signal_r_and_setter,
)
from ophyd_async.sim import SimMotor

from ..frames.hdf5 import read_row, register_local_writer, unregister_local_writer

__all__ = [
    "DATA_PATH",
    "SUM_PATH",
    "PILATUS_SHAPE",
    "FrameFn",
    "FrameSource",
    "GisaxsDetector",
    "blob_frame_fn",
    "make_gisaxs_detector",
    "make_motors",
]

#: HDF5 dataset holding the frames (areaDetector NeXus default)
DATA_PATH = "/entry/data/data"
#: HDF5 dataset holding the per-frame pixel sum
SUM_PATH = "/entry/sum"
#: Pilatus 1M frame shape (rows, columns)
PILATUS_SHAPE: tuple[int, int] = (1043, 981)

FrameFn = Callable[[Mapping[str, float]], np.ndarray]


def blob_frame_fn(
    shape: tuple[int, int] = PILATUS_SHAPE,
    *,
    width_motor: str = "x",
    base_width: float = 0.05,
    peak: float = 1000.0,
    seed: int | None = 0,
    dtype: Any = np.int32,
) -> FrameFn:
    """Return a frame_fn: Gaussian blob whose width grows with motor ``width_motor`` plus Poisson noise."""
    ny, nx = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    r2 = xx * xx + yy * yy
    rng = np.random.default_rng(seed)

    def frame_fn(positions: Mapping[str, float]) -> np.ndarray:
        width = base_width + abs(float(positions.get(width_motor, 0.0))) * 0.1
        lam = peak * np.exp(-r2 / (2 * width * width)) + 1.0
        return rng.poisson(lam).astype(dtype)

    return frame_fn


class _FrameFile:
    """An SWMR HDF5 file that frames are appended to, one flush per frame.

    Readers in other processes open the file with SWMR; readers in this process (the DAE
    callback, the adaptive plan) read through :meth:`read_frame`, registered with
    :func:`gisaxs_bluesky.frames.hdf5.register_local_writer`, because HDF5 shares one open file per
    process and a second handle on it is not a safe SWMR reader.
    """

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.file = h5py.File(path, "w", libver="latest")
        self.data = self.file.create_dataset(
            DATA_PATH,
            shape=(0, *shape),
            dtype=dtype,
            maxshape=(None, *shape),
            chunks=(1, *shape),
        )
        self.sum = self.file.create_dataset(
            SUM_PATH, shape=(0,), dtype=np.float64, maxshape=(None,), chunks=(1024,)
        )
        self.file.swmr_mode = True
        self.count = 0
        self._closed = False
        register_local_writer(path, self)

    def append(self, frame: np.ndarray) -> None:
        """Append one frame and its sum, then flush so SWMR readers see it."""
        total = float(np.sum(frame, dtype=np.float64))
        with self.lock:
            n = self.count
            self.data.resize(n + 1, axis=0)
            self.data[n] = frame
            self.data.flush()
            self.sum.resize(n + 1, axis=0)
            self.sum[n] = total
            self.sum.flush()
            self.count = n + 1

    def read_frame(self, dataset: str, index: int) -> np.ndarray | None:
        """Row ``index`` of ``dataset`` once appended; None before that or after close."""
        with self.lock:
            if self._closed or index >= self.count:
                return None
            return read_row(self.file[dataset], index)

    def close(self) -> None:
        """Close the file (idempotent); later reads open it as any other file."""
        with self.lock:
            self._closed = True
            with suppress(Exception):
                self.file.close()
        unregister_local_writer(self.path, self)


async def _position(motor: Any) -> float:
    """Current position of an ophyd-async movable (``locate``) or an ophyd motor (``position``)."""
    locate = getattr(motor, "locate", None)
    if locate is not None and inspect.iscoroutinefunction(locate):
        return float((await locate())["readback"])
    if hasattr(motor, "position"):
        return float(motor.position)
    raise TypeError(f"motor {motor!r} has neither async locate() nor .position")


class FrameSource:
    """Computes frames with ``frame_fn`` from motor positions and writes them to a file."""

    def __init__(
        self,
        frame_fn: FrameFn,
        motors: Sequence[Any] = (),
        shape: tuple[int, int] | None = None,
        dtype: Any = None,
        exposure_s: float = 0.0,
    ) -> None:
        if not exposure_s >= 0:
            raise ValueError(f"exposure_s={exposure_s} must be >= 0")
        self.exposure_s = float(exposure_s)
        self.frame_fn = frame_fn
        self.motors = list(motors)
        self.shape = tuple(shape) if shape is not None else None
        self.dtype = np.dtype(dtype) if dtype is not None else None
        self.num_frames = 1
        self.last_positions: dict[str, float] = {}
        self._file: _FrameFile | None = None
        self.frames_written, self._set_frames_written = soft_signal_r_and_setter(int)

    async def positions(self) -> dict[str, float]:
        """Read the current position of every motor, keyed by motor name."""
        values = await asyncio.gather(*(_position(m) for m in self.motors))
        return {m.name: v for m, v in zip(self.motors, values)}

    async def make_frame(self) -> np.ndarray:
        """Compute one frame for the current positions; check it is 2-D numeric."""
        pos = await self.positions()
        self.last_positions = pos
        frame = np.asarray(self.frame_fn(pos))
        if frame.ndim != 2 or frame.dtype.kind not in "iuf":
            raise ValueError(
                f"frame_fn must return a 2-D int/float array, got shape={frame.shape} "
                f"dtype={frame.dtype}"
            )
        return frame

    async def frame_spec(self) -> tuple[tuple[int, int], np.dtype]:
        """Shape and dtype of frames, probing frame_fn once if they were not given."""
        if self.shape is None or self.dtype is None:
            frame = await self.make_frame()
            self.shape = self.shape or (int(frame.shape[0]), int(frame.shape[1]))
            self.dtype = self.dtype or frame.dtype
        return self.shape, self.dtype  # type: ignore[return-value]

    def open_file(self, path: Path) -> None:
        """Create a new HDF5 file for this acquisition series."""
        assert self.shape is not None and self.dtype is not None
        self.close_file()
        self._file = _FrameFile(path, self.shape, self.dtype)
        self._set_frames_written(0)

    def close_file(self) -> None:
        """Close the current file, if any."""
        if self._file is not None:
            self._file.close()
            self._file = None

    async def write_frames(self) -> None:
        """Acquire ``num_frames`` frames into the open file."""
        if self._file is None:
            raise RuntimeError("FrameSource.open_file was not called")
        for _ in range(self.num_frames):
            if self.exposure_s:  # the detector integrates before the frame exists
                await asyncio.sleep(self.exposure_s)
            frame = await self.make_frame()
            if frame.shape != self.shape:
                raise ValueError(
                    f"frame_fn returned shape {frame.shape}, detector declared {self.shape}"
                )
            self._file.append(frame.astype(self.dtype, copy=False))
            self._set_frames_written(self._file.count)
            await asyncio.sleep(0)


class _TriggerLogic(DetectorTriggerLogic):
    """Internal triggering: remember how many frames to take."""

    def __init__(self, source: FrameSource) -> None:
        self.source = source

    async def prepare_internal(self, num: int, livetime: float, deadtime: float):
        self.source.num_frames = max(int(num), 1)

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


class _AcquireLogic(DetectorAcquireLogic):
    """Run frame writing as a background task (like an armed detector)."""

    def __init__(self, source: FrameSource) -> None:
        self.source = source
        self.task: asyncio.Task | None = None

    async def start_acquiring(self):
        self.task = asyncio.create_task(self.source.write_frames())

    async def wait_for_idle(self):
        if self.task:
            await self.task

    async def ensure_stopped(self):
        if self.task:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
            self.task = None


class _FrameDataProvider(StreamResourceDataProvider):
    """StreamResourceDataProvider whose data keys drop the leading 1 (2-D image shape)."""

    async def make_datakeys(self, collections_per_event: int) -> dict[str, DataKey]:
        keys = await super().make_datakeys(collections_per_event)
        if collections_per_event == 1:
            for key in keys.values():
                shape = list(key["shape"][1:])
                key["shape"] = shape
                key["dtype"] = "array" if shape else "number"
        return keys


class _DataLogic(DetectorDataLogic):
    """Open one HDF5 file per prepare and describe it as two stream resources."""

    def __init__(self, directory: Path, source: FrameSource) -> None:
        self.directory = directory
        self.path_provider = StaticPathProvider(UUIDFilenameProvider(), directory)
        self.source = source

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        info = self.path_provider(datakey_name)
        shape, dtype = await self.source.frame_spec()
        filename = f"{datakey_name}_{info.filename}.h5"
        self.source.open_file(Path(str(info.directory_path)) / filename)
        return _FrameDataProvider(
            uri=f"{info.directory_uri}{filename}",
            resources=[
                StreamResourceInfo(
                    data_key=datakey_name,
                    shape=shape,
                    chunk_shape=(1, *shape),
                    dtype_numpy=np.dtype(dtype).str,
                    parameters={"dataset": DATA_PATH},
                ),
                StreamResourceInfo(
                    data_key=f"{datakey_name}-total",
                    shape=(),
                    chunk_shape=(1024,),
                    dtype_numpy=np.dtype(np.float64).str,
                    parameters={"dataset": SUM_PATH},
                ),
            ],
            mimetype="application/x-hdf5",
            collections_written_signal=self.source.frames_written,
        )

    async def stop(self) -> None:
        self.source.close_file()

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [f"{datakey_name}-total"]


class GisaxsDetector(StandardDetector):
    """Simulated GISAXS area detector writing SWMR HDF5 and emitting StreamResource docs."""

    def __init__(
        self,
        directory: str | Path,
        frame_fn: FrameFn | None = None,
        motors: Sequence[Any] = (),
        name: str = "pilatus",
        *,
        shape: tuple[int, int] | None = None,
        dtype: Any = None,
        exposure_s: float = 0.0,
    ) -> None:
        directory = Path(directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        if frame_fn is None:
            frame_fn, shape, dtype = blob_frame_fn(), PILATUS_SHAPE, np.int32
        self.source = FrameSource(frame_fn, motors, shape=shape, dtype=dtype,
                                  exposure_s=exposure_s)
        self.directory = directory
        self.add_detector_logics(
            _TriggerLogic(self.source),
            _AcquireLogic(self.source),
            _DataLogic(directory, self.source),
        )
        super().__init__(name=name)


def make_gisaxs_detector(
    path: str | Path,
    frame_fn: FrameFn | None = None,
    motors: Sequence[Any] = (),
    name: str = "pilatus",
    **kwargs: Any,
) -> GisaxsDetector:
    """Build a GisaxsDetector writing into ``path`` (no ophyd device-connection step needed)."""
    return GisaxsDetector(path, frame_fn, motors, name=name, **kwargs)


def make_motors(*names: str, units: str = "mm", **initial: float) -> list[SimMotor]:
    """Instant-moving ophyd-async SimMotors, e.g. ``x, th = make_motors("x", "th")``."""
    return [SimMotor(name=n, instant=True, initial_value=initial.get(n, 0.0), units=units)
            for n in names]
