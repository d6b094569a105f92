"""Scattering physics: Fresnel coefficients, form factors, structure factors, four-term DWBA."""

from __future__ import annotations

import numpy as np
from scipy import special

from .geometry import Geometry
from .sample import Sample

__all__ = [
    "fresnel_r",
    "sphere_amplitude",
    "cylinder_amplitude",
    "stripe_amplitude",
    "sphere_ff",
    "cylinder_ff",
    "stripe_ff",
    "paracrystal_sf",
    "hexagonal_sf",
    "hexagonal_peak_positions",
    "scattered_intensity",
]

_N_POLY = 5  # radius samples for the polydispersity average


def fresnel_r(alpha: np.ndarray, delta: float, beta: float) -> np.ndarray:
    """Fresnel reflection coefficient of a flat substrate at grazing angle alpha (rad)."""
    n2 = (1 - delta + 1j * beta) ** 2
    sin_a = np.sin(alpha).astype(np.complex128)
    kz_t = np.sqrt(n2 - np.cos(alpha) ** 2 + 0j)
    return (sin_a - kz_t) / (sin_a + kz_t)


def _sinc(x: np.ndarray) -> np.ndarray:
    return np.sinc(x / np.pi)


def sphere_amplitude(q: np.ndarray, radius: float) -> np.ndarray:
    """Real sphere form factor at |q| (first zero at qR = 4.493)."""
    qr = np.maximum(q * radius, 1e-6)
    # (sin x - x cos x) / x^3 -> 1/3 - x^2/30 near 0, where float32 would cancel
    shape = np.where(qr < 0.05, 1 / 3 - qr**2 / 30, (np.sin(qr) - qr * np.cos(qr)) / qr**3)
    return 4 * np.pi * radius**3 * shape


def cylinder_amplitude(q_par: np.ndarray, qz: np.ndarray, radius: float, height: float):
    """Real cylinder form factor (first zero at q_par R = 3.832), without its height phase."""
    x = np.maximum(q_par * radius, 1e-9)
    return np.pi * radius**2 * height * 2 * special.j1(x) / x * _sinc(qz * height / 2)


def stripe_amplitude(qy: np.ndarray, qz: np.ndarray, width: float, height: float):
    """Real form factor (per unit length) of a lamella of given width and height."""
    return width * height * _sinc(qy * width / 2) * _sinc(qz * height / 2)


def sphere_ff(q_par: np.ndarray, qz: np.ndarray, radius: float) -> np.ndarray:
    """Form factor of a sphere resting on the substrate (centre at height R).

    Born convention F(q) = int exp(-i q.r) dr, the one that goes with waves exp(i(k.r - w t)),
    n = 1 - delta + i beta and the Fresnel coefficients of :func:`fresnel_r`.
    """
    return sphere_amplitude(np.sqrt(q_par**2 + qz**2), radius) * np.exp(-1j * qz * radius)


def cylinder_ff(q_par: np.ndarray, qz: np.ndarray, radius: float, height: float) -> np.ndarray:
    """Form factor of an upright cylinder standing on the substrate (convention of sphere_ff)."""
    return cylinder_amplitude(q_par, qz, radius, height) * np.exp(-0.5j * qz * height)


def stripe_ff(qy: np.ndarray, qz: np.ndarray, width: float, height: float) -> np.ndarray:
    """Form factor (per unit length) of a lamella standing on the substrate (as sphere_ff)."""
    return stripe_amplitude(qy, qz, width, height) * np.exp(-0.5j * qz * height)


def paracrystal_sf(q: np.ndarray, distance: float, disorder: float) -> np.ndarray:
    """Radial (1D Hosemann) paracrystal structure factor; first peak near q = 2 pi / D."""
    sigma = disorder * distance
    phi = np.exp(-0.5 * (q * sigma) ** 2 + 1j * q * distance)
    denominator = 1 - phi
    denominator = np.where(np.abs(denominator) < 1e-6, 1e-6, denominator)  # q -> 0
    return np.real((1 + phi) / denominator)


def hexagonal_peak_positions(distance: float, n: int = 4) -> np.ndarray:
    """|G| of the first n shells of a 2D hexagonal lattice with lattice constant ``distance``."""
    g1 = 4 * np.pi / (np.sqrt(3) * distance)
    return g1 * np.sqrt(np.array([1, 3, 4, 7, 9, 12, 13, 16][:n], dtype=float))


def hexagonal_sf(q: np.ndarray, distance: float, disorder: float) -> np.ndarray:
    """Azimuthally averaged structure factor of a 2D hexagonal lattice with Debye-Waller damping."""
    shells = hexagonal_peak_positions(distance, 8)
    multiplicity = np.array([6, 6, 6, 12, 6, 6, 12, 6], dtype=float)
    width = 0.02 * shells[0] + disorder * shells[0] * 0.25
    dw = np.exp(-((q * disorder * distance) ** 2) / 4)
    peaks = np.zeros_like(q)
    for g, m in zip(shells, multiplicity, strict=True):
        # 2D powder: each shell spreads over a ring of circumference 2 pi g
        peaks += m / g * np.exp(-0.5 * ((q - g) / width) ** 2)
    peaks *= shells[0] / 6 * 3.0
    return 1 - dw + dw * peaks + 1e-3


def lamellar_sf(qy: np.ndarray, distance: float, disorder: float) -> np.ndarray:
    """Bragg rods of a 1D grating of period ``distance`` with lines along the beam."""
    g = 2 * np.pi / distance
    width = 0.03 * g + disorder * g * 0.2
    dw = np.exp(-((qy * disorder * distance) ** 2) / 4)
    peaks = np.zeros_like(qy)
    for n in range(1, 8):
        peaks += np.exp(-0.5 * ((np.abs(qy) - n * g) / width) ** 2)
    return 1 - dw + 4 * dw * peaks + 1e-3


def _radius_samples(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes of a normal radius distribution (clipped > 0) and their weights."""
    if sample.polydispersity == 0:
        return np.array([sample.radius_nm]), np.array([1.0])
    x, w = np.polynomial.hermite_e.hermegauss(_N_POLY)
    radii = sample.radius_nm * (1 + sample.polydispersity * x)
    keep = radii > 0
    w = w[keep] / w[keep].sum()
    return radii[keep], w


def _real_amplitude(sample: Sample, q_par, qy, qz_abs, radius: float, height: float):
    """Form factor without its height phase, for |qz| (all form factors here are even in qz)."""
    if sample.is_sphere:
        return sphere_amplitude(np.sqrt(q_par**2 + qz_abs**2), radius)
    if sample.structure == "lamellar":
        return stripe_amplitude(qy, qz_abs, radius, height)
    return cylinder_amplitude(q_par, qz_abs, radius, height)


def scattered_intensity(geometry: Geometry, sample: Sample, rows: np.ndarray, cols: np.ndarray):
    """Diffuse intensity (arbitrary units) at the given pixels, without beamstop or specular.

    Four-term DWBA for particles on a substrate (incoming/outgoing reflections weighted with the
    Fresnel coefficients of the substrate), decoupling approximation for size dispersion:
    I = <|F|^2> - |<F>|^2 + |<F>|^2 S(q_par). Below the sample horizon the substrate absorbs.
    """
    tth, af = geometry.angles(rows, cols)
    ai = np.deg2rad(geometry.incidence_deg)
    k = geometry.k_nm
    qx = k * (np.cos(af) * np.cos(tth) - np.cos(ai))
    qy = k * np.cos(af) * np.sin(tth)
    q_par = np.sqrt(qx**2 + qy**2)
    kf = (k * np.sin(af)).astype(np.float32)
    ki = np.float32(k * np.sin(ai))
    q_par = q_par.astype(np.float32)
    qy = qy.astype(np.float32)
    # the four DWBA terms share two values of qz up to sign: qa = kf + ki and qb = kf - ki
    qa, qb = kf + ki, kf - ki
    if sample.approximation == "ba":
        r_i, r_f = 0.0, np.zeros((), dtype=np.complex64)
    else:
        r_i = complex(fresnel_r(np.array(ai), sample.delta_substrate, sample.beta_substrate))
        r_f = fresnel_r(np.maximum(af, 0.0), sample.delta_substrate, sample.beta_substrate)
        r_f = r_f.astype(np.complex64)
    abs_qa, abs_qb = np.abs(qa), np.abs(qb)

    # contrast between particle and vacuum, |delta n|^2
    contrast = (sample.delta_particle**2 + sample.beta_particle**2) * 1e10
    radii, weights = _radius_samples(sample)
    mean_f = 0.0
    mean_f2 = 0.0
    for radius, weight in zip(radii, weights, strict=True):
        height = sample.height * radius / sample.radius_nm
        centre = np.float32(radius if sample.is_sphere else height / 2)
        # every form factor here is real(|q_par|, |qz|) * exp(-i qz * centre height): the
        # Born convention exp(-i q.r) that the Fresnel coefficients of n = 1 - delta + i beta
        # assume; with exp(+i q.r) the standing wave above the substrate has the wrong phase
        # and the Yoneda band moves up in exit angle (checked against BornAgain, tests/sim)
        amp_a = _real_amplitude(sample, q_par, qy, abs_qa, radius, height)
        phase_a = np.exp(-1j * qa * centre)
        f = amp_a * (phase_a + (r_i * r_f) * np.conj(phase_a))
        if sample.approximation == "dwba":
            amp_b = _real_amplitude(sample, q_par, qy, abs_qb, radius, height)
            phase_b = np.exp(-1j * qb * centre)
            f += amp_b * (r_i * phase_b + r_f * np.conj(phase_b))
        mean_f = mean_f + weight * f
        mean_f2 = mean_f2 + weight * (f.real**2 + f.imag**2)

    if sample.structure in ("spheres_paracrystal",):
        s = paracrystal_sf(q_par, sample.distance_nm, sample.disorder)
    elif sample.structure == "cylinders_hexagonal":
        s = hexagonal_sf(q_par, sample.distance_nm, sample.disorder)
    elif sample.structure == "lamellar":
        s = lamellar_sf(qy, sample.distance_nm, sample.disorder)
    else:
        s = 1.0
    intensity = contrast * (mean_f2 - np.abs(mean_f) ** 2 + np.abs(mean_f) ** 2 * s)
    # below the horizon the exit beam would leave through the substrate
    return np.where(af < 0, intensity * 1e-3, intensity)
