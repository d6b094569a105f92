"""The denoising autoencoder: encoder -> [identity | noise] latent -> decoder and heads."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ModelConfig

__all__ = ["GisaxsDAE", "DAEOutput", "level_offset", "pooled_level"]


def pooled_level(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 64, 64) log intensity of the valid bins of 2 x 2 blocks of (N, C, 128, 128) inputs
    and the (N, 64, 64) weight of each block: 1 where at least 3 of its 4 bins are valid."""
    good = (x[:, 1:2] > 0).to(x.dtype)
    n = nn.functional.avg_pool2d(good, 2)[:, 0]
    log_i = nn.functional.avg_pool2d(x[:, :1] * good, 2)[:, 0] / n.clamp_min(0.25)
    return log_i, (n >= 0.75).to(x.dtype)


def level_offset(recon: torch.Tensor, level: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N,) shift that puts ``recon`` on ``level`` in the weighted mean (0 without weight)."""
    w = weight.sum(dim=(1, 2))
    return ((level - recon) * weight).sum(dim=(1, 2)) / w.clamp_min(1)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
        nn.BatchNorm2d(c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.SiLU(),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.SiLU(),
    )


class DAEOutput(dict):
    """Named outputs of a forward pass (a dict so torch.jit / autocast handle it plainly)."""


class GisaxsDAE(nn.Module):
    """Convolutional DAE for (8, 128, 128) inputs; reconstructs (64, 64) clean log intensity.

    The decoder sees only the identity part of the latent, so the clean pattern must be
    recoverable from identity alone; the noise classifier sees only the noise part, which is
    fed by pooled early features where single hot pixels and zingers are still visible.
    The denoiser (:meth:`denoise`) refines the decoder's pattern with the measured frame at
    256 x 256: the pattern says what the sample scatters, the frame where exactly it is.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        c = config.base_channels
        self.stem = _down(config.in_channels, c)  # 64
        self.block2 = _down(c, 2 * c)  # 32
        self.block3 = _down(2 * c, 4 * c)  # 16
        self.block4 = _down(4 * c, 4 * c)  # 8
        self.flat_dim = 4 * c * 8 * 8
        self.to_identity = nn.Sequential(
            nn.Flatten(), nn.Linear(self.flat_dim, 128), nn.SiLU(),
            nn.Linear(128, config.identity_dim),
        )
        pooled = 3 * (c + 2 * c + 4 * c) + config.in_channels * 4
        self.noise_in = pooled + self.flat_dim
        self.to_noise, self.noise_head = self._noise_branch(config)
        self.structure_head = nn.Sequential(
            nn.Linear(config.identity_dim, 64), nn.SiLU(), nn.Linear(64, config.n_structures)
        )
        self.size_head = nn.Sequential(nn.Linear(config.identity_dim, 64), nn.SiLU(), nn.Linear(64, 2))
        self.from_identity = nn.Sequential(nn.Linear(config.identity_dim, self.flat_dim), nn.SiLU())
        # reconstructs the clean log intensity at half the input resolution (64 x 64): the
        # patterns are smooth there, and the decoder costs a quarter of a full-size one
        self.decoder = nn.Sequential(
            _up(4 * c, 2 * c),  # 16
            _up(2 * c, c),  # 32
            _up(c, c),  # 64
            nn.Conv2d(c, 1, 3, padding=1),
        )

        r = config.refine_channels
        self.refine = nn.Sequential(
            nn.Conv2d(3, r, 3, padding=1), nn.SiLU(),
            nn.Conv2d(r, r, 3, padding=2, dilation=2), nn.SiLU(),
            nn.Conv2d(r, r, 3, padding=2, dilation=2), nn.SiLU(),
            nn.Conv2d(r, 2, 3, padding=1),
        )

    def _noise_branch(self, config: ModelConfig) -> tuple[nn.Sequential, nn.Linear]:
        h = config.noise_hidden
        to_noise = nn.Sequential(
            nn.Linear(self.noise_in, h), nn.SiLU(), nn.Linear(h, config.noise_dim)
        )
        return to_noise, nn.Linear(config.noise_dim, config.n_noise_kinds)

    def replace_noise_branch(self, noise_hidden: int, noise_dim: int) -> None:
        """A new, freshly initialised noise branch (``to_noise``, ``noise_head``) of these sizes;
        ``config`` follows. Training uses it to refit the branch on frozen features."""
        self.config = dataclasses.replace(self.config, noise_hidden=noise_hidden,
                                          noise_dim=noise_dim)
        device = self.noise_head.weight.device
        to_noise, head = self._noise_branch(self.config)
        self.to_noise, self.noise_head = to_noise.to(device), head.to(device)

    def denoise(self, recon: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """Clean log intensity at the fine resolution from the (N, 64, 64) decoder output and the
        (N, 2, H, W) measured log intensity and valid fraction (H, W an integer multiple).

        A learned, local blend of the two: prior + g (measured - prior) + correction, with the
        gain g in (0, 1) high where the counts are trustworthy and low where photon noise rules.
        """
        factor = fine.shape[-1] // recon.shape[-1]
        prior = nn.functional.interpolate(recon[:, None], scale_factor=factor, mode="nearest")
        gain_logit, correction = self.refine(torch.cat([fine, prior], dim=1)).unbind(1)
        measured = fine[:, 0]
        prior = prior[:, 0]
        return prior + torch.sigmoid(gain_logit) * (measured - prior) + correction

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 8, 128, 128) -> (z_identity (N, Di), z_noise (N, Dn))."""
        f4, noise_in = self.features(x)
        return self.to_identity(f4), self.to_noise(noise_in)

    @staticmethod
    def noise_features(x, f1, f2, f3, f4) -> torch.Tensor:
        """What the noise branch sees: pooled input and early features, and the 8 x 8 map."""
        # max / min / mean pooling keeps single-pixel artefacts and dark shadows; the 8 x 8 map
        # keeps where they are (a beamstop shadow off its place, a streak through the beam)
        # (global max pooling, not amax over (2, 3): 3x faster on channels-last CPU tensors)
        pooled = []
        for f in (x, f1, f2, f3):
            pooled += [nn.functional.adaptive_max_pool2d(f, 1).flatten(1),
                       -nn.functional.adaptive_max_pool2d(-f, 1).flatten(1),
                       f.mean(dim=(2, 3))]
        # frame totals on a log scale: a few dozen dead pixels or track pixels in a million
        # are a mean of 1e-4 per block, too small to see, but a clear log-count
        pooled.append(torch.log1p(x.clamp_min(0).sum(dim=(2, 3))))
        return torch.cat(pooled + [f4.flatten(1)], dim=1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f4, noise features): the inputs of the identity and noise branches."""
        f1 = self.stem(x)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        f4 = self.block4(f3)
        return f4, self.noise_features(x, f1, f2, f3, f4)

    def decode(self, z_id: torch.Tensor) -> torch.Tensor:
        c = self.config.base_channels
        h = self.from_identity(z_id).view(-1, 4 * c, 8, 8)
        return self.decoder(h)[:, 0]

    def forward(self, x: torch.Tensor) -> DAEOutput:
        z_id, z_noise = self.encode(x)
        sizes = self.size_head(z_id)
        recon = self.decode(z_id)
        if self.config.align_recon:
            log_i, weight = pooled_level(x)
            recon = recon + level_offset(recon, log_i, weight)[:, None, None]
        return DAEOutput(
            z_identity=z_id,
            z_noise=z_noise,
            recon=recon,
            noise_logits=self.noise_head(z_noise),
            structure_logits=self.structure_head(z_id),
            log_radius=sizes[:, 0],
            log_distance=sizes[:, 1],
        )
