"""Detector files as frames: TIFF, CBF, EDF (and their .gz / .bz2) through fabio, HDF5 / NeXus
through h5py, .npy; the geometry their headers give (CBF / EDF keys, NeXus instrument fields)."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import fabio
import h5py
import numpy as np

from .errors import AdaptationError

__all__ = ["FRAME_SUFFIXES", "read_detector_file"]

#: file names read as frames (``.gz`` / ``.bz2`` of the fabio formats too)
FRAME_SUFFIXES = (".tif", ".tiff", ".cbf", ".edf", ".h5", ".hdf5", ".nxs", ".nx5", ".npy")


_COMPRESSED = (".gz", ".bz2")


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
            with h5py.File(path, "r") as f:
                data = _nexus_signal(f)
                if data is None:
                    raise AdaptationError(f"{path}: no dataset of 2 or more dimensions")
                geometry = _nexus_geometry(f)
                arr = np.asarray(data[()])
        elif name.endswith(".npy"):
            arr, geometry = np.load(path), None
        else:
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
