"""Reading frames from HDF5 files a detector is still writing (SWMR), live during a scan.

A real detector writes its HDF5 file in another process (the areaDetector IOC, an Eiger or
Pilatus file writer), and SWMR readers here see each frame once it is flushed. A simulated
detector in *this* process is different: HDF5 opens a file once per process, so a second
``h5py.File`` on the same path shares the writer's open file, which SWMR does not cover.

What was seen (h5py 3.16 / HDF5 2.0, two callbacks reading one simulated detector's file
from two threads under CPU load): now and then every read of frames 1..n by one reader
returned an exact copy of frame 0, in about a third of the runs. Reading such a file through
the writer's own handle (:func:`register_local_writer`) did not stop it (4 of 5 runs), nor
did one shared read handle per file per process, refreshed and read under its lock (2 of 10);
with ``read_direct`` into a fresh array instead of h5py's fast-path ``ds[i]`` reader as well,
0 of 10 runs under the same load. All three are kept; the root cause in the library was not
isolated.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Protocol

import h5py
import numpy as np

__all__ = [
    "LocalWriter",
    "SwmrFrameReader",
    "local_writer",
    "read_row",
    "register_local_writer",
    "unregister_local_writer",
]


class LocalWriter(Protocol):
    """An HDF5 file being written by this process (e.g. the simulated detector's)."""

    def read_frame(self, dataset: str, index: int) -> np.ndarray | None:
        """Frame ``index`` of ``dataset`` if written and flushed, else None (thread-safe)."""


_writers: dict[str, LocalWriter] = {}
_writers_lock = threading.Lock()


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def register_local_writer(path: str | os.PathLike, writer: LocalWriter) -> None:
    """Route reads of ``path`` in this process through ``writer`` until unregistered."""
    with _writers_lock:
        _writers[_key(path)] = writer


def unregister_local_writer(path: str | os.PathLike, writer: LocalWriter) -> None:
    """Undo :func:`register_local_writer` (only if ``writer`` is still the registered one)."""
    with _writers_lock:
        if _writers.get(_key(path)) is writer:
            del _writers[_key(path)]


def local_writer(path: str | os.PathLike) -> LocalWriter | None:
    """The in-process writer of ``path``, if one is registered."""
    with _writers_lock:
        return _writers.get(_key(path))


def read_row(ds: Any, index: int) -> np.ndarray:
    """``ds[index]`` through ``read_direct`` into a fresh array (not h5py's cached fast path)."""
    out = np.empty(ds.shape[1:], dtype=ds.dtype)
    ds.read_direct(out, np.s_[index])
    return out


class _OpenFile:
    """One SWMR read handle on a file, shared by every reader in this process."""

    def __init__(self, path: str) -> None:
        self.file = h5py.File(path, "r", swmr=True, libver="latest")
        self.lock = threading.Lock()
        self.users = 0


_files: dict[str, _OpenFile] = {}
_files_lock = threading.Lock()


def _acquire(path: str) -> _OpenFile:
    key = _key(path)
    with _files_lock:
        f = _files.get(key)
        if f is None:
            f = _files[key] = _OpenFile(path)
        f.users += 1
        return f


def _release(path: str, f: _OpenFile, *, broken: bool = False) -> None:
    key = _key(path)
    with _files_lock:
        f.users -= 1
        if broken and _files.get(key) is f:
            del _files[key]  # the next reader reopens; users of this handle finish with it
        if f.users <= 0:
            if _files.get(key) is f:
                del _files[key]
            with f.lock:
                try:
                    f.file.close()
                except Exception:  # noqa: BLE001
                    pass


class SwmrFrameReader:
    """Reads frames from (possibly still growing) SWMR HDF5 files; one thread per instance.

    Files stay open between reads (closed by :meth:`close`); a frame that is not there yet is
    waited for up to ``timeout`` seconds, then ``TimeoutError`` names the file, dataset, index
    and what was seen. Files written by this very process are read through their registered
    writer; every other file has one read handle per process, shared by all readers, and
    refreshed and read under its lock (see the module docstring).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._files: dict[str, _OpenFile] = {}

    def read(self, path: str, dataset: str, index: int) -> np.ndarray:
        """Frame ``index`` of ``path``:``dataset``, waiting while the file or frame is missing."""
        deadline = time.monotonic() + self.timeout
        last = "not opened"
        while True:
            writer = local_writer(path) if path not in self._files else None
            try:
                if writer is not None:
                    frame = writer.read_frame(dataset, index)
                    if frame is not None:
                        return frame
                    last = f"frame not yet written by this process's writer of {path}"
                else:
                    f = self._files.get(path)
                    if f is None:
                        f = self._files[path] = _acquire(path)
                    with f.lock:
                        ds = f.file[dataset]
                        ds.refresh()
                        n = ds.shape[0]
                        if n > index:
                            return read_row(ds, index)
                    last = f"dataset {dataset!r} holds {n} frames"
            except (OSError, KeyError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self.close(path, broken=True)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"frame index {index} of {path}:{dataset} not readable after "
                    f"{self.timeout:.1f} s ({last})"
                )
            time.sleep(0.02)

    def close(self, path: str | None = None, *, broken: bool = False) -> None:
        """Stop using one file, or all of them (never raises); the last user closes it."""
        paths = [path] if path is not None else list(self._files)
        for p in paths:
            f = self._files.pop(p, None)
            if f is not None:
                _release(p, f, broken=broken)
