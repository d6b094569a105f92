"""The fixed (q_z, q_par) grid every frame is remapped onto, whatever the instrument."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["QGrid"]


@dataclass(frozen=True)
class QGrid:
    """A fixed grid in (q_z, q_par), 1/nm; row 0 is the highest q_z (as a detector image).

    ``fold=True`` maps both sides of the beam onto |q_par| (in-plane isotropic samples), so a
    detector that sees only one side still fills the grid.
    """

    n_q_z: int = 128
    n_q_par: int = 128
    q_z_max_nm: float = 2.4
    q_par_max_nm: float = 2.4
    q_z_min_nm: float = 0.0
    fold: bool = True

    def __post_init__(self) -> None:
        if self.n_q_z < 2 or self.n_q_par < 2:
            raise ValueError(f"grid {self.n_q_z} x {self.n_q_par} must be at least 2 x 2")
        if not 0 <= self.q_z_min_nm < self.q_z_max_nm or self.q_par_max_nm <= 0:
            raise ValueError(
                f"q ranges q_z [{self.q_z_min_nm}, {self.q_z_max_nm}] and q_par max "
                f"{self.q_par_max_nm} must be increasing and > 0"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_q_z, self.n_q_par)

    @property
    def q_par_min_nm(self) -> float:
        return 0.0 if self.fold else -self.q_par_max_nm

    @property
    def q_par_step(self) -> float:
        return (self.q_par_max_nm - self.q_par_min_nm) / self.n_q_par

    @property
    def q_z_step(self) -> float:
        return (self.q_z_max_nm - self.q_z_min_nm) / self.n_q_z

    def q_par_centres(self) -> np.ndarray:
        return self.q_par_min_nm + (np.arange(self.n_q_par) + 0.5) * self.q_par_step

    def q_z_centres(self) -> np.ndarray:
        """q_z of each row, decreasing (row 0 at the top)."""
        return self.q_z_max_nm - (np.arange(self.n_q_z) + 0.5) * self.q_z_step

    def bin_of(self, q_par: np.ndarray, q_z: np.ndarray) -> np.ndarray:
        """Flat bin index (row * n_q_par + col) of each (q_par, q_z), -1 outside the grid."""
        q_par = np.abs(q_par) if self.fold else q_par
        col = np.floor((q_par - self.q_par_min_nm) / self.q_par_step)
        row = np.floor((self.q_z_max_nm - q_z) / self.q_z_step)
        inside = (col >= 0) & (col < self.n_q_par) & (row >= 0) & (row < self.n_q_z)
        out = np.where(inside, row * self.n_q_par + col, -1)
        return out.astype(np.int64)

    def to_dict(self) -> dict:
        return {"n_q_z": self.n_q_z, "n_q_par": self.n_q_par, "q_z_max_nm": self.q_z_max_nm,
                "q_par_max_nm": self.q_par_max_nm, "q_z_min_nm": self.q_z_min_nm,
                "fold": self.fold}
