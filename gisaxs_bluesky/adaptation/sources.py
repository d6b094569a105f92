"""Where the adaptation frames come from: detector files, or runs in a Tiled / databroker catalog.

Every source yields :class:`SourceFrame` (the frame, where it came from, its geometry, its
mask, its repeat group) and describes itself for the adapted checkpoint's card. A repeat
group names frames that are repeated measurements of one sample (``group_by``: a multi-frame
file, a folder, a run, a start-document key such as ``sample``): the binner's within-identity
spread is calibrated on them, beside the split halves of each frame. Geometry, in this order: the
``geometry`` argument; what the source says (CBF / EDF headers, NeXus instrument fields, a
``geometry`` dict in a run's start document); else the string ``"unknown"`` (recorded as such;
``require_geometry=True`` makes it an error instead).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import replay
from ..runtime import DEFAULT_ROOT
from .detector_files import _expand, read_detector_file
from .errors import AdaptationError

__all__ = [
    "SourceFrame",
    "FrameSource",
    "ArraySource",
    "FileSource",
    "RunSource",
    "collect_frames",
    "iter_frames",
]

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


@dataclass
class SourceFrame:
    """One frame of the adaptation set."""

    frame: np.ndarray  # (H, W), as the detector wrote it
    source: str  # "file:/path[#index]" or "run:<uid>#<seq_num>"
    geometry: dict | str = UNKNOWN  # a dict of what is known, or "unknown"
    mask: np.ndarray | None = field(default=None, repr=False)  # True = not data
    #: frames with the same group are repeated measurements of one sample (calibration);
    #: None: the frame stands alone
    group: str | None = None


class FrameSource(Protocol):
    """Anything that yields adaptation frames and says what it read."""

    def __iter__(self) -> Iterator[SourceFrame]: ...

    def describe(self) -> dict: ...


def _geometry_dict(geometry: Any) -> dict | None:
    if geometry is None or geometry == UNKNOWN:
        return None
    if isinstance(geometry, Mapping):
        return dict(geometry)
    if dataclasses.is_dataclass(geometry):  # e.g. gisaxs_bluesky.sim.Geometry
        return {"type": type(geometry).__name__, **dataclasses.asdict(geometry)}
    raise AdaptationError(f"geometry {geometry!r}: expected a dict, a geometry dataclass or None")


def _check_geometry(geometry: dict | None, where: str, require: bool) -> dict | str:
    if geometry:
        return geometry
    if require:
        raise AdaptationError(
            f"{where}: no geometry (distance, wavelength, beam centre): pass geometry=... "
            "(--geometry), or adapt with require_geometry=False to record it as 'unknown'"
        )
    return UNKNOWN


class FileSource:
    """Frames from detector files and folders of them (``*mask*`` files are detector masks,
    non-zero = not data, applied to frames of their shape)."""

    def __init__(self, paths: str | Path | Sequence[str | Path], *, mask: np.ndarray | None = None,
                 geometry: Any = None, require_geometry: bool = False,
                 recursive: bool = False, group_by: str = "frame") -> None:
        if group_by not in ("frame", "file", "folder"):
            raise AdaptationError(f"group_by={group_by!r}: files group by frame, file or folder")
        self.group_by = group_by
        if isinstance(paths, str | Path):
            paths = [paths]
        self.files, mask_files = _expand(paths, recursive)
        self.masks: dict[tuple[int, ...], tuple[np.ndarray, str]] = {}
        for mf in mask_files:
            frames, _ = read_detector_file(mf)
            self.masks[frames[0].shape] = (np.asarray(frames[0]) != 0, str(mf))
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        self.geometry = _geometry_dict(geometry)
        self.require_geometry = require_geometry
        self.read: list[dict] = []

    def __iter__(self) -> Iterator[SourceFrame]:
        self.read = []
        for path in self.files:
            frames, header_geometry = read_detector_file(path)
            geometry = _check_geometry(self.geometry or header_geometry, str(path),
                                       self.require_geometry)
            mask_name = None
            for i, frame in enumerate(frames):
                mask = self.mask
                if mask is None and frame.shape in self.masks:
                    mask, mask_name = self.masks[frame.shape]
                if mask is not None and mask.shape != frame.shape:
                    raise AdaptationError(
                        f"mask shape {mask.shape} does not match {path} frame shape {frame.shape}")
                suffix = f"#{i}" if len(frames) > 1 else ""
                group = {"frame": None, "file": str(path), "folder": str(path.parent)}
                yield SourceFrame(frame, f"file:{path}{suffix}", geometry, mask,
                                  group[self.group_by])
            self.read.append({"path": str(path), "frames": len(frames), "mask": mask_name,
                              "geometry": geometry, "bytes": path.stat().st_size})

    def describe(self) -> dict:
        return {"kind": "files", "files": self.read or [{"path": str(p)} for p in self.files]}


class ArraySource:
    """Frames already in memory (a notebook, a benchmark): ``frames`` (N, H, W) or a list,
    named ``<label>#<i>``."""

    def __init__(self, frames: Sequence[np.ndarray] | np.ndarray, *, label: str = "array",
                 mask: np.ndarray | None = None, geometry: Any = None,
                 require_geometry: bool = False, repeats: bool = False) -> None:
        self.frames = list(frames)
        self.repeats = repeats  # True: all frames are repeated measurements of one sample
        self.label = label
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        self.geometry = _check_geometry(_geometry_dict(geometry), label, require_geometry)

    def __iter__(self) -> Iterator[SourceFrame]:
        for i, frame in enumerate(self.frames):
            yield SourceFrame(np.asarray(frame), f"{self.label}#{i}", self.geometry, self.mask,
                              self.label if self.repeats else None)

    def describe(self) -> dict:
        return {"kind": "arrays", "label": self.label, "frames": len(self.frames),
                "geometry": self.geometry, "repeats": self.repeats}


# ------------------------------------------------------------------------------------- runs
class RunSource:
    """Frames of Bluesky runs in a catalog: a Tiled server written by ``TiledWriter`` (frames
    from the array nodes), or a databroker 2 catalog (e.g. MongoDB behind Tiled: frames from
    the run's documents). Runs by uid and/or Tiled queries (:func:`gisaxs_bluesky.replay.
    build_queries`); the selection and the frame reading are the replay's own.
    """

    def __init__(self, catalog: Any, uids: Sequence[str] = (), queries: Sequence[Any] = (), *,
                 stream: str = "primary", image_key: str | None = None, method: str = "auto",
                 limit: int | None = None, max_frames_per_run: int | None = None,
                 mask: np.ndarray | None = None, geometry: Any = None,
                 require_geometry: bool = False, root: str = DEFAULT_ROOT,
                 group_by: str = "frame") -> None:
        self.group_by = group_by  # "frame", "run", or a start-document key (e.g. "sample")
        self.catalog = catalog
        self.uids = replay.select_runs(catalog, *queries, uids=list(uids), root=root, limit=limit)
        self.options = replay.ReplayOptions(stream=stream, image_key=image_key, method=method)
        self.max_frames_per_run = max_frames_per_run
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        self.geometry = _geometry_dict(geometry)
        self.require_geometry = require_geometry
        self.read: list[dict] = []

    def __iter__(self) -> Iterator[SourceFrame]:
        self.read = []
        for uid in self.uids:
            try:
                src = replay.open_source(self.catalog, uid, self.options)
            except KeyError as exc:
                raise AdaptationError(f"run {uid!r} is not in the catalog") from exc
            except replay.ReplayError as exc:
                raise AdaptationError(str(exc)) from exc
            start = getattr(src, "start", {}) or {}
            geometry = _check_geometry(self.geometry or _geometry_dict(start.get("geometry")),
                                       f"run {uid}", self.require_geometry)
            errors: list[str] = []
            n = 0
            group = None
            if self.group_by == "run":
                group = uid
            elif self.group_by != "frame":
                value = start.get(self.group_by)
                group = None if value is None else f"{self.group_by}={value}"
            for chunk in src.chunks(set(), 16, errors):
                for seq, frame in zip(chunk.seq, chunk.frames, strict=True):
                    if frame is None:
                        continue
                    frame = np.asarray(frame)
                    if frame.ndim == 3 and frame.shape[0] == 1:
                        frame = frame[0]
                    yield SourceFrame(frame, f"run:{uid}#{int(seq)}", geometry, self.mask, group)
                    n += 1
                    if self.max_frames_per_run and n >= self.max_frames_per_run:
                        break
                if self.max_frames_per_run and n >= self.max_frames_per_run:
                    break
            for e in errors:
                log.warning("adaptation source: %s", e)
            self.read.append({"uid": uid, "scan_id": start.get("scan_id"), "frames": n,
                              "stream": self.options.stream, "image_key": src.image_key,
                              "geometry": geometry, "errors": errors[:10]})

    def describe(self) -> dict:
        return {"kind": "runs", "runs": self.read or [{"uid": u} for u in self.uids]}


def iter_frames(sources: Iterable[FrameSource], *, max_frames: int | None = None
                ) -> Iterator[SourceFrame]:
    """Every frame of ``sources`` in order (up to ``max_frames``), one at a time; a set without
    any frame raises AdaptationError once the sources are exhausted."""
    sources = list(sources)
    n = 0
    for source in sources:
        for item in source:
            if np.asarray(item.frame).ndim != 2:
                raise AdaptationError(f"{item.source}: frame of shape {np.shape(item.frame)} "
                                      "is not 2-D")
            yield item
            n += 1
            if max_frames and n >= max_frames:
                return
    if not n:
        named = [s.describe() for s in sources]
        raise AdaptationError(f"the adaptation set is empty: no frames in {named or 'no sources'}"
                              " (give detector files, a folder of them, or runs with a 2-D "
                              "image field)")


def collect_frames(sources: Iterable[FrameSource], *, max_frames: int | None = None
                   ) -> list[SourceFrame]:
    """:func:`iter_frames` as a list."""
    return list(iter_frames(sources, max_frames=max_frames))
