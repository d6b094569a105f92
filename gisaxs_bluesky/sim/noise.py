"""Detector noise and artefacts: named kinds with a severity in (0, 1], composable, labelled."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["NOISE_KINDS", "OVERFLOW_COUNTS", "NoiseSpec", "random_noise"]

#: every noise kind the simulator can add, in label order
NOISE_KINDS: tuple[str, ...] = (
    "poisson",  # photon counting statistics at the given dose
    "readout",  # CCD-like Gaussian readout noise and gain
    "hot_pixels",  # isolated pixels counting far too much
    "dead_pixels",  # pixels (and small clusters) reading zero
    "gaps",  # module gaps flagged -1 by the detector
    "zingers",  # cosmic-ray tracks and spots
    "beamstop",  # beamstop shadow away from its nominal (masked) place
    "parasitic",  # slit / window scattering: streaks and halo around the beam
    "saturation",  # pixels in counter overflow
    "misalignment",  # beam off its nominal position / incidence angle
)

#: Pilatus-like overflow value reported by a saturated counter (20-bit)
OVERFLOW_COUNTS = 2**20 - 1


@dataclass(frozen=True)
class NoiseSpec:
    """Which artefacts to add, each with a severity in (0, 1], at a dose in counts/pixel.

    ``dose_counts`` is the median expected count of valid pixels (0.1 to 100 on real frames).
    """

    dose_counts: float = 10.0
    kinds: Mapping[str, float] = field(default_factory=lambda: {"poisson": 1.0, "gaps": 1.0})

    def __post_init__(self) -> None:
        if not np.isfinite(self.dose_counts) or self.dose_counts <= 0:
            raise ValueError(f"dose_counts={self.dose_counts} must be a finite number > 0")
        for kind, severity in self.kinds.items():
            if kind not in NOISE_KINDS:
                raise ValueError(f"noise kind {kind!r} is not one of {NOISE_KINDS}")
            if not (0 < float(severity) <= 1):
                raise ValueError(f"severity of noise kind {kind!r} is {severity}, not in (0, 1]")
        object.__setattr__(self, "kinds", dict(self.kinds))

    def has(self, kind: str) -> bool:
        return kind in self.kinds

    def severity(self, kind: str) -> float:
        return float(self.kinds.get(kind, 0.0))

    def label_vector(self) -> np.ndarray:
        """Multi-label ground truth over NOISE_KINDS (1 where the kind is present)."""
        return np.array([k in self.kinds for k in NOISE_KINDS], dtype=np.float32)

    def labels(self) -> dict:
        return {
            "dose_counts": float(self.dose_counts),
            "kinds": [k for k in NOISE_KINDS if k in self.kinds],
            "severity": {k: float(v) for k, v in self.kinds.items()},
        }


def random_noise(
    rng: np.random.Generator,
    *,
    dose_range: tuple[float, float] = (0.1, 100.0),
    p_kind: float = 0.3,
    p_poisson: float = 0.9,
    dose_counts: float | None = None,
) -> NoiseSpec:
    """Random artefact mix: each kind present with probability p_kind, log-uniform dose."""
    if dose_counts is None:
        lo, hi = np.log(dose_range[0]), np.log(dose_range[1])
        dose_counts = float(np.exp(rng.uniform(lo, hi)))
    kinds: dict[str, float] = {}
    for kind in NOISE_KINDS:
        p = p_poisson if kind == "poisson" else p_kind
        if rng.random() < p:
            kinds[kind] = float(rng.uniform(0.3, 1.0))
    return NoiseSpec(dose_counts=dose_counts, kinds=kinds)


def add_zingers(counts: np.ndarray, rng: np.random.Generator, severity: float) -> None:
    """Cosmic-ray tracks: short straight lines of high counts, in place."""
    h, w = counts.shape
    for _ in range(1 + int(severity * 12)):
        length = int(rng.integers(2, 30))
        angle = rng.uniform(0, np.pi)
        r0, c0 = rng.uniform(0, h), rng.uniform(0, w)
        t = np.arange(length)
        rr = np.clip((r0 + t * np.sin(angle)).astype(int), 0, h - 1)
        cc = np.clip((c0 + t * np.cos(angle)).astype(int), 0, w - 1)
        counts[rr, cc] += rng.uniform(200, 5000)


def add_hot_pixels(counts: np.ndarray, rng: np.random.Generator, severity: float) -> None:
    n = 5 + int(severity * 300)
    idx = rng.integers(0, counts.size, n)
    counts.flat[idx] = 10 ** rng.uniform(3, 5.5, n)


def add_saturation(counts: np.ndarray, severity: float, valid: np.ndarray) -> None:
    """The counter saturates: the brightest valid pixels read the overflow value."""
    threshold = np.quantile(counts[valid], 1 - 0.0005 - 0.004 * severity)
    counts[counts >= threshold] = OVERFLOW_COUNTS


def add_dead_pixels(counts: np.ndarray, rng: np.random.Generator, severity: float) -> None:
    n = 200 + int(severity * 20000)
    counts.flat[rng.integers(0, counts.size, n)] = 0
    h, w = counts.shape
    for _ in range(1 + int(severity * 8)):  # dead clusters (a bad chip region)
        r, c = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
        size = rng.integers(8, 40, 2)
        counts[r : r + size[0], c : c + size[1]] = 0
