"""simulate(): expected intensity, noisy counts, mask and ground-truth labels of one frame."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from . import noise as _noise
from .geometry import Geometry
from .noise import OVERFLOW_COUNTS, NoiseSpec
from .physics import fresnel_r, scattered_intensity
from .sample import Sample

__all__ = ["SimResult", "simulate", "expected_intensity", "nominal_mask"]

_GAP_VALUE = -1
_BEAMSTOP_TRANSMISSION = 1e-4
# halo of the direct beam relative to the brightest diffuse pixel: ~3 % of it at the edge of
# the beamstop, ~0.02 % 50 px out; a beamstop off its place casts its shadow into it
_HALO_RELATIVE = 0.3
_HALO_WIDTH_PX = 8.0
_DIFFUSE_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64


@dataclass(frozen=True)
class SimResult:
    """One simulated frame.

    ``expected``: noise-free expected counts (float32, what the DAE should recover);
    ``counts``: what the detector reports (int32 for photon counting, float32 with readout);
    ``mask``: True where a pixel is not data (gaps, nominal beamstop);
    ``labels``: identity (``sample``) and noise ground truth (``noise``, ``noise_vector``).
    """

    expected: np.ndarray
    counts: np.ndarray
    mask: np.ndarray
    labels: dict

    @property
    def noise_vector(self) -> np.ndarray:
        return self.labels["noise_vector"]


def nominal_mask(geometry: Geometry) -> np.ndarray:
    """Pixels that never hold data: module gaps and the nominal beamstop (a fresh copy)."""
    return _nominal_mask(geometry).copy()


@lru_cache(maxsize=8)
def _nominal_mask(geometry: Geometry) -> np.ndarray:
    mask = geometry.detector.gap_mask()
    if geometry.beamstop_kind == "rod":
        mask |= _rod(geometry, geometry.beam_center_px)
    else:
        mask |= _disc(geometry.shape, geometry.beam_center_px, geometry.beamstop_radius_px)
    return mask


def _rod(geometry: Geometry, centre) -> np.ndarray:
    """A vertical bar beamstop from the bottom edge over the direct beam and the specular spot
    (``centre``: where the direct beam's part of it sits)."""
    r = geometry.beamstop_radius_px
    bar = np.zeros(geometry.shape, dtype=bool)
    if r <= 0:
        return bar
    top = geometry.row_of_alpha_f(geometry.incidence_deg) + (centre[0] - geometry.beam_center_px[0])
    c = centre[1]
    cols = np.arange(geometry.shape[1])
    rows = np.arange(geometry.shape[0])
    bar[(rows >= top - r)[:, None] & (np.abs(cols - c) <= r)[None, :]] = True
    return bar


@lru_cache(maxsize=8)
def _gap_mask(detector) -> np.ndarray:
    return detector.gap_mask()


def _disc(shape, centre, radius) -> np.ndarray:
    r0, c0 = centre
    rows = np.arange(shape[0])[:, None]
    cols = np.arange(shape[1])[None, :]
    return (rows - r0) ** 2 + (cols - c0) ** 2 <= radius**2


def _diffuse(geometry: Geometry, sample: Sample, compute_binning: int, resolution_px: float):
    """Diffuse scattering on the full detector, computed on a coarse grid and interpolated."""
    key = (geometry, sample, compute_binning, resolution_px)
    if key in _DIFFUSE_CACHE:
        _DIFFUSE_CACHE.move_to_end(key)
        return _DIFFUSE_CACHE[key]
    h, w = geometry.shape
    f = compute_binning
    rows = np.arange(0, h + f, f, dtype=np.float64)[:, None]
    cols = np.arange(0, w + f, f, dtype=np.float64)[None, :]
    coarse = scattered_intensity(geometry, sample, rows, cols)
    if resolution_px > 0:
        coarse = ndimage.gaussian_filter(coarse, resolution_px / f, mode="nearest")
    if f > 1:
        # interpolate the log: intensity spans decades and bilinear in log keeps minima sharp
        log_coarse = np.log(np.maximum(coarse, 1e-30)).astype(np.float32)
        rr = (np.arange(h, dtype=np.float32) / f)[:, None]
        cc = (np.arange(w, dtype=np.float32) / f)[None, :]
        r0 = np.minimum(rr.astype(np.int32), log_coarse.shape[0] - 2)
        c0 = np.minimum(cc.astype(np.int32), log_coarse.shape[1] - 2)
        fr, fc = rr - r0, cc - c0
        top = log_coarse[r0, c0] * (1 - fc) + log_coarse[r0, c0 + 1] * fc
        bottom = log_coarse[r0 + 1, c0] * (1 - fc) + log_coarse[r0 + 1, c0 + 1] * fc
        full = np.exp(top * (1 - fr) + bottom * fr)
    else:
        full = coarse[:h, :w].astype(np.float32)
    full = full.astype(np.float32)
    _DIFFUSE_CACHE[key] = full
    if len(_DIFFUSE_CACHE) > _CACHE_SIZE:
        _DIFFUSE_CACHE.popitem(last=False)
    return full


def _add_halo(image: np.ndarray, centre, width_px: float, amplitude: float,
              reach_px: int = 128) -> None:
    """Add amplitude / (1 + (r / width)^2)^2 around ``centre`` (within ``reach_px``), in place."""
    r0, c0 = centre
    h, w = image.shape
    top, bottom = max(int(r0) - reach_px, 0), min(int(r0) + reach_px + 1, h)
    left, right = max(int(c0) - reach_px, 0), min(int(c0) + reach_px + 1, w)
    if top >= bottom or left >= right:
        return
    rows = np.arange(top, bottom, dtype=np.float32)[:, None] - np.float32(r0)
    cols = np.arange(left, right, dtype=np.float32)[None, :] - np.float32(c0)
    q = 1 + (rows**2 + cols**2) / np.float32(width_px**2)
    image[top:bottom, left:right] += (np.float32(amplitude) / (q * q)).astype(np.float32)


def _gaussian_spot(shape, centre, sigma_px, amplitude) -> np.ndarray:
    r0, c0 = centre
    rows = np.arange(shape[0], dtype=np.float32)[:, None]
    cols = np.arange(shape[1], dtype=np.float32)[None, :]
    g_r = np.exp(-0.5 * ((rows - r0) / sigma_px) ** 2)
    g_c = np.exp(-0.5 * ((cols - c0) / sigma_px) ** 2)
    return (amplitude * g_r * g_c).astype(np.float32)


def expected_intensity(
    sample: Sample,
    geometry: Geometry | None = None,
    *,
    dose_counts: float = 10.0,
    compute_binning: int = 1,
    resolution_px: float = 1.0,
    beamstop_offset_px: tuple[float, float] = (0.0, 0.0),
    parasitic: float = 0.0,
    misalignment: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Expected counts per pixel (float32) with specular spot, background and beamstop shadow.

    Scaled so that the median over nominally valid pixels equals ``dose_counts``. The nominal
    geometry decides the beamstop; ``misalignment`` = (d_row, d_col, d_incidence_deg) moves the
    beam, whose direct spot then leaks past the beamstop.
    """
    geometry = geometry or Geometry()
    beam = geometry.shifted(*misalignment) if any(misalignment) else geometry
    diffuse = _diffuse(beam, sample, compute_binning, resolution_px)
    valid = ~_nominal_mask(geometry)
    scale = dose_counts / max(float(np.median(diffuse[valid])), 1e-30)
    image = diffuse * np.float32(scale)
    shape = geometry.shape
    ai = np.deg2rad(beam.incidence_deg)
    r_spec = abs(complex(fresnel_r(np.array(ai), sample.delta_substrate, sample.beta_substrate)))
    spec_row = beam.row_of_alpha_f(beam.incidence_deg)
    peak = float(image[np.isfinite(image)].max())
    image += _gaussian_spot(shape, (spec_row, beam.beam_center_px[1]), 1.5, 50 * peak * r_spec**2)
    # air / window background: small and flat
    image += np.float32(0.02 * dose_counts)
    if parasitic > 0:
        r0, c0 = beam.beam_center_px
        rows = np.arange(shape[0], dtype=np.float32)[:, None]
        cols = np.arange(shape[1], dtype=np.float32)[None, :]
        dist = np.sqrt((rows - r0) ** 2 + (cols - c0) ** 2) + 3
        halo = 300 * dose_counts * parasitic * (10 / dist) ** 2
        streak = 30 * dose_counts * parasitic * np.exp(-0.5 * ((rows - r0) / 2.0) ** 2)
        image += (halo + streak * (10 / np.sqrt(np.abs(cols - c0) + 10))).astype(np.float32)
    # the direct beam: an enormous spot where the (possibly misaligned) beam hits, with the
    # halo of slit and window scattering around it that every real frame shows past the stop
    image += _gaussian_spot(shape, beam.beam_center_px, 2.0, 1e4 * peak)
    _add_halo(image, beam.beam_center_px, _HALO_WIDTH_PX, _HALO_RELATIVE * peak)
    stop_centre = (
        geometry.beam_center_px[0] + beamstop_offset_px[0],
        geometry.beam_center_px[1] + beamstop_offset_px[1],
    )
    if geometry.beamstop_kind == "rod":
        shadow = _rod(geometry, stop_centre)
    else:
        shadow = _disc(shape, stop_centre, geometry.beamstop_radius_px)
    if geometry.beamstop_radius_px > 0 and geometry.beamstop_kind == "round":
        # the holder: a rod from the stop to the bottom edge of the detector
        rod = np.zeros(shape, dtype=bool)
        half = max(geometry.beamstop_radius_px / 3, 1)
        c = int(round(stop_centre[1]))
        rod[int(stop_centre[0]) :, max(c - int(half), 0) : c + int(half) + 1] = True
        shadow |= rod
    image[shadow] *= _BEAMSTOP_TRANSMISSION
    image[_gap_mask(geometry.detector)] = 0.0
    return image


def simulate(
    sample: Sample,
    geometry: Geometry | None = None,
    noise: NoiseSpec | None = None,
    seed: int | np.random.Generator | None = None,
    *,
    compute_binning: int = 1,
    resolution_px: float = 1.0,
) -> SimResult:
    """Simulate one GISAXS frame; the same seed gives the same frame.

    ``compute_binning`` > 1 computes the diffuse scattering on a coarser grid and interpolates
    it (4 is indistinguishable by eye on a Pilatus and ~10x faster); noise is always per pixel.
    """
    geometry = geometry or Geometry()
    noise = noise or NoiseSpec()
    if not isinstance(sample, Sample):
        raise ValueError(f"sample must be a Sample, got {type(sample).__name__}")
    if int(compute_binning) < 1:
        raise ValueError(f"compute_binning={compute_binning} must be an integer >= 1")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sev = noise.severity
    misalignment = (0.0, 0.0, 0.0)
    if noise.has("misalignment"):
        direction = rng.uniform(0, 2 * np.pi)
        shift = geometry.beamstop_radius_px + 6 + 20 * sev("misalignment")
        misalignment = (
            shift * np.sin(direction),
            shift * np.cos(direction),
            float(rng.uniform(-0.05, 0.05) * sev("misalignment")),
        )
    beamstop_offset = (0.0, 0.0)
    if noise.has("beamstop"):
        direction = rng.uniform(0, 2 * np.pi)
        shift = geometry.beamstop_radius_px + 4 + 25 * sev("beamstop")
        beamstop_offset = (shift * np.sin(direction), shift * np.cos(direction))
    expected = expected_intensity(
        sample,
        geometry,
        dose_counts=noise.dose_counts,
        compute_binning=int(compute_binning),
        resolution_px=resolution_px,
        beamstop_offset_px=beamstop_offset,
        parasitic=sev("parasitic"),
        misalignment=misalignment,
    )
    gaps = _gap_mask(geometry.detector)
    if noise.has("poisson"):
        counts = rng.poisson(expected).astype(np.float32)
    else:
        counts = expected.copy()
    if noise.has("readout"):
        gain = 1.0 + rng.uniform(-0.5, 1.0) * sev("readout")
        read_sigma = 0.5 + 4.0 * sev("readout")
        counts = counts * np.float32(gain)
        counts += rng.normal(0.0, read_sigma, counts.shape).astype(np.float32)
    if noise.has("zingers"):
        _noise.add_zingers(counts, rng, sev("zingers"))
    if noise.has("hot_pixels"):
        _noise.add_hot_pixels(counts, rng, sev("hot_pixels"))
    if noise.has("dead_pixels"):
        _noise.add_dead_pixels(counts, rng, sev("dead_pixels"))
    if noise.has("saturation"):
        _noise.add_saturation(counts, sev("saturation"), ~gaps)
    # a counter cannot count past its overflow value (the leaked direct beam would)
    np.minimum(counts, OVERFLOW_COUNTS, out=counts)
    counts[gaps] = _GAP_VALUE if noise.has("gaps") else 0
    if not noise.has("readout"):
        counts = np.rint(counts).astype(np.int32)
    labels = {
        "sample": sample.labels(),
        "noise": noise.labels(),
        "noise_vector": noise.label_vector(),
        "geometry": {
            "distance_mm": geometry.distance_mm,
            "wavelength_nm": geometry.wavelength_nm,
            "incidence_deg": geometry.incidence_deg,
            "beam_center_px": list(geometry.beam_center_px),
        },
    }
    return SimResult(expected=expected, counts=counts, mask=nominal_mask(geometry), labels=labels)


