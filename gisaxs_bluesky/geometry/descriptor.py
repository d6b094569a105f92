"""Geometry from the descriptor: configuration readings (energy, wavelength, distance), the
frame's shape, and the units of the incidence motor read in every event."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .detectors import HC_KEV_NM, GeometryError
from .mapping import START_KEY, units_factor

__all__ = ["from_descriptor", "incidence_units"]

_CONFIG_NAMES = {
    "energy": ("energy", "energy_kev", "energy_ev", "photon_energy", "beam_energy",
               "mono_energy"),
    "wavelength": ("wavelength", "wavelength_nm", "wavelength_a", "lambda"),
    "distance": ("distance", "det_distance", "detector_distance", "sample_detector_distance",
                 "sdd", "distance_mm", "distance_m"),
}


def incidence_units(key: str, meta: Mapping[str, Any], descriptor) -> tuple[float, float]:
    units = meta.get("incidence_units")
    if units is None and descriptor is not None:
        units = (descriptor.get("data_keys", {}).get(key) or {}).get("units")
    factor = units_factor("angle", units, f"incidence_key={key!r}")
    offset = meta.get("incidence_offset_deg", 0.0)
    if not isinstance(offset, int | float) or not math.isfinite(offset):
        raise GeometryError(f"incidence_offset_deg={offset!r} must be a finite number")
    return factor, float(offset)


def from_descriptor(descriptor: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
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
        out["distance_mm"] = value * units_factor("distance", _units_of(key, units), key)
    if "wavelength" in found:
        key, value, units = found["wavelength"]
        out["wavelength_nm"] = value * units_factor("wavelength", _units_of(key, units), key)
    elif "energy" in found:
        key, value, units = found["energy"]
        energy = value * units_factor("energy", _units_of(key, units), key)
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
