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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .descriptor import from_descriptor, incidence_units
from .detectors import GeometryError, detector_spec
from .mapping import (
    _FIELDS,
    _OPTIONAL,
    _WHERE,
    START_KEY,
    START_KEYS,
    _drop,
    _normalise,
    record_kwargs,
)
from .record import InstrumentGeometry, geometry_from_mapping, geometry_from_poni

__all__ = [
    "START_KEY",
    "START_KEYS",
    "GeometryResolver",
    "GeometryUnavailable",
    "ResolvedGeometry",
    "geometry_for_frame",
    "geometry_from_mapping",
]


@dataclass(frozen=True)
class GeometryUnavailable:
    """A frame without a usable geometry, and why (the message names the missing key): what
    the frame layer hands on instead of raising, so a model that needs no geometry goes on."""

    reason: str


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
            layers.append(("descriptor", from_descriptor(descriptor, meta)))
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
            self._incidence_factor, self._incidence_offset = incidence_units(
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
            geometry = InstrumentGeometry(**record_kwargs(merged))
        except GeometryError as exc:
            raise GeometryError(f"{exc} (sources: {sources})") from None
        return ResolvedGeometry(geometry, sources)


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
