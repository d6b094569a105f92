"""The simulated anchor set of `gisaxs-bluesky adapt`: labelled frames whose training losses
keep what the model learnt from simulation while it adapts to a beamtime's frames."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.dataset import DatasetSpec, generate
from ..models.loading import model_cache_dir
from ..models.training_data import TrainingData

__all__ = ["ANCHOR_SEED", "anchor_latents", "anchor_set"]

#: seed of the simulated anchor set: apart from the training sets (1-4) and evaluation (>= 10000)
ANCHOR_SEED = 7


def anchor_set(n_identities: int, *, seed: int = ANCHOR_SEED, cache_dir: Path | None = None,
               workers: int = 1, progress: bool = True) -> TrainingData:
    """The simulated anchor set (binned, random artefacts and dose), made once and cached."""
    spec = DatasetSpec(n_identities=n_identities, frames_per_identity=2, seed=seed)
    cache_dir = cache_dir or model_cache_dir().parent / "anchors"
    path = cache_dir / f"anchor-{n_identities}x2-seed{seed}.h5"
    if not path.is_file():
        generate(path, spec, workers=workers, progress=progress)
    return TrainingData(path)


@torch.no_grad()
def anchor_latents(model, data: TrainingData, device: torch.device) -> torch.Tensor:
    """The base model's identity latents of every anchor frame (before any step)."""
    model.eval()
    return torch.cat([model.to_identity(model.features(data.inputs[s : s + 64].to(device)
                                                       .float())[0]).float()
                      for s in range(0, len(data), 64)])
