"""Named detector models (pixel layout, inactive pixels, counting or integrating), the geometry
error and the keV <-> nm constant: what the record and the mapping of its keys share."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["DETECTORS", "HC_KEV_NM", "DetectorSpec", "GeometryError", "detector_spec"]

#: hc in keV nm: wavelength_nm = HC_KEV_NM / energy_kev
HC_KEV_NM = 1.239841984


class GeometryError(ValueError):
    """Missing or invalid instrument geometry; the message names the key that was wrong."""


@dataclass(frozen=True)
class DetectorSpec:
    """A detector model: pixel layout, inactive pixels and how it counts.

    ``pyfai_name`` names pyFAI's detector (its module gaps are taken from there);
    ``active_radius_px`` > 0 makes only a centred disc active (CCDs behind a round taper or
    phosphor); ``counting`` is False for integrating detectors (gain and readout noise).
    """

    name: str
    shape: tuple[int, int]
    pixel_size_mm: tuple[float, float]
    pyfai_name: str | None = None
    active_radius_px: float = 0.0
    counting: bool = True

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise GeometryError(f"detector shape={self.shape} must be two positive integers")
        if len(self.pixel_size_mm) != 2 or min(self.pixel_size_mm) <= 0:
            raise GeometryError(f"pixel_size_mm={self.pixel_size_mm} must be two numbers > 0")

    def inactive_mask(self) -> np.ndarray:
        """Boolean (rows, cols), True where the detector has no sensor (gaps, outside the disc)."""
        return _inactive_mask(self).copy()


@lru_cache(maxsize=16)
def _inactive_mask(spec: DetectorSpec) -> np.ndarray:
    mask = np.zeros(spec.shape, dtype=bool)
    if spec.pyfai_name is not None:
        import pyFAI  # heavy (its detector tables): only for a detector with a pyFAI name

        pyfai_mask = pyFAI.detector_factory(spec.pyfai_name).mask
        if pyfai_mask is not None and pyfai_mask.shape == spec.shape:
            mask |= pyfai_mask.astype(bool)
    if spec.active_radius_px > 0:
        rows = np.arange(spec.shape[0])[:, None] - (spec.shape[0] - 1) / 2
        cols = np.arange(spec.shape[1])[None, :] - (spec.shape[1] - 1) / 2
        mask |= rows**2 + cols**2 > spec.active_radius_px**2
    mask.flags.writeable = False
    return mask


_PILATUS_PX = (0.172, 0.172)


_EIGER_PX = (0.075, 0.075)


#: detector models by name (the names a start document's ``detector`` key may use)
DETECTORS: dict[str, DetectorSpec] = {
    spec.name: spec
    for spec in (
        DetectorSpec("Pilatus 300K", (619, 487), _PILATUS_PX, "Pilatus300k"),
        DetectorSpec("Pilatus 1M", (1043, 981), _PILATUS_PX, "Pilatus1M"),
        DetectorSpec("Pilatus 2M", (1679, 1475), _PILATUS_PX, "Pilatus2M"),
        DetectorSpec("Eiger 1M", (1065, 1030), _EIGER_PX, "Eiger1M"),
        DetectorSpec("Eiger 4M", (2167, 2070), _EIGER_PX, "Eiger4M"),
        DetectorSpec("CCD 1024", (1024, 1024), (0.0648, 0.0648), None, 508.0, counting=False),
        DetectorSpec("CCD 2048", (2048, 2048), (0.0324, 0.0324), None, 1016.0, counting=False),
    )
}


def detector_spec(name: str) -> DetectorSpec:
    """The detector model called ``name`` (case and spaces ignored)."""
    wanted = name.replace(" ", "").lower()
    for key, spec in DETECTORS.items():
        if key.replace(" ", "").lower() == wanted or (spec.pyfai_name or "").lower() == wanted:
            return spec
    raise GeometryError(f"detector={name!r} is not one of {sorted(DETECTORS)}")
