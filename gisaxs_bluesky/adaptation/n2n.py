"""The Noise2Noise losses on a batch of thinned halves: each half's decoder pattern and denoiser
output against the other half, and the halves' identity latents pulled together."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812 - torch's own spelling

from ..models.losses import denoise_errors
from .adapt_config import AdaptConfig
from .halves import HalfView, Pairs

__all__ = ["log_pool", "pair_losses"]


def log_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 8, 128, 128) input -> the 64 x 64 valid-weighted log intensity and its valid weight
    (as models.dataset.pool2 makes the decoder's targets)."""
    valid = F.avg_pool2d(x[:, 1:2], 2)[:, 0]
    log_i = F.avg_pool2d(x[:, :1] * x[:, 1:2], 2)[:, 0] / valid.clamp_min(1e-6)
    return log_i, valid


def pair_losses(model, pairs: Pairs, idx: torch.Tensor, cfg: AdaptConfig, spread: float,
                 device: torch.device, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    flip = bool(rng.random() < 0.5)
    xa, xb = (pairs.x[h][idx].to(device).float() for h in (0, 1))
    if flip:  # the mirror image is as physical as the frame (GISAXS is left-right symmetric)
        xa, xb = xa.flip(-1), xb.flip(-1)
    n = len(idx)
    x = torch.cat([xa, xb]).contiguous(memory_format=torch.channels_last)
    out = model(x)
    recon = out["recon"].float()
    z = out["z_identity"].float()
    log_i, valid = log_pool(x.float())
    swap = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(device)  # a <-> b
    weight = ((valid > 0.5) & (valid[swap] > 0.5)).float()
    decoder = ((recon - log_i[swap]) ** 2 * weight).sum() / weight.sum().clamp_min(1)
    identity = ((z[:n] - z[n:]) ** 2).sum(1).mean() / spread**2
    err_sum, n_sum = 0.0, 0.0
    for src in (0, 1):
        prior = recon[src * n : (src + 1) * n].detach()
        err, _, nvalid = denoise_errors(model, HalfView(pairs, src), idx, prior, cfg.denoise_crop,
                                         device, flip, rng)
        err_sum = err_sum + (err * nvalid).sum()
        n_sum = n_sum + nvalid.sum()
    denoiser = err_sum / n_sum.clamp_min(1)
    total = (cfg.w_n2n_decoder * decoder + cfg.w_n2n_denoiser * denoiser
             + cfg.w_identity * identity)
    return {"total": total, "n2n_decoder": decoder, "n2n_denoiser": denoiser,
            "identity": identity}
