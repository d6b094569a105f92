"""Physics-based GISAXS simulator with labelled detector noise."""

from .geometry import PILATUS_1M, Detector, Geometry
from .noise import NOISE_KINDS, OVERFLOW_COUNTS, NoiseSpec, random_noise
from .sample import STRUCTURES, Sample, random_sample
from .simulate import SimResult, expected_intensity, nominal_mask, simulate

__all__ = [
    "Detector",
    "Geometry",
    "PILATUS_1M",
    "NOISE_KINDS",
    "OVERFLOW_COUNTS",
    "NoiseSpec",
    "random_noise",
    "STRUCTURES",
    "Sample",
    "random_sample",
    "SimResult",
    "expected_intensity",
    "nominal_mask",
    "simulate",
]
