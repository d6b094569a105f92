"""What is on the substrate: structure type, sizes, disorder and refractive indices."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["STRUCTURES", "Sample", "random_sample"]

#: structure types the simulator knows, in label order
STRUCTURES: tuple[str, ...] = (
    "spheres_dilute",
    "cylinders_dilute",
    "spheres_paracrystal",
    "cylinders_hexagonal",
    "lamellar",
)

_SPHERES = ("spheres_dilute", "spheres_paracrystal")


@dataclass(frozen=True)
class Sample:
    """Nanostructures on a flat substrate.

    ``distance_nm`` is the inter-particle distance (paracrystal peak distance, lattice
    constant or lamellar period); dilute structures ignore it. ``polydispersity`` is the
    relative width sigma_R / R, ``disorder`` the relative paracrystal / lattice disorder.
    Refractive index n = 1 - delta + i beta. Defaults: Ag-like particles on Si at ~9 keV.
    """

    structure: str = "spheres_paracrystal"
    radius_nm: float = 5.0
    height_nm: float | None = None
    distance_nm: float = 30.0
    polydispersity: float = 0.1
    disorder: float = 0.15
    delta_substrate: float = 6.0e-6
    beta_substrate: float = 1.0e-7
    delta_particle: float = 2.0e-5
    beta_particle: float = 1.5e-6
    approximation: str = "dwba"

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure={self.structure!r} is not one of {STRUCTURES}")
        if self.approximation not in ("dwba", "ba"):
            raise ValueError(f"approximation={self.approximation!r} must be 'dwba' or 'ba'")
        for name in ("radius_nm", "distance_nm", "delta_substrate", "delta_particle"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value} must be a finite number > 0")
        if self.height_nm is not None and (not np.isfinite(self.height_nm) or self.height_nm <= 0):
            raise ValueError(f"height_nm={self.height_nm} must be a finite number > 0")
        for name in ("polydispersity", "disorder", "beta_substrate", "beta_particle"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value} must be a finite number >= 0")
        if self.polydispersity >= 0.5:
            raise ValueError(f"polydispersity={self.polydispersity} must be < 0.5")
        if self.disorder >= 0.5:
            raise ValueError(f"disorder={self.disorder} must be < 0.5")
        if self.has_lattice:
            # lamellae: distance is the period of stripes of width radius_nm
            minimum = self.radius_nm if self.structure == "lamellar" else 2 * self.radius_nm
            if self.distance_nm < minimum:
                raise ValueError(
                    f"distance_nm={self.distance_nm} is smaller than the particle size "
                    f"{minimum} nm of structure {self.structure!r} (radius_nm={self.radius_nm})"
                )

    @property
    def has_lattice(self) -> bool:
        return self.structure not in ("spheres_dilute", "cylinders_dilute")

    @property
    def is_sphere(self) -> bool:
        return self.structure in _SPHERES

    @property
    def height(self) -> float:
        """Particle height in nm (spheres: the diameter; others default to the radius)."""
        if self.is_sphere:
            return 2 * self.radius_nm
        return self.height_nm if self.height_nm is not None else self.radius_nm

    @property
    def structure_index(self) -> int:
        return STRUCTURES.index(self.structure)

    def labels(self) -> dict:
        """Identity labels (ground truth) as plain JSON-able values."""
        d = asdict(self)
        d["structure_index"] = self.structure_index
        d["height_nm"] = self.height
        return d


def random_sample(
    rng: np.random.Generator,
    *,
    structure: str | None = None,
    radius_range_nm: tuple[float, float] = (3.0, 8.0),
    distance_factor_range: tuple[float, float] = (3.0, 6.0),
) -> Sample:
    """Draw a sample of a random (or given) structure with parameters in training ranges."""
    structure = structure or STRUCTURES[rng.integers(len(STRUCTURES))]
    radius = float(rng.uniform(*radius_range_nm))
    factor = float(rng.uniform(*distance_factor_range))
    return Sample(
        structure=structure,
        radius_nm=radius,
        height_nm=float(radius * rng.uniform(0.8, 2.0)),
        distance_nm=radius * factor,
        polydispersity=float(rng.uniform(0.05, 0.2)),
        disorder=float(rng.uniform(0.08, 0.25)),
    )
