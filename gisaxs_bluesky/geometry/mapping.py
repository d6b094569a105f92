"""The ``gisaxs_geometry`` keys and a mapping of them -> the fields of an InstrumentGeometry.

:data:`START_KEYS` documents what a start document's ``gisaxs_geometry`` (or an explicit
mapping, or a fallback) may hold; :func:`mapping_fields` turns a complete one into the
record's fields (``InstrumentGeometry.from_dict``). Units tables shared with the descriptor
readings are here too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .detectors import HC_KEV_NM, GeometryError, detector_spec

__all__ = ["START_KEY", "START_KEYS", "mapping_fields", "record_kwargs"]

#: the start-document key that holds the geometry mapping
START_KEY = "gisaxs_geometry"

#: keys a ``gisaxs_geometry`` mapping may hold (record fields plus how to find the rest)
START_KEYS: dict[str, str] = {
    "poni": "pyFAI PONI calibration: a path, the file's text, or its dict",
    "detector": "detector model, one of geometry.DETECTORS (gives shape, pixel size, gaps)",
    "detector_shape": "[rows, cols] of the frame",
    "pixel_size_mm": "pixel size in mm, one number or [row, col]",
    "distance_mm": "sample to direct-beam point on the detector, mm",
    "wavelength_nm": "X-ray wavelength, nm (or energy_kev)",
    "energy_kev": "photon energy, keV (or wavelength_nm)",
    "beam_center_px": "[row, col] where the direct beam hits the detector (row 0 at the top)",
    "incidence_deg": "incidence angle of a run that does not move it, degrees",
    "incidence_key": "data key of the incidence motor read in every event (a theta scan)",
    "incidence_units": "units of that reading when its descriptor has none: deg, mrad, rad",
    "incidence_offset_deg": "added to the motor reading (motor zero vs surface), degrees",
    "tilt_deg": "detector tilt (Fit2D convention), degrees",
    "tilt_plane_deg": "rotation of the tilt plane (Fit2D convention), degrees",
    "polarization_factor": "pyFAI polarisation factor in [-1, 1]",
    "beamstop_radius_px": "radius of a round beamstop around the direct beam, pixels",
    "detector_key": "data key of the frames (its descriptor shape gives detector_shape)",
    "configuration_keys": "{'energy'|'wavelength'|'distance': configuration key} to read",
}

_FIELDS = (
    "detector", "detector_shape", "pixel_size_mm", "distance_mm", "wavelength_nm",
    "beam_center_px", "incidence_deg", "tilt_deg", "tilt_plane_deg", "polarization_factor",
    "beamstop_radius_px",
)
# fields with a stated default: no tilt, no polarisation correction, no round beamstop
_OPTIONAL = {"detector": None, "tilt_deg": 0.0, "tilt_plane_deg": 0.0,
             "polarization_factor": None, "beamstop_radius_px": 0.0}

#: what InstrumentGeometry takes: the fields above (``detector_shape`` as ``shape``), ``extra``
_RECORD_KEYS = {*_FIELDS, "shape", "extra"}

_WHERE = {
    "detector_shape": "explicit detector_shape, a PONI file, gisaxs_geometry.detector(_shape) "
                      "or the frame's shape in the descriptor",
    "pixel_size_mm": "explicit pixel_size_mm, a PONI file or gisaxs_geometry.detector / "
                     "pixel_size_mm",
    "distance_mm": "explicit distance_mm, a PONI file, gisaxs_geometry.distance_mm or a "
                   "detector-distance configuration reading",
    "wavelength_nm": "explicit wavelength_nm / energy_kev, a PONI file, "
                     "gisaxs_geometry.wavelength_nm / energy_kev or an energy configuration "
                     "reading",
    "beam_center_px": "explicit beam_center_px, a PONI file or gisaxs_geometry.beam_center_px",
    "incidence_deg": "explicit incidence_deg, gisaxs_geometry.incidence_deg or an incidence "
                     "motor named by gisaxs_geometry.incidence_key",
}
_UNITS = {
    "energy": {"kev": 1.0, "ev": 1e-3},
    "wavelength": {"nm": 1.0, "a": 0.1, "å": 0.1, "angstrom": 0.1, "m": 1e9},
    "distance": {"mm": 1.0, "m": 1e3, "cm": 10.0, "um": 1e-3},
    "angle": {"deg": 1.0, "degree": 1.0, "degrees": 1.0, "°": 1.0, "mrad": 0.18 / math.pi,
              "rad": 180 / math.pi, "urad": 1.8e-4 / math.pi},
}


def units_factor(kind: str, units: str | None, key: str) -> float:
    table = _UNITS[kind]
    if units is None or str(units).strip().lower() not in table:
        raise GeometryError(
            f"{key}: units {units!r} are not a known {kind} unit ({sorted(table)})"
        )
    return table[str(units).strip().lower()]


def mapping_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """The record's fields (InstrumentGeometry keyword arguments) from a complete mapping
    (``to_dict`` output or hand-written)."""
    merged = _normalise(d, "geometry")
    missing = [f for f in _FIELDS if f not in merged and f not in _OPTIONAL]
    if missing:
        raise GeometryError(f"geometry: missing {', '.join(missing)}")
    return record_kwargs(merged)


def _normalise(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Record fields from a mapping of START_KEYS-style values (unknown keys are an error)."""
    known = set(START_KEYS) | set(_FIELDS) | {"shape", "extra"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise GeometryError(f"{where}: unknown key(s) {unknown}; known: {sorted(START_KEYS)}")
    out: dict[str, Any] = {}
    for key in _FIELDS:
        if key in d and d[key] is not None:
            out[key] = d[key]
    if "shape" in d and "detector_shape" not in out:
        out["detector_shape"] = d["shape"]
    if "energy_kev" in d and d["energy_kev"] is not None:
        try:
            energy = float(d["energy_kev"])
        except (TypeError, ValueError):
            raise GeometryError(
                f"{where}.energy_kev={d['energy_kev']!r} must be a number") from None
        if not math.isfinite(energy) or energy <= 0:
            raise GeometryError(f"{where}.energy_kev={energy} must be a finite number > 0")
        wavelength = HC_KEV_NM / energy
        if "wavelength_nm" in out and abs(float(out["wavelength_nm"]) / wavelength - 1) > 1e-3:
            raise GeometryError(
                f"{where}: wavelength_nm={out['wavelength_nm']} and energy_kev={energy} disagree"
            )
        out["wavelength_nm"] = wavelength
    if "detector" in out:
        spec = detector_spec(str(out["detector"]))
        out["detector"] = spec.name
    return out


def record_kwargs(merged: Mapping[str, Any]) -> dict[str, Any]:
    """InstrumentGeometry keyword arguments from merged fields: the stated defaults, a named
    detector's shape and pixel size, ``detector_shape`` as ``shape``; other keys dropped."""
    values = dict(_OPTIONAL)
    values.update(merged)
    if values.get("detector") is not None:
        spec = detector_spec(values["detector"])
        values.setdefault("detector_shape", spec.shape)
        values.setdefault("pixel_size_mm", spec.pixel_size_mm)
    return {("shape" if k == "detector_shape" else k): v for k, v in values.items()
            if k in _RECORD_KEYS}


def _drop(d: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def check_mapping(d: Mapping[str, Any], where: str) -> None:
    """Raise :class:`GeometryError` naming an unknown key (or a bad energy / detector) of a
    partial ``gisaxs_geometry``-style mapping, before any frame needs it."""
    _normalise(_drop(d, "poni"), where)
