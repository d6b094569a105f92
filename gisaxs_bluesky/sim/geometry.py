"""Detector and scattering geometry: pixel -> (2theta_f, alpha_f) -> (qx, qy, qz)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from ..geometry import DETECTORS, InstrumentGeometry, detector_spec

__all__ = ["Detector", "Geometry", "PILATUS_1M"]


@dataclass(frozen=True)
class Detector:
    """A pixel detector; rows count from the top of the image, as the array is stored."""

    name: str = "Pilatus 1M"
    shape: tuple[int, int] = (1043, 981)
    pixel_size_mm: float = 0.172
    # inclusive (first, last) row / column ranges of the inter-module gaps
    gap_rows: tuple[tuple[int, int], ...] = ((195, 211), (407, 423), (619, 635), (831, 847))
    gap_cols: tuple[tuple[int, int], ...] = ((487, 493),)
    # > 0: only a centred disc of this radius is active (a CCD behind a round taper)
    active_radius_px: float = 0.0
    # False: an integrating detector (CCD): gain and readout noise, no gap flags
    counting: bool = True

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"detector shape {self.shape} must be two positive integers")
        if self.pixel_size_mm <= 0:
            raise ValueError(f"pixel_size_mm={self.pixel_size_mm} must be > 0")
        if self.active_radius_px < 0:
            raise ValueError(f"active_radius_px={self.active_radius_px} must be >= 0")

    @classmethod
    def named(cls, name: str) -> Detector:
        """One of ``gisaxs_bluesky.geometry.DETECTORS`` (module gaps from pyFAI's mask)."""
        spec = detector_spec(name)
        mask = spec.inactive_mask() if spec.active_radius_px == 0 else np.zeros(spec.shape, bool)
        return cls(name=spec.name, shape=spec.shape, pixel_size_mm=spec.pixel_size_mm[0],
                   gap_rows=_runs(np.flatnonzero(mask.all(axis=1))),
                   gap_cols=_runs(np.flatnonzero(mask.all(axis=0))),
                   active_radius_px=spec.active_radius_px, counting=spec.counting)

    def gap_mask(self) -> np.ndarray:
        """Boolean (rows, cols) array, True on inter-module gap pixels and inactive area."""
        mask = np.zeros(self.shape, dtype=bool)
        for r0, r1 in self.gap_rows:
            mask[r0 : r1 + 1, :] = True
        for c0, c1 in self.gap_cols:
            mask[:, c0 : c1 + 1] = True
        if self.active_radius_px > 0:
            rows = np.arange(self.shape[0])[:, None] - (self.shape[0] - 1) / 2
            cols = np.arange(self.shape[1])[None, :] - (self.shape[1] - 1) / 2
            mask |= rows**2 + cols**2 > self.active_radius_px**2
        return mask


def _runs(indices: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Inclusive (first, last) ranges of consecutive indices."""
    runs: list[list[int]] = []
    for i in indices.tolist():
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return tuple((a, b) for a, b in runs)


PILATUS_1M = Detector()


@dataclass(frozen=True)
class Geometry:
    """Sample-detector geometry of a GISAXS set-up.

    ``beam_center_px`` is the (row, column) where the direct (unreflected) beam would hit the
    detector, in array coordinates (row 0 at the top). Defaults follow the GALAXI Pilatus 1M
    measurement shipped as reference data (1730 mm, 0.134 nm, 0.463 deg).
    """

    detector: Detector = field(default_factory=Detector)
    distance_mm: float = 1730.0
    wavelength_nm: float = 0.134
    incidence_deg: float = 0.463
    beam_center_px: tuple[float, float] = (719.6, 597.1)
    beamstop_radius_px: float = 12.0
    # "round": a disc on a holder from below; "rod": a vertical bar from the bottom edge over
    # the direct beam and the specular spot
    beamstop_kind: str = "round"

    def __post_init__(self) -> None:
        if self.beamstop_kind not in ("round", "rod"):
            raise ValueError(f"beamstop_kind={self.beamstop_kind!r} must be 'round' or 'rod'")
        for name in ("distance_mm", "wavelength_nm", "incidence_deg"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value} must be a finite number > 0")
        if self.beamstop_radius_px < 0:
            raise ValueError(f"beamstop_radius_px={self.beamstop_radius_px} must be >= 0")

    @property
    def k_nm(self) -> float:
        """Wave number 2 pi / lambda in 1/nm."""
        return 2 * np.pi / self.wavelength_nm

    @property
    def shape(self) -> tuple[int, int]:
        return self.detector.shape

    def shifted(self, d_row: float = 0.0, d_col: float = 0.0, d_incidence_deg: float = 0.0):
        """The same set-up with the beam moved (used for misalignment)."""
        r, c = self.beam_center_px
        return replace(
            self,
            beam_center_px=(r + d_row, c + d_col),
            incidence_deg=self.incidence_deg + d_incidence_deg,
        )

    def angles(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(2theta_f, alpha_f) in radians at pixel centres given as broadcastable row/col arrays."""
        p = self.detector.pixel_size_mm
        y = (self.beam_center_px[0] - np.asarray(rows, dtype=np.float64)) * p  # up
        x = (np.asarray(cols, dtype=np.float64) - self.beam_center_px[1]) * p
        L = self.distance_mm
        two_theta_f = np.arctan2(x, L)
        # the direct beam travels at -alpha_i below the surface plane
        alpha_f = np.arctan2(y, np.hypot(L, x)) - np.deg2rad(self.incidence_deg)
        return two_theta_f, alpha_f

    def q(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(qx, qy, qz) in 1/nm at the given pixels."""
        tth, af = self.angles(rows, cols)
        ai = np.deg2rad(self.incidence_deg)
        k = self.k_nm
        qx = k * (np.cos(af) * np.cos(tth) - np.cos(ai))
        qy = k * np.cos(af) * np.sin(tth)
        qz = k * (np.sin(af) + np.sin(ai))
        return qx, qy, qz

    @cached_property
    def pixel_grid(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(self.shape[0], dtype=np.float64)[:, None]
        cols = np.arange(self.shape[1], dtype=np.float64)[None, :]
        return rows, cols

    def row_of_alpha_f(self, alpha_f_deg: float) -> float:
        """Detector row (fractional) at exit angle alpha_f on the plane of incidence."""
        a = np.deg2rad(alpha_f_deg + self.incidence_deg)
        return self.beam_center_px[0] - self.distance_mm * np.tan(a) / self.detector.pixel_size_mm

    def col_of_qy(self, qy_nm: float, row: float | None = None) -> float:
        """Detector column (fractional, right of the beam) where q_y = qy_nm on a given row."""
        row = self.beam_center_px[0] if row is None else row
        _, af = self.angles(np.array([row]), np.array([self.beam_center_px[1]]))
        s = qy_nm / (self.k_nm * np.cos(af[0]))
        if abs(s) >= 1:
            raise ValueError(f"qy={qy_nm} 1/nm is beyond the Ewald sphere")
        # invert qy = k cos(alpha_f) sin(2theta_f) with tan(2theta_f) = x / L, as in angles()
        x = self.distance_mm * np.tan(np.arcsin(s))
        return self.beam_center_px[1] + x / self.detector.pixel_size_mm

    def horizon_row(self) -> float:
        return self.row_of_alpha_f(0.0)

    def instrument(self):
        """This set-up as the instrument-geometry record that travels with a frame."""
        spec = DETECTORS.get(self.detector.name)
        known = spec is not None and spec.shape == self.shape
        p = self.detector.pixel_size_mm
        return InstrumentGeometry(
            shape=self.shape, pixel_size_mm=(p, p), distance_mm=self.distance_mm,
            wavelength_nm=self.wavelength_nm, beam_center_px=self.beam_center_px,
            incidence_deg=self.incidence_deg, detector=self.detector.name if known else None,
            beamstop_radius_px=self.beamstop_radius_px,
        )
