"""The denoising autoencoder: encoder -> [identity | noise] latent -> decoder and heads."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig

__all__ = ["GisaxsDAE", "DAEOutput"]


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
    """Convolutional DAE for (6, 128, 128) inputs; reconstructs (64, 64) clean log intensity.

    The decoder sees only the identity part of the latent, so the clean pattern must be
    recoverable from identity alone; the noise classifier sees only the noise part, which is
    fed by pooled early features where single hot pixels and zingers are still visible.
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
        pooled = 3 * (c + 2 * c + 4 * c) + config.in_channels * 3
        self.to_noise = nn.Sequential(
            nn.Linear(pooled + self.flat_dim, 64), nn.SiLU(), nn.Linear(64, config.noise_dim)
        )
        self.noise_head = nn.Linear(config.noise_dim, config.n_noise_kinds)
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

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 6, 128, 128) -> (z_identity (N, Di), z_noise (N, Dn))."""
        f1 = self.stem(x)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        f4 = self.block4(f3)
        z_id = self.to_identity(f4)
        # max / min / mean pooling keeps single-pixel artefacts and dark shadows; the 8 x 8 map
        # keeps where they are (a beamstop shadow off its place, a streak through the beam)
        pooled = []
        for f in (x, f1, f2, f3):
            pooled += [f.amax(dim=(2, 3)), f.amin(dim=(2, 3)), f.mean(dim=(2, 3))]
        z_noise = self.to_noise(torch.cat(pooled + [f4.flatten(1)], dim=1))
        return z_id, z_noise

    def decode(self, z_id: torch.Tensor) -> torch.Tensor:
        c = self.config.base_channels
        h = self.from_identity(z_id).view(-1, 4 * c, 8, 8)
        return self.decoder(h)[:, 0]

    def forward(self, x: torch.Tensor) -> DAEOutput:
        z_id, z_noise = self.encode(x)
        sizes = self.size_head(z_id)
        return DAEOutput(
            z_identity=z_id,
            z_noise=z_noise,
            recon=self.decode(z_id),
            noise_logits=self.noise_head(z_noise),
            structure_logits=self.structure_head(z_id),
            log_radius=sizes[:, 0],
            log_distance=sizes[:, 1],
        )
