"""A sample surface scanned with a motor: regions of different structure and a defect."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .geometry import Geometry
from .noise import NoiseSpec
from .sample import Sample
from .simulate import simulate

__all__ = ["DEFECT_SAMPLE", "Region", "SampleScene", "default_scene"]

#: what a defect looks like in the demo scenes: particles that never grew (dense nuclei)
DEFECT_SAMPLE = Sample("spheres_paracrystal", radius_nm=1.5, distance_nm=6.0)


@dataclass(frozen=True)
class Region:
    """Positions ``x_min_mm <= x < x_max_mm`` of the scanned motor show ``sample``."""

    x_min_mm: float
    x_max_mm: float
    sample: Sample
    name: str = ""
    is_defect: bool = False


@dataclass
class SampleScene:
    """Maps motor positions to frames: the simulated detector calls :meth:`frame`.

    Later regions take precedence, so a small defect can sit inside a large region. Each frame
    gets fresh noise (deterministic for ``seed`` and the frame counter).
    """

    regions: list[Region]
    motor: str = "sample_x"
    geometry: Geometry = field(default_factory=Geometry)
    noise: NoiseSpec = field(default_factory=lambda: NoiseSpec(10.0, {"poisson": 1.0, "gaps": 1.0}))
    seed: int = 0
    compute_binning: int = 4
    _counter: int = 0

    def region_at(self, x_mm: float) -> Region:
        found = None
        for region in self.regions:
            if region.x_min_mm <= x_mm < region.x_max_mm:
                found = region
        if found is None:
            raise ValueError(f"{self.motor}={x_mm} mm is outside the sample {self.extent_mm}")
        return found

    @property
    def extent_mm(self) -> tuple[float, float]:
        return min(r.x_min_mm for r in self.regions), max(r.x_max_mm for r in self.regions)

    @property
    def defect_regions(self) -> list[Region]:
        return [r for r in self.regions if r.is_defect]

    def frame(self, positions: Mapping[str, float]) -> np.ndarray:
        """Detector frame (int32 counts, -1 in gaps) at the given motor positions."""
        if self.motor not in positions:
            raise ValueError(f"positions {dict(positions)} lack the scanned motor {self.motor!r}")
        x = float(positions[self.motor])
        lo, hi = self.extent_mm
        region = self.region_at(min(max(x, lo), np.nextafter(hi, lo)))
        seed = np.random.default_rng([self.seed, self._counter])
        self._counter += 1
        return simulate(
            region.sample, self.geometry, self.noise, seed, compute_binning=self.compute_binning
        ).counts

    __call__ = frame


def default_scene(seed: int = 0, dose_counts: float = 10.0) -> SampleScene:
    """The demo sample: four structure regions along x (0-40 mm) and a 1.5 mm defect."""
    regions = [
        Region(0.0, 10.0, Sample("spheres_paracrystal", radius_nm=5.0, distance_nm=25.0), "A"),
        Region(10.0, 20.0, Sample("cylinders_hexagonal", radius_nm=4.0, distance_nm=20.0,
                                  height_nm=6.0), "B"),
        Region(20.0, 30.0, Sample("spheres_dilute", radius_nm=7.0), "C"),
        Region(30.0, 40.0, Sample("lamellar", radius_nm=6.0, distance_nm=30.0, height_nm=8.0), "D"),
        # failed growth: dense 1.5 nm nuclei, far below the model's training range (3-8 nm)
        Region(24.5, 26.0, DEFECT_SAMPLE, "defect", is_defect=True),
    ]
    return SampleScene(regions, noise=NoiseSpec(dose_counts, {"poisson": 1.0, "gaps": 1.0}),
                       seed=seed)
