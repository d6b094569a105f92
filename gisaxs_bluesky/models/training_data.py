"""A binned simulated set (from `gisaxs-bluesky simulate`) held in memory as tensors, batched by
identity."""

from __future__ import annotations

from pathlib import Path

import h5py
import torch

from ..sim.sample import STRUCTURES
from .preprocess import N_CHANNELS

__all__ = ["LATTICE", "TrainingData"]

#: per structure: whether it has a lattice (a distance to learn)

LATTICE = torch.tensor([s not in ("spheres_dilute", "cylinders_dilute") for s in STRUCTURES])


class TrainingData:
    """A binned simulated set (from `gisaxs-bluesky simulate`) held in memory as tensors."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"training data {path} does not exist (make it with `gisaxs-bluesky simulate`)")
        with h5py.File(path, "r") as f:
            if "inputs" not in f:
                raise ValueError(f"{path} holds full frames; training needs a binned set (no --full)")
            self.inputs = torch.from_numpy(f["inputs"][:])
            if self.inputs.shape[1] != N_CHANNELS:
                raise ValueError(f"{path} holds {self.inputs.shape[1]}-channel inputs; this version "
                                 f"needs {N_CHANNELS}: simulate the set again")
            # the denoiser's 256 x 256 frames (sets made before it existed lack them)
            self.fine = torch.from_numpy(f["fine"][:]) if "fine" in f else None
            self.fine_target = torch.from_numpy(f["fine_target"][:]) if "fine" in f else None
            self.target = torch.from_numpy(f["target"][:])
            self.noise = torch.from_numpy(f["noise_vector"][:])
            self.structure = torch.from_numpy(f["structure_index"][:])
            self.radius = torch.from_numpy(f["radius_nm"][:])
            self.distance = torch.from_numpy(f["distance_nm"][:])
            self.identity = torch.from_numpy(f["identity"][:])
            self.dose = torch.from_numpy(f["dose_counts"][:])
            self.description = {k: (v.item() if hasattr(v, "item") else str(v))
                                for k, v in f.attrs.items() if k not in ("noise_kinds", "structures")}
        self.path = path
        ids, self.identity_index = torch.unique(self.identity, return_inverse=True)
        self.n_identities = len(ids)
        order = torch.argsort(self.identity_index, stable=True)
        counts = torch.bincount(self.identity_index)
        self.frames_of = list(torch.split(order, counts.tolist()))

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, identities: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.frames_of[i] for i in identities.tolist()])
