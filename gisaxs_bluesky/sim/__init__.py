"""Physics-based GISAXS simulator with labelled detector noise."""

from .geometry import PILATUS_1M, Detector, Geometry
from .noise import NOISE_KINDS, OVERFLOW_COUNTS, NoiseSpec, random_noise
from .noise_transfer import (
    InstrumentNoise,
    NoiseModel,
    NoiseModelError,
    apply_noise_model,
    load_noise_model,
    save_noise_model,
    simulate_with_noise_model,
)
from .sample import STRUCTURES, Sample, random_sample
from .simulate import SimResult, expected_intensity, nominal_mask, simulate

__all__ = [
    "Detector",
    "Geometry",
    "PILATUS_1M",
    "NOISE_KINDS",
    "OVERFLOW_COUNTS",
    "NoiseSpec",
    "InstrumentNoise",
    "NoiseModel",
    "NoiseModelError",
    "apply_noise_model",
    "load_noise_model",
    "save_noise_model",
    "simulate_with_noise_model",
    "random_noise",
    "STRUCTURES",
    "Sample",
    "random_sample",
    "SimResult",
    "expected_intensity",
    "nominal_mask",
    "simulate",
]
