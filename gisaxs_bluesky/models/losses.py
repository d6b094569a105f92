"""The training losses: reconstruction, noise kinds, structure, sizes, consistency and the
denoiser's error on a random crop (also the anchor of `gisaxs-bluesky adapt`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812 - torch's own spelling

from .dae import GisaxsDAE, level_offset
from .preprocess import drop_coverage
from .train_config import TrainConfig
from .training_data import LATTICE, TrainingData

__all__ = ["denoise_errors", "training_losses"]


def denoise_errors(model: GisaxsDAE, data: TrainingData, idx: torch.Tensor,
                    prior: torch.Tensor, size: int, device: torch.device, flip: bool,
                    rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Per-frame masked MSE of the denoiser and of the plain block means on one random crop
    (the same for the whole batch), and the number of valid blocks. ``prior`` is the decoder
    output of the frames, mirrored already when ``flip``."""
    fine, target = data.fine[idx], data.fine_target[idx]
    if flip:
        fine, target = fine.flip(-1), target.flip(-1)
    factor = fine.shape[-1] // prior.shape[-1]
    r, c = (int(v) * factor for v in rng.integers(0, (fine.shape[-1] - size) // factor + 1, 2))
    fine = fine[..., r : r + size, c : c + size].to(device).float()
    target = target[..., r : r + size, c : c + size].to(device).float()
    prior = prior[..., r // factor : (r + size) // factor, c // factor : (c + size) // factor]
    out = model.denoise(prior.to(device), fine).float()
    weight = ((fine[:, 1] > 0) & (target > 0)).float()
    n = weight.sum(dim=(1, 2))
    err = ((out - target) ** 2 * weight).sum(dim=(1, 2)) / n.clamp_min(1)
    base = ((fine[:, 0] - target) ** 2 * weight).sum(dim=(1, 2)) / n.clamp_min(1)
    return err, base, n


def training_losses(model: GisaxsDAE, data: TrainingData, idx: torch.Tensor, cfg: TrainConfig,
            device: torch.device, flip: bool,
            rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    # channels-last: oneDNN's convolutions (forward and backward) run ~10 % faster on CPU
    x = data.inputs[idx].to(device).float()
    if cfg.coverage_dropout > 0 and data.description.get("input_mode") == "qgrid":
        x = drop_coverage(x, cfg.coverage_dropout, rng or np.random.default_rng())
    x = x.contiguous(memory_format=torch.channels_last)
    target = data.target[idx].to(device).float()
    if flip:  # GISAXS is left-right symmetric about the beam; mirrored frames are physical too
        x, target = x.flip(-1), target.flip(-1)
    out = {k: v.float() for k, v in model(x).items()}  # losses in fp32 under autocast too
    weight = (target > 0).float()
    pattern = out["recon"]
    if model.config.align_recon:  # shift-free: the pattern's shape, not its level
        pattern = pattern + level_offset(pattern, target, weight)[:, None, None]
    recon = ((pattern - target) ** 2 * weight).sum() / weight.sum().clamp_min(1)
    noise = F.binary_cross_entropy_with_logits(out["noise_logits"], data.noise[idx].to(device))
    structure_idx = data.structure[idx].to(device)
    structure = F.cross_entropy(out["structure_logits"], structure_idx)
    log_r = torch.log(data.radius[idx].to(device))
    log_d = torch.log(data.distance[idx].to(device))
    size_r = F.mse_loss(out["log_radius"], log_r)
    lattice = LATTICE.to(device)[structure_idx].float()
    size_d = ((out["log_distance"] - log_d) ** 2 * lattice).sum() / lattice.sum().clamp_min(1)
    # consistency: identity latents of one sample under different noise should coincide,
    # measured relative to the spread between samples so that shrinking the latent cannot cheat
    z = out["z_identity"].float()
    ident = data.identity_index[idx].to(device)
    same = (ident[:, None] == ident[None, :]).float() - torch.eye(len(idx), device=device)
    d2 = torch.cdist(z, z) ** 2
    within = (d2 * same).sum() / same.sum().clamp_min(1)
    between = (d2 * (1 - same)).sum() / (1 - same).sum().clamp_min(1)
    consistency = within / between.clamp_min(1e-6)
    total = (cfg.w_recon * recon + cfg.w_noise * noise + cfg.w_structure * structure
             + cfg.w_size * (size_r + size_d) + cfg.w_consistency * consistency)
    losses = {"recon": recon, "noise": noise, "structure": structure, "radius": size_r,
              "distance": size_d, "consistency": consistency}
    if data.fine is not None and cfg.w_denoise > 0:
        err, _, n = denoise_errors(model, data, idx, out["recon"].detach(), cfg.denoise_crop,
                                    device, flip, rng or np.random.default_rng())
        losses["denoise"] = (err * n).sum() / n.sum().clamp_min(1)
        total = total + cfg.w_denoise * losses["denoise"]
    return {"total": total, **losses}
