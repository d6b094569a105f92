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

import contextlib
import dataclasses
import io
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "AdaptationError",
    "SourceFrame",
    "FrameSource",
    "ArraySource",
    "FileSource",
    "RunSource",
    "FRAME_SUFFIXES",
    "collect_frames",
    "iter_frames",
    "read_detector_file",
]

log = logging.getLogger(__name__)

#: file names read as frames (``.gz`` / ``.bz2`` of the fabio formats too)
FRAME_SUFFIXES = (".tif", ".tiff", ".cbf", ".edf", ".h5", ".hdf5", ".nxs", ".nx5", ".npy")
_COMPRESSED = (".gz", ".bz2")
UNKNOWN = "unknown"


class AdaptationError(ValueError):
    """Adaptation cannot start or go on: an empty set, an unreadable source, bad input."""


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


# ------------------------------------------------------------------------------------ files
def _is_frame_file(path: Path) -> bool:
    name = path.name.lower()
    for c in _COMPRESSED:
        name = name.removesuffix(c)
    return name.endswith(FRAME_SUFFIXES)


def _expand(paths: Iterable[str | Path], recursive: bool) -> tuple[list[Path], list[Path]]:
    """(frame files, mask files) in the order given, folders sorted; *mask* names are masks."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            files += sorted(q for q in found if q.is_file() and _is_frame_file(q))
        elif p.is_file():
            files.append(p)
        else:
            raise AdaptationError(f"adaptation source {p} does not exist")
    masks = [f for f in files if "mask" in f.name.lower()]
    return [f for f in files if f not in masks], masks


_CBF_KEYS = {
    "wavelength_nm": (r"#\s*Wavelength\s+([-\d.eE+]+)\s*A", 0.1),
    "distance_mm": (r"#\s*Detector_distance\s+([-\d.eE+]+)\s*m", 1000.0),
    "pixel_size_mm": (r"#\s*Pixel_size\s+([-\d.eE+]+)\s*m", 1000.0),
    "incidence_deg": (r"#\s*Alpha\s+([-\d.eE+]+)\s*deg", 1.0),
}


def _header_geometry(header: Mapping[str, Any], shape: tuple[int, ...]) -> dict | None:
    """What a CBF (mini-CBF header lines) or EDF (pyFAI-style keys) header says."""
    out: dict[str, Any] = {}
    text = "\n".join(str(v) for v in header.values())
    for key, (pattern, factor) in _CBF_KEYS.items():
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1)) * factor
    m = re.search(r"#\s*Beam_xy\s+\(\s*([-\d.eE+]+)\s*,\s*([-\d.eE+]+)\s*\)", text)
    if m:  # CBF gives (x, y) = (column, row)
        out["beam_center_px"] = [float(m.group(2)), float(m.group(1))]
    edf = {"SampleDistance": ("distance_mm", 1000.0), "WaveLength": ("wavelength_nm", 1e9),
           "PSize_1": ("pixel_size_mm", 1000.0)}
    for key, (name, factor) in edf.items():
        if key in header:
            with contextlib.suppress(ValueError, TypeError):
                out[name] = float(header[key]) * factor
    if "Center_1" in header and "Center_2" in header:
        with contextlib.suppress(ValueError, TypeError):
            out["beam_center_px"] = [float(header["Center_2"]), float(header["Center_1"])]
    if out:
        out["detector_shape"] = list(shape[-2:])
        out["from"] = "file header"
    return out or None


def _nexus_signal(f) -> Any:
    """The NeXus default signal (NXroot@default -> NXentry@default -> NXdata@signal), else the
    largest dataset of >= 2 dimensions."""
    node = f
    with contextlib.suppress(KeyError, TypeError):
        for _ in range(3):
            default = node.attrs.get("default")
            if default is None:
                break
            node = node[default.decode() if isinstance(default, bytes) else default]
        signal = node.attrs.get("signal")
        if signal is not None:
            data = node[signal.decode() if isinstance(signal, bytes) else signal]
            if getattr(data, "ndim", 0) >= 2:
                return data
    found: list = []
    f.visititems(lambda k, v: found.append(v) if getattr(v, "ndim", 0) >= 2 else None)
    if not found:
        return None
    return max(found, key=lambda d: d.size)


def _nexus_geometry(f) -> dict | None:
    def first(*paths: str) -> tuple[float, str] | None:
        for p in paths:
            if p in f:
                with contextlib.suppress(TypeError, ValueError):
                    ds = f[p]
                    value = float(np.asarray(ds[()]).reshape(-1)[0])
                    units = ds.attrs.get("units", b"")
                    return value, units.decode() if isinstance(units, bytes) else str(units)
        return None

    out: dict[str, Any] = {}
    scale = {"m": 1000.0, "mm": 1.0, "cm": 10.0, "nm": 1.0, "angstrom": 0.1, "A": 0.1,
             "Angstrom": 0.1, "deg": 1.0, "degrees": 1.0}
    for name, paths, default_unit in (
        ("distance_mm", ("entry/instrument/detector/distance",), "mm"),
        ("wavelength_nm", ("entry/instrument/monochromator/wavelength",
                           "entry/instrument/beam/incident_wavelength"), "nm"),
        ("pixel_size_mm", ("entry/instrument/detector/x_pixel_size",), "mm"),
        ("incidence_deg", ("entry/sample/incident_angle", "entry/sample/rotation_angle"), "deg"),
    ):
        hit = first(*paths)
        if hit is not None:
            value, unit = hit
            out[name] = value * scale.get(unit or default_unit, 1.0)
    bx = first("entry/instrument/detector/beam_center_x")
    by = first("entry/instrument/detector/beam_center_y")
    if bx is not None and by is not None:
        out["beam_center_px"] = [by[0], bx[0]]
    if out:
        out["from"] = "NeXus instrument fields"
    return out or None


def read_detector_file(path: str | Path) -> tuple[list[np.ndarray], dict | None]:
    """All frames of one detector file and the geometry its header gives (or None).

    HDF5 / NeXus through h5py (the default NXdata signal, (N, H, W) stacks frame by frame),
    ``.npy`` through numpy, everything else (TIFF, CBF, EDF, their .gz/.bz2, and whatever else
    fabio reads) through fabio. Raises :class:`AdaptationError` naming the file.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".h5", ".hdf5", ".nxs", ".nx5")):
            import h5py

            with h5py.File(path, "r") as f:
                data = _nexus_signal(f)
                if data is None:
                    raise AdaptationError(f"{path}: no dataset of 2 or more dimensions")
                geometry = _nexus_geometry(f)
                arr = np.asarray(data[()])
        elif name.endswith(".npy"):
            arr, geometry = np.load(path), None
        else:
            import fabio

            with contextlib.redirect_stdout(io.StringIO()):  # fabio prints on .gz files
                img = fabio.open(str(path))
                frames = [img.data] + [img.getframe(i).data for i in range(1, img.nframes)]
                geometry = _header_geometry(img.header, img.data.shape)
            arr = np.stack(frames) if len(frames) > 1 else frames[0]
    except AdaptationError:
        raise
    except Exception as exc:  # fabio / h5py / numpy raise many types for bad files
        raise AdaptationError(f"cannot read detector file {path}: {type(exc).__name__}: {exc}"
                              ) from exc
    arr = np.asarray(arr)
    if arr.ndim == 2:
        frames = [arr]
    elif arr.ndim == 3:
        frames = list(arr)
    elif arr.ndim == 4 and arr.shape[1] == 1:
        frames = list(arr[:, 0])
    else:
        raise AdaptationError(f"{path}: data of shape {arr.shape} is not a frame or a stack")
    if not frames or frames[0].size == 0:
        raise AdaptationError(f"{path}: no image data")
    if geometry is not None:
        geometry.setdefault("detector_shape", list(frames[0].shape))
    return frames, geometry


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
                 require_geometry: bool = False, root: str = "gisaxs_derived",
                 group_by: str = "frame") -> None:
        from .. import replay

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
        from .. import replay

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
