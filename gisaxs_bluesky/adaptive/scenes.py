"""Simulated samples for adaptive scans: a small defect between coarse grid points."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..sim.noise import NoiseSpec
from ..sim.sample import Sample
from ..sim.scene import DEFECT_SAMPLE, Region, SampleScene

__all__ = ["defect_scene", "exposure_frame_fn"]


def defect_scene(
    seed: int,
    *,
    start: float = 10.0,
    stop: float = 30.0,
    num_coarse: int = 11,
    width: float = 2.0,
    dose_counts: float = 10.0,
) -> SampleScene:
    """Regions B (x < 20) and C (x >= 20) of the demo sample with a ``width`` mm defect.

    The defect's centre is random per ``seed`` and its edges never sit on a coarse grid point
    (``num_coarse`` points over ``start..stop``); it stays 1 mm clear of the B/C boundary and
    the scan ends.
    """
    rng = np.random.default_rng(seed)
    grid = np.linspace(start, stop, num_coarse)
    spacing = grid[1] - grid[0]
    for _ in range(1000):
        c = float(rng.uniform(start + width / 2 + 1, stop - width / 2 - 1))
        lo, hi = c - width / 2, c + width / 2
        if abs(c - 20.0) < width / 2 + 1:
            continue
        if np.min(np.abs(grid - lo)) > 0.1 * spacing and np.min(np.abs(grid - hi)) > 0.1 * spacing:
            break
    regions = [
        Region(0.0, 20.0, Sample("cylinders_hexagonal", radius_nm=4.0, distance_nm=20.0,
                                 height_nm=6.0), "B"),
        Region(20.0, 40.0, Sample("spheres_dilute", radius_nm=7.0), "C"),
        Region(lo, hi, DEFECT_SAMPLE, "defect",
               is_defect=True),
    ]
    return SampleScene(regions, noise=NoiseSpec(dose_counts, {"poisson": 1.0, "gaps": 1.0}),
                       seed=seed)


def exposure_frame_fn(scene: SampleScene, exposure_key: str = "exposure"
                      ) -> Callable[[Mapping[str, float]], np.ndarray]:
    """Frame function whose dose scales with the ``exposure_key`` position (default 1)."""
    base = scene.noise

    def frame_fn(positions: Mapping[str, float]) -> np.ndarray:
        factor = float(positions.get(exposure_key, 1.0)) or 1.0
        scene.noise = NoiseSpec(base.dose_counts * factor, base.kinds)
        try:
            return scene(positions)
        finally:
            scene.noise = base

    return frame_fn
