"""Where a frame's geometry comes from: explicit argument, PONI, start document, descriptor, event.

Each field of :class:`InstrumentGeometry` is taken from the first source that gives it, in
this order:

1. ``explicit``: an :class:`InstrumentGeometry` (used whole) or a mapping of fields;
2. a pyFAI PONI calibration, named by ``explicit["poni"]`` or by the start document's
   ``gisaxs_geometry["poni"]`` (a path, the file's text or its dict);
3. the start document's ``gisaxs_geometry`` mapping (keys in :data:`START_KEYS`);
4. the descriptor: its ``configuration`` readings of photon energy / wavelength and detector
   distance (with their units), and the frame's ``shape`` in ``data_keys``;
5. the event: the incidence angle read from the motor named by ``incidence_key``, so a theta
   scan changes the geometry frame by frame;
6. ``fallback``: fields the user chose to assume where nothing else gives them.

A field that no source gives, or a value that is not valid, raises :class:`GeometryError`
naming the key; nothing is assumed silently. ``ResolvedGeometry.sources`` says where each
field came from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .record import (
    HC_KEV_NM,
    GeometryError,
    InstrumentGeometry,
    detector_spec,
    geometry_from_poni,
)

__all__ = [
    "START_KEY",
    "START_KEYS",
    "GeometryResolver",
    "ResolvedGeometry",
    "geometry_for_frame",
    "geometry_from_mapping",
]

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

_CONFIG_NAMES = {
    "energy": ("energy", "energy_kev", "energy_ev", "photon_energy", "beam_energy",
               "mono_energy"),
    "wavelength": ("wavelength", "wavelength_nm", "wavelength_a", "lambda"),
    "distance": ("distance", "det_distance", "detector_distance", "sample_detector_distance",
                 "sdd", "distance_mm", "distance_m"),
}
_UNITS = {
    "energy": {"kev": 1.0, "ev": 1e-3},
    "wavelength": {"nm": 1.0, "a": 0.1, "å": 0.1, "angstrom": 0.1, "m": 1e9},
    "distance": {"mm": 1.0, "m": 1e3, "cm": 10.0, "um": 1e-3},
    "angle": {"deg": 1.0, "degree": 1.0, "degrees": 1.0, "°": 1.0, "mrad": 0.18 / math.pi,
              "rad": 180 / math.pi, "urad": 1.8e-4 / math.pi},
}


def _units_factor(kind: str, units: str | None, key: str) -> float:
    table = _UNITS[kind]
    if units is None or str(units).strip().lower() not in table:
        raise GeometryError(
            f"{key}: units {units!r} are not a known {kind} unit ({sorted(table)})"
        )
    return table[str(units).strip().lower()]


def geometry_from_mapping(d: Mapping[str, Any]) -> InstrumentGeometry:
    """A record from a complete mapping of fields (``to_dict`` output or hand-written)."""
    merged = _normalise(d, "geometry")
    missing = [f for f in _FIELDS if f not in merged and f not in _OPTIONAL]
    if missing:
        raise GeometryError(f"geometry: missing {', '.join(missing)}")
    return _build(merged)


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


def _build(merged: Mapping[str, Any]) -> InstrumentGeometry:
    values = dict(_OPTIONAL)
    values.update(merged)
    if values.get("detector") is not None:
        spec = detector_spec(values["detector"])
        values.setdefault("detector_shape", spec.shape)
        values.setdefault("pixel_size_mm", spec.pixel_size_mm)
    names = {f.name for f in fields(InstrumentGeometry)}
    kwargs = {("shape" if k == "detector_shape" else k): v for k, v in values.items()
              if k in names or k == "detector_shape"}
    return InstrumentGeometry(**kwargs)


@dataclass(frozen=True)
class ResolvedGeometry:
    """A frame's geometry and, per field, the source it was taken from."""

    geometry: InstrumentGeometry
    sources: Mapping[str, str]


class GeometryResolver:
    """Resolves the geometry of every frame of one run (static sources read once).

    ``start`` and ``descriptor`` are event-model documents; ``explicit`` and ``fallback`` an
    :class:`InstrumentGeometry` or a mapping of ``gisaxs_geometry`` keys.
    """

    def __init__(
        self,
        start: Mapping[str, Any] | None,
        descriptor: Mapping[str, Any] | None = None,
        explicit: InstrumentGeometry | Mapping[str, Any] | None = None,
        *,
        fallback: InstrumentGeometry | Mapping[str, Any] | None = None,
    ) -> None:
        start = start or {}
        self._whole: InstrumentGeometry | None = None
        if isinstance(explicit, InstrumentGeometry):
            self._whole = explicit
            return
        meta = start.get(START_KEY) or {}
        if not isinstance(meta, Mapping):
            raise GeometryError(f"start document {START_KEY}={meta!r} must be a mapping")
        explicit = dict(explicit or {})
        layers: list[tuple[str, dict[str, Any]]] = []
        layers.append(("explicit", _normalise(_drop(explicit, "poni"), "explicit")))
        poni, poni_where = None, None
        if explicit.get("poni") is not None:
            poni, poni_where = explicit["poni"], "explicit poni"
        elif meta.get("poni") is not None:
            poni, poni_where = meta["poni"], f"start {START_KEY}.poni"
        if poni is not None:
            layers.append((poni_where, _normalise(geometry_from_poni(poni), poni_where)))
        layers.append((f"start {START_KEY}", _normalise(_drop(meta, "poni"), START_KEY)))
        if descriptor is not None:
            layers.append(("descriptor", _from_descriptor(descriptor, meta)))
        if isinstance(fallback, InstrumentGeometry):
            fallback = fallback.to_dict()
        fallback_fields = _normalise(_drop(dict(fallback or {}), "energy_kev"), "fallback")
        merged: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for where, layer in layers:
            for key, value in layer.items():
                if key not in merged:
                    merged[key] = value
                    sources[key] = where
        self._incidence_key = meta.get("incidence_key", explicit.get("incidence_key"))
        if self._incidence_key is not None:
            if "incidence_deg" in merged:
                raise GeometryError(
                    f"incidence: both incidence_deg ({sources['incidence_deg']}) and "
                    f"incidence_key={self._incidence_key!r} are given; keep one"
                )
            self._incidence_factor, self._incidence_offset = _incidence_units(
                self._incidence_key, meta, descriptor)
        self._merged, self._sources = merged, sources
        self._fallback = fallback_fields
        self._static: ResolvedGeometry | None = None
        if self._incidence_key is None:
            self._static = self._resolve(dict(merged), dict(sources))

    @property
    def incidence_key(self) -> str | None:
        """Data key whose per-event reading is the incidence angle (None: static)."""
        return self._incidence_key

    def for_event(self, event_data: Mapping[str, Any] | None = None) -> ResolvedGeometry:
        """The geometry of the frame of one event (``event["data"]``)."""
        if self._whole is not None:
            return ResolvedGeometry(self._whole, {"*": "explicit"})
        if self._static is not None:
            return self._static
        key = self._incidence_key
        merged, sources = dict(self._merged), dict(self._sources)
        if event_data is None or key not in event_data:
            raise GeometryError(
                f"incidence_key={key!r}: the event has no reading of it "
                f"(event data keys: {sorted(event_data or {})})"
            )
        try:
            reading = float(np.asarray(event_data[key]).reshape(-1)[0])
        except (TypeError, ValueError, IndexError):
            raise GeometryError(f"{key}={event_data[key]!r} is not a number") from None
        merged["incidence_deg"] = reading * self._incidence_factor + self._incidence_offset
        sources["incidence_deg"] = f"event {key}"
        return self._resolve(merged, sources)

    def _resolve(self, merged: dict[str, Any], sources: dict[str, str]) -> ResolvedGeometry:
        for key, value in self._fallback.items():
            if key not in merged:
                merged[key] = value
                sources[key] = "fallback"
        if merged.get("detector") is not None:
            spec = detector_spec(merged["detector"])
            for key, value in (("detector_shape", spec.shape), ("pixel_size_mm",
                                                                spec.pixel_size_mm)):
                if key not in merged:
                    merged[key] = value
                    sources[key] = sources["detector"]
        missing = [f for f in _FIELDS if f not in merged and f not in _OPTIONAL]
        if missing:
            raise GeometryError(
                "geometry incomplete: "
                + "; ".join(f"{f} missing (give it as {_WHERE[f]})" for f in missing)
            )
        try:
            geometry = _build(merged)
        except GeometryError as exc:
            raise GeometryError(f"{exc} (sources: {sources})") from None
        return ResolvedGeometry(geometry, sources)


def _drop(d: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _incidence_units(key: str, meta: Mapping[str, Any], descriptor) -> tuple[float, float]:
    units = meta.get("incidence_units")
    if units is None and descriptor is not None:
        units = (descriptor.get("data_keys", {}).get(key) or {}).get("units")
    factor = _units_factor("angle", units, f"incidence_key={key!r}")
    offset = meta.get("incidence_offset_deg", 0.0)
    if not isinstance(offset, int | float) or not math.isfinite(offset):
        raise GeometryError(f"incidence_offset_deg={offset!r} must be a finite number")
    return factor, float(offset)


def _from_descriptor(descriptor: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Energy / wavelength / distance from the configuration, shape from the frame's key."""
    out: dict[str, Any] = {}
    data_keys = descriptor.get("data_keys", {})
    detector_key = meta.get("detector_key")
    if detector_key is not None:
        if detector_key not in data_keys:
            raise GeometryError(
                f"detector_key={detector_key!r} is not a data key of the descriptor "
                f"({sorted(data_keys)})"
            )
        candidates = [detector_key]
    else:
        candidates = [k for k, v in data_keys.items()
                      if len([s for s in (v.get("shape") or []) if s and s > 1]) >= 2]
    if len(candidates) == 1:
        shape = [s for s in data_keys[candidates[0]].get("shape") or [] if s]
        if len(shape) >= 2:
            out["detector_shape"] = [int(shape[-2]), int(shape[-1])]
    readings = _configuration_readings(descriptor)
    chosen = meta.get("configuration_keys") or {}
    if not isinstance(chosen, Mapping) or set(chosen) - set(_CONFIG_NAMES):
        raise GeometryError(
            f"configuration_keys={chosen!r} must map some of {sorted(_CONFIG_NAMES)} to keys"
        )
    found: dict[str, tuple[str, float, str | None]] = {}
    for kind, names in _CONFIG_NAMES.items():
        if kind in chosen:
            if chosen[kind] not in readings:
                raise GeometryError(
                    f"configuration_keys.{kind}={chosen[kind]!r} is not in the descriptor's "
                    f"configuration ({sorted(readings)})"
                )
            matches = [chosen[kind]]
        else:
            matches = [k for k in readings if _matches(k, names)]
        values = {readings[k][0] for k in matches}
        if len(values) > 1:
            raise GeometryError(
                f"descriptor configuration: {kind} is ambiguous, keys {matches} differ; name "
                f"one as {START_KEY}.configuration_keys.{kind}"
            )
        if matches:
            key = matches[0]
            found[kind] = (key, *readings[key])
    if "distance" in found:
        key, value, units = found["distance"]
        out["distance_mm"] = value * _units_factor("distance", _units_of(key, units), key)
    if "wavelength" in found:
        key, value, units = found["wavelength"]
        out["wavelength_nm"] = value * _units_factor("wavelength", _units_of(key, units), key)
    elif "energy" in found:
        key, value, units = found["energy"]
        energy = value * _units_factor("energy", _units_of(key, units), key)
        if not math.isfinite(energy) or energy <= 0:
            raise GeometryError(f"{key}={value} {units}: energy must be > 0")
        out["wavelength_nm"] = HC_KEV_NM / energy
    return out


def _matches(key: str, names: tuple[str, ...]) -> bool:
    k = key.lower()
    return any(k == n or k.endswith("-" + n) or k.endswith("_" + n) for n in names)


def _units_of(key: str, units: str | None) -> str | None:
    """Units from the data key, else from the key's own suffix (``energy_kev``)."""
    if units:
        return units
    suffix = key.lower().rsplit("_", 1)[-1]
    return {"kev": "keV", "ev": "eV", "mm": "mm", "m": "m", "nm": "nm", "a": "A"}.get(suffix)


def _configuration_readings(descriptor: Mapping[str, Any]) -> dict[str, tuple[float, Any]]:
    out: dict[str, tuple[float, Any]] = {}
    for obj in (descriptor.get("configuration") or {}).values():
        data = obj.get("data") or {}
        keys = obj.get("data_keys") or {}
        for key, value in data.items():
            try:
                number = float(np.asarray(value).reshape(-1)[0])
            except (TypeError, ValueError, IndexError):
                continue
            out[key] = (number, (keys.get(key) or {}).get("units"))
    return out


def geometry_for_frame(
    start: Mapping[str, Any] | None,
    descriptor: Mapping[str, Any] | None = None,
    event_data: Mapping[str, Any] | None = None,
    explicit: InstrumentGeometry | Mapping[str, Any] | None = None,
    *,
    fallback: InstrumentGeometry | Mapping[str, Any] | None = None,
) -> InstrumentGeometry:
    """The geometry of one frame (see the module docstring for the order of the sources).

    For many frames of one run build a :class:`GeometryResolver` once and call ``for_event``.
    """
    return GeometryResolver(start, descriptor, explicit, fallback=fallback).for_event(
        event_data).geometry
