"""What a frame source hands on per frame, and the small helpers every source shares."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FrameRef", "as_float", "find_image_key", "image_shape", "scanned_motors"]


@dataclass
class FrameRef:
    """One frame of a run: its pixels (``data``, a private copy) or a ``loader`` for them.

    ``metadata`` is the per-frame record: ``stream``, ``image_key``, ``descriptor`` and
    ``geometry`` (what :class:`~gisaxs_bluesky.frames.FrameGeometry` resolved for this frame:
    a ``ResolvedGeometry``, or a ``GeometryUnavailable`` saying why; None: no resolver).
    ``error`` set: the frame cannot be had (the reason names it); it still gets a row.
    """

    run_uid: str
    seq_num: int
    time: float
    positions: dict[str, float]
    data: np.ndarray | None = None
    loader: Callable[[], np.ndarray] | None = None
    source: str = "event data"
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def in_memory(self) -> bool:
        """Whether the pixels are held here (inline frames) rather than read when needed."""
        return self.data is not None

    def load(self) -> np.ndarray:
        """The frame's pixels (reads them through the loader; raises what the read raised)."""
        if self.error is not None:
            raise ValueError(self.error)
        if self.data is not None:
            return self.data
        if self.loader is None:
            raise ValueError(f"frame seq_num={self.seq_num}: no frame data")
        return self.loader()


def image_shape(data_key: Mapping[str, Any]) -> tuple[int, int] | None:
    """(H, W) of a 2-D image data key (``[H, W]`` or ``[1, H, W]``); None if not 2-D or if a
    dimension is unknown (None, or <= 0 as some detectors declare a variable size)."""
    raw = data_key.get("shape") or []
    try:
        shape = [None if s is None else int(s) for s in raw]
    except (TypeError, ValueError):
        return None
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or any(s is None or s <= 0 for s in shape):
        return None
    return shape[0], shape[1]


def _is_image(data_key: Mapping[str, Any]) -> bool:
    raw = list(data_key.get("shape") or [])
    if len(raw) == 3 and raw[0] in (1, -1, None):
        raw = raw[1:]
    return len(raw) == 2


def find_image_key(data_keys: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The data key holding a 2-D image (shape [H, W] or [1, H, W]); the largest if several
    (a key whose size is declared unknown, e.g. [-1, -1], counts as an image of size 0)."""
    best, best_size = None, -1
    for key, dk in data_keys.items():
        if not isinstance(dk, Mapping) or not _is_image(dk):
            continue
        shape = image_shape(dk)
        size = shape[0] * shape[1] if shape else 0
        if size > best_size:
            best, best_size = key, size
    return best


def scanned_motors(start: Mapping[str, Any]) -> list[str]:
    """Motor names from the start document: ``motors``, else ``hints.dimensions`` fields."""
    motors = [str(m) for m in (start.get("motors") or [])]
    if not motors:
        for fields, _stream in (start.get("hints") or {}).get("dimensions") or []:
            motors += [str(f) for f in fields if f != "time"]
    return list(dict.fromkeys(motors))


def as_float(value: Any) -> float:
    """A position reading as float (NaN when missing or not a number)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
