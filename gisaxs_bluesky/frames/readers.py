"""Readers of frame pixels: HDF5 files (live, SWMR), Tiled arrays, legacy handlers.

Each reader makes a *loader* (a function of no arguments that returns the frame) when the
document naming the frame arrives, on the RunEngine thread; the loader runs later on the
consumer's worker thread, so no pixel is read on the RunEngine thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .hdf5 import SwmrFrameReader
from .uri import uri_to_path

__all__ = ["HDF5_MIMETYPES", "FrameReaders", "TiledFrameLoader", "default_handlers"]

logger = logging.getLogger(__name__)

HDF5_MIMETYPES = ("application/x-hdf5", "application/x-hdf5-swmr")


def default_handlers() -> dict[str, Callable[..., Any]]:
    """Legacy handlers found installed (``AD_HDF5`` from area-detector-handlers)."""
    try:
        from area_detector_handlers.handlers import AreaDetectorHDF5Handler
    except ImportError:
        return {}
    return {"AD_HDF5": AreaDetectorHDF5Handler}


class TiledFrameLoader:
    """Frame ``seq_num`` of ``client[uid][stream][key]`` as TiledWriter stored it, waiting up
    to ``timeout`` s for it to arrive (TiledWriter may write it just after this document)."""

    def __init__(self, client: Any, uid: str, stream: str, key: str, seq_num: int,
                 timeout: float) -> None:
        self.client, self.uid, self.stream, self.key = client, uid, stream, key
        self.seq_num, self.timeout = int(seq_num), float(timeout)

    def __call__(self) -> np.ndarray:
        if self.client is None:
            raise ValueError(f"frame seq_num={self.seq_num}: no Tiled client to read it from")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                node = self.client[self.uid][self.stream][self.key]
                if node.shape[0] >= self.seq_num:
                    return np.asarray(node[self.seq_num - 1])
                last = f"{node.shape[0]} frames stored"
            except KeyError as exc:
                last = f"KeyError {exc}"
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"frame seq_num={self.seq_num} not in Tiled "
                    f"{self.uid}/{self.stream}/{self.key} after {self.timeout:.1f} s ({last})"
                )
            time.sleep(0.05)


class FrameReaders:
    """The readers one consumer shares between its runs (one SWMR reader, the Tiled client).

    ``read_from_tiled``: read every non-inline frame from Tiled instead of its file (for a
    machine that does not see the detector's files; TiledWriter must write the run).
    """

    def __init__(
        self,
        client: Any = None,
        *,
        frame_timeout: float = 5.0,
        read_from_tiled: bool = False,
        handler_registry: Mapping[str, Callable[..., Any]] | None = None,
        root_map: Mapping[str, str] | None = None,
    ) -> None:
        if frame_timeout < 0:
            raise ValueError(f"frame_timeout={frame_timeout} must be >= 0")
        self.client = client
        self.frame_timeout = float(frame_timeout)
        self.read_from_tiled = bool(read_from_tiled)
        self.handler_registry = dict(default_handlers(), **(handler_registry or {}))
        self.root_map = dict(root_map or {})
        self._h5 = SwmrFrameReader(self.frame_timeout)
        self._lock = threading.Lock()

    def tiled(self, uid: str, stream: str, key: str, seq_num: int) -> TiledFrameLoader:
        return TiledFrameLoader(self.client, uid, stream, key, seq_num, self.frame_timeout)

    def stream_frame(
        self, uid: str, stream: str, key: str, resource: Mapping[str, Any], index: int,
        seq_num: int,
    ) -> tuple[Callable[[], np.ndarray], str, str | None]:
        """(loader, source, file path or None) of frame ``index`` of a stream resource: its
        HDF5 file when this machine sees it, else the frame TiledWriter stored."""
        tiled = self.tiled(uid, stream, key, seq_num)
        if resource.get("mimetype", "") not in HDF5_MIMETYPES or self.read_from_tiled:
            return tiled, f"tiled {uid}/{stream}", None
        try:
            path = str(uri_to_path(resource["uri"]))
        except (KeyError, ValueError):
            return tiled, f"tiled {uid}/{stream}", None
        dataset = (resource.get("parameters") or {}).get("dataset", "/entry/data/data")
        if not os.path.exists(os.path.dirname(path) or "."):
            return tiled, f"tiled {uid}/{stream}", None
        h5 = self._h5

        def load() -> np.ndarray:
            try:
                return h5.read(path, dataset, index)
            except (OSError, TimeoutError):
                if not os.path.exists(path):
                    return tiled()
                raise

        return load, f"{path}:{dataset}[{index}]", path

    def release(self, paths: set[str] | list[str]) -> None:
        """Close the read handles of files no run needs any more (never raises)."""
        with self._lock:
            for p in paths:
                self._h5.close(p)

    def close(self) -> None:
        with self._lock:
            self._h5.close()
