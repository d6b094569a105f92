"""Instruments for simulated identities: detectors, wavelengths, distances, beams, beamstops.

Training across instruments draws one set-up per identity (:func:`random_instrument`);
:data:`HELD_OUT` are set-ups that training never draws (two detector models that are not in
the training pool, and a window of wavelength x distance around a P03-like set-up), for
evaluation on instruments the model has not seen.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .geometry import Detector, Geometry
from .sample import Sample

__all__ = [
    "ALL_DETECTORS",
    "HELD_OUT",
    "TRAIN_DETECTORS",
    "REFERENCE_WAVELENGTH_NM",
    "at_wavelength",
    "is_held_out",
    "random_instrument",
    "instrument_ranges",
]

#: every detector model an identity may draw
ALL_DETECTORS = ("Pilatus 300K", "Pilatus 1M", "Pilatus 2M", "Eiger 1M", "Eiger 4M", "CCD 1024",
                 "CCD 2048")
#: training pool: held-out instruments use the other two
TRAIN_DETECTORS = ("Pilatus 300K", "Pilatus 1M", "Pilatus 2M", "Eiger 1M", "CCD 2048")
WAVELENGTH_RANGE_NM = (0.07, 0.16)
DISTANCE_RANGE_MM = (1000.0, 8000.0)
INCIDENCE_RANGE_DEG = (0.05, 0.8)
#: an instrument must reach this |q_par| and q_z above the horizon to be drawn: below it, the
#: features of particles of 3-8 nm radius lie off the detector
MIN_Q_REACH_NM = 0.6
#: the simulator's refractive indices (Sample defaults) are given at this wavelength
REFERENCE_WAVELENGTH_NM = 0.134
# a P03-like window of (wavelength, distance) that training never draws
_P03_WINDOW = ((0.085, 0.105), (2000.0, 2900.0))


def at_wavelength(sample: Sample, wavelength_nm: float) -> Sample:
    """The same sample seen at another wavelength: away from absorption edges delta scales
    with lambda^2 and beta with lambda^4."""
    f = wavelength_nm / REFERENCE_WAVELENGTH_NM
    return replace(sample, delta_substrate=sample.delta_substrate * f**2,
                   beta_substrate=sample.beta_substrate * f**4,
                   delta_particle=sample.delta_particle * f**2,
                   beta_particle=sample.beta_particle * f**4)


def _q_reach(geometry: Geometry) -> tuple[float, float]:
    """(largest |q_par|, largest q_z above the horizon) the detector sees, 1/nm."""
    p = geometry.detector.pixel_size_mm
    r0, c0 = geometry.beam_center_px
    w = geometry.shape[1]
    k = geometry.k_nm
    x = max(c0, w - 1 - c0) * p
    q_par = k * math.sin(math.atan(x / geometry.distance_mm))
    # the top row's exit angle, and q_z = k (sin af + sin ai) there
    af = math.atan(r0 * p / geometry.distance_mm) - math.radians(geometry.incidence_deg)
    q_z = k * (math.sin(max(af, 0.0)) + math.sin(math.radians(geometry.incidence_deg)))
    return q_par, q_z


def is_held_out(geometry: Geometry) -> bool:
    """Whether training would never draw this set-up."""
    (l0, l1), (d0, d1) = _P03_WINDOW
    in_window = l0 <= geometry.wavelength_nm <= l1 and d0 <= geometry.distance_mm <= d1
    return geometry.detector.name not in TRAIN_DETECTORS or in_window


def random_instrument(rng: np.random.Generator, *, detectors: tuple[str, ...] = TRAIN_DETECTORS,
                      exclude_held_out: bool = True, max_tries: int = 200) -> Geometry:
    """One set-up: detector, wavelength, distance (log-uniform), incidence, a direct beam that
    keeps the horizon on the detector, a round or rod beamstop of 1-2.5 mm."""
    for _ in range(max_tries):
        detector = Detector.named(detectors[rng.integers(len(detectors))])
        h, w = detector.shape
        p = detector.pixel_size_mm
        wavelength = float(rng.uniform(*WAVELENGTH_RANGE_NM))
        distance = float(math.exp(rng.uniform(*np.log(DISTANCE_RANGE_MM))))
        incidence = float(rng.uniform(*INCIDENCE_RANGE_DEG))
        # the horizon between a third and 95 % of the way down; the beam below it by
        # L tan(alpha_i) (it may sit below the detector's edge)
        horizon_row = float(rng.uniform(0.35, 0.95)) * h
        if detector.active_radius_px > 0:
            horizon_row = float(rng.uniform(0.5, 0.85)) * h
        beam_row = horizon_row + distance * math.tan(math.radians(incidence)) / p
        beam_col = float(rng.uniform(0.15, 0.85)) * w
        if detector.active_radius_px > 0:
            beam_col = float(rng.uniform(0.35, 0.65)) * w
        stop_mm = float(rng.uniform(1.0, 2.5))
        geometry = Geometry(detector=detector, distance_mm=distance, wavelength_nm=wavelength,
                            incidence_deg=incidence, beam_center_px=(beam_row, beam_col),
                            beamstop_radius_px=stop_mm / p,
                            beamstop_kind="rod" if rng.random() < 0.3 else "round")
        if exclude_held_out and is_held_out(geometry):
            continue
        if min(_q_reach(geometry)) >= MIN_Q_REACH_NM:
            return geometry
    raise RuntimeError(f"no instrument reaching q = {MIN_Q_REACH_NM} 1/nm in {max_tries} draws")


def _held_out() -> dict[str, Geometry]:
    pilatus = Detector.named("Pilatus 1M")
    eiger = Detector.named("Eiger 4M")
    ccd = Detector.named("CCD 1024")
    return {
        # PETRA III P03-like: 13 keV, 2.4 m, direct beam low and right of the centre
        "p03_pilatus1m_2.4m": Geometry(
            detector=pilatus, distance_mm=2400.0, wavelength_nm=0.095, incidence_deg=0.4,
            beam_center_px=(1000.0, 640.0), beamstop_radius_px=9.0),
        # a lab source: Cu K-alpha, 1024^2 CCD with a round active area, rod beamstop
        "lab_ccd1024_cu_1.2m": Geometry(
            detector=ccd, distance_mm=1200.0, wavelength_nm=0.154, incidence_deg=0.3,
            beam_center_px=(820.0, 512.0), beamstop_radius_px=20.0, beamstop_kind="rod"),
        # an Eiger 4M at short distance, 12 keV
        "eiger4m_1.5m": Geometry(
            detector=eiger, distance_mm=1500.0, wavelength_nm=0.1033, incidence_deg=0.2,
            beam_center_px=(1950.0, 1100.0), beamstop_radius_px=25.0),
    }


#: evaluation set-ups that :func:`random_instrument` never draws
HELD_OUT: dict[str, Geometry] = _held_out()


def instrument_ranges() -> dict:
    """What training across instruments covers (for a model card)."""
    (l0, l1), (d0, d1) = _P03_WINDOW
    return {
        "detectors": list(TRAIN_DETECTORS),
        "wavelength_nm": list(WAVELENGTH_RANGE_NM),
        "distance_mm": list(DISTANCE_RANGE_MM),
        "incidence_deg": list(INCIDENCE_RANGE_DEG),
        "min_q_reach_nm": MIN_Q_REACH_NM,
        "excluded_window": {"wavelength_nm": [l0, l1], "distance_mm": [d0, d1]},
        "beamstops": ["round", "rod"],
    }
