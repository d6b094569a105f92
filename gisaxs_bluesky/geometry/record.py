"""The instrument-geometry record that travels with every frame, and its pyFAI counterpart.

Conventions (the same as ``gisaxs_bluesky.sim.Geometry``): arrays are stored with row 0 at the
top of the detector, "up" (away from the sample surface) is towards smaller rows and +q_y
towards larger columns. Pixel centres sit at integer (row, column) indices.
``beam_center_px`` is where the direct (unreflected) beam would hit the detector and
``distance_mm`` the sample distance to that point (Fit2D's "direct beam distance"), so a tilted
detector is described by ``tilt_deg`` and ``tilt_plane_deg`` exactly as Fit2D and pyFAI's
``setFit2D`` describe it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .detectors import DETECTORS, HC_KEV_NM, DetectorSpec, GeometryError, detector_spec
from .mapping import mapping_fields

__all__ = ["InstrumentGeometry", "geometry_from_mapping", "geometry_from_poni"]


def _positive(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise GeometryError(f"{name}={value!r} must be a number") from None
    if not math.isfinite(value) or value <= 0:
        raise GeometryError(f"{name}={value} must be a finite number > 0")
    return value


def _pair(name: str, value: Any) -> tuple[float, float]:
    if np.isscalar(value):
        value = (value, value)
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise GeometryError(f"{name}={value!r} must be two numbers") from None
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
        raise GeometryError(f"{name}={value!r} must be two finite numbers")
    return pair


@dataclass(frozen=True)
class InstrumentGeometry:
    """Where the detector is and what the beam is, for one frame.

    Everything needed to turn pixels into exit angles and (q_par, q_z): detector layout and
    pixel size, ``distance_mm`` to the direct-beam point, ``wavelength_nm``, the direct-beam
    position ``beam_center_px`` (row, col), the incidence angle, the detector tilt (Fit2D
    convention, degrees) and the polarisation factor (pyFAI convention; None: no correction).
    """

    shape: tuple[int, int]
    pixel_size_mm: tuple[float, float]
    distance_mm: float
    wavelength_nm: float
    beam_center_px: tuple[float, float]
    incidence_deg: float
    tilt_deg: float = 0.0
    tilt_plane_deg: float = 0.0
    polarization_factor: float | None = None
    detector: str | None = None
    beamstop_radius_px: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        shape = self.shape
        if (
            len(shape) != 2
            or any(int(s) != s or s <= 0 for s in shape)
        ):
            raise GeometryError(f"detector_shape={shape!r} must be two positive integers")
        object.__setattr__(self, "shape", (int(shape[0]), int(shape[1])))
        pixel = _pair("pixel_size_mm", self.pixel_size_mm)
        for v in pixel:
            _positive("pixel_size_mm", v)
        object.__setattr__(self, "pixel_size_mm", pixel)
        object.__setattr__(self, "distance_mm", _positive("distance_mm", self.distance_mm))
        object.__setattr__(self, "wavelength_nm", _positive("wavelength_nm", self.wavelength_nm))
        object.__setattr__(self, "incidence_deg", _positive("incidence_deg", self.incidence_deg))
        if self.incidence_deg >= 10:
            raise GeometryError(
                f"incidence_deg={self.incidence_deg} is not a grazing angle (must be < 10)"
            )
        object.__setattr__(self, "beam_center_px", _pair("beam_center_px", self.beam_center_px))
        for name in ("tilt_deg", "tilt_plane_deg", "beamstop_radius_px"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise GeometryError(f"{name}={value!r} must be a finite number")
        if abs(self.tilt_deg) >= 45:
            raise GeometryError(f"tilt_deg={self.tilt_deg} must be within (-45, 45)")
        if self.beamstop_radius_px < 0:
            raise GeometryError(f"beamstop_radius_px={self.beamstop_radius_px} must be >= 0")
        pol = self.polarization_factor
        if pol is not None and (not isinstance(pol, int | float) or not -1 <= pol <= 1):
            raise GeometryError(f"polarization_factor={pol!r} must be in [-1, 1] or None")
        if self.detector is not None:
            spec = detector_spec(self.detector)
            if spec.shape != self.shape:
                raise GeometryError(
                    f"detector_shape={self.shape} does not match detector {spec.name!r} "
                    f"({spec.shape})"
                )

    # -- derived values -------------------------------------------------------------------
    @property
    def energy_kev(self) -> float:
        return HC_KEV_NM / self.wavelength_nm

    @property
    def k_nm(self) -> float:
        """Wave number 2 pi / lambda in 1/nm."""
        return 2 * math.pi / self.wavelength_nm

    @property
    def detector_spec(self) -> DetectorSpec | None:
        return None if self.detector is None else detector_spec(self.detector)

    def key(self) -> tuple:
        """Hashable identity of everything that decides the pixel -> q map."""
        return (
            self.shape, self.pixel_size_mm, round(self.distance_mm, 6),
            round(self.wavelength_nm, 9), tuple(round(v, 4) for v in self.beam_center_px),
            round(self.incidence_deg, 6), round(self.tilt_deg, 6), round(self.tilt_plane_deg, 6),
            self.polarization_factor, self.detector, round(self.beamstop_radius_px, 3),
        )

    def with_incidence(self, incidence_deg: float) -> InstrumentGeometry:
        return replace(self, incidence_deg=incidence_deg)

    def horizon_row(self, col: float | None = None) -> float:
        """Row of the sample horizon (exit angle 0) on the column of the beam (untilted)."""
        p = self.pixel_size_mm[0]
        return self.beam_center_px[0] - self.distance_mm * math.tan(
            math.radians(self.incidence_deg)) / p

    def inactive_mask(self) -> np.ndarray:
        """True on pixels without sensor (module gaps, outside a CCD's active disc)."""
        spec = self.detector_spec
        return np.zeros(self.shape, dtype=bool) if spec is None else spec.inactive_mask()

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, the keys a start document's ``gisaxs_geometry`` may hold."""
        d = asdict(self)
        d["detector_shape"] = list(d.pop("shape"))
        d["pixel_size_mm"] = list(self.pixel_size_mm)
        d["beam_center_px"] = list(self.beam_center_px)
        d["energy_kev"] = self.energy_kev
        extra = d.pop("extra")
        if extra:
            d["extra"] = dict(extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InstrumentGeometry:
        """A record from a complete mapping of fields (``to_dict`` output or hand-written)."""
        return cls(**mapping_fields(d))

    # -- pyFAI ----------------------------------------------------------------------------
    def pyfai_geometry(self):
        """A pyFAI ``FiberIntegrator`` at this geometry (incidence and orientation not set)."""
        return _pyfai(self.shape, self.pixel_size_mm, self.distance_mm, self.wavelength_nm,
                      self.beam_center_px, self.tilt_deg, self.tilt_plane_deg)


@lru_cache(maxsize=32)
def _pyfai(shape, pixel_size_mm, distance_mm, wavelength_nm, beam_center_px, tilt, tilt_plane):
    from pyFAI.detectors import Detector
    from pyFAI.integrator.fiber import FiberIntegrator

    detector = Detector(pixel1=pixel_size_mm[0] * 1e-3, pixel2=pixel_size_mm[1] * 1e-3,
                        max_shape=shape)
    fi = FiberIntegrator(detector=detector, wavelength=wavelength_nm * 1e-9)
    # Fit2D pixel coordinates put pixel i's centre at i + 0.5
    fi.setFit2D(distance_mm, beam_center_px[1] + 0.5, beam_center_px[0] + 0.5, tilt=tilt,
                tiltPlanRotation=tilt_plane, pixelX=pixel_size_mm[1] * 1e3,
                pixelY=pixel_size_mm[0] * 1e3, wavelength=wavelength_nm * 10)
    return fi


def geometry_from_mapping(d: Mapping[str, Any]) -> InstrumentGeometry:
    """A record from a complete mapping of fields (``to_dict`` output or hand-written)."""
    return InstrumentGeometry.from_dict(d)


def geometry_from_poni(
    poni: str | Path | Mapping[str, Any], *, incidence_deg: float | None = None, **overrides: Any
) -> dict[str, Any]:
    """Geometry fields of a pyFAI PONI calibration (a file path, its text or its dict).

    Returns a dict of record fields (no incidence: a PONI file does not hold it) so that a
    caller can merge it with other sources; :class:`InstrumentGeometry` (``**fields``)
    builds the record.
    """
    from pyFAI.geometry import Geometry
    from pyFAI.io.ponifile import PoniFile

    try:
        if isinstance(poni, Mapping):
            pf = PoniFile(dict(poni))
        else:
            text = str(poni)
            if "\n" not in text and not Path(text).is_file():
                raise GeometryError(f"poni={text!r}: no such file")
            pf = PoniFile(text)
    except GeometryError:
        raise
    except Exception as exc:  # pyFAI raises bare exceptions on malformed files
        raise GeometryError(f"poni={str(poni)[:200]!r} could not be read: {exc}") from exc
    if pf.wavelength is None or pf.dist is None or pf.detector is None:
        raise GeometryError(f"poni={str(poni)[:200]!r} lacks wavelength, distance or detector")
    geo = Geometry(dist=pf.dist, poni1=pf.poni1, poni2=pf.poni2, rot1=pf.rot1, rot2=pf.rot2,
                   rot3=pf.rot3, detector=pf.detector, wavelength=pf.wavelength)
    fit2d = geo.getFit2D()
    detector = pf.detector
    shape = detector.max_shape
    if shape is None:
        raise GeometryError(f"poni={str(poni)[:200]!r}: detector has no shape (max_shape)")
    fields: dict[str, Any] = {
        "detector_shape": [int(shape[0]), int(shape[1])],
        "pixel_size_mm": [detector.pixel1 * 1e3, detector.pixel2 * 1e3],
        "distance_mm": fit2d["directDist"],
        "wavelength_nm": pf.wavelength * 1e9,
        "beam_center_px": [fit2d["centerY"] - 0.5, fit2d["centerX"] - 0.5],
        "tilt_deg": fit2d["tilt"],
        "tilt_plane_deg": fit2d["tiltPlanRotation"],
    }
    name = type(detector).__name__
    for spec in DETECTORS.values():
        if spec.pyfai_name and spec.pyfai_name.lower() == name.lower():
            fields["detector"] = spec.name
    if incidence_deg is not None:
        fields["incidence_deg"] = incidence_deg
    fields.update(overrides)
    return fields
