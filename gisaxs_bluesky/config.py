"""Numbers that matter, in one place: model resolution, latent sizes, binning thresholds."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["PreprocessConfig", "ModelConfig", "BinnerConfig"]


@dataclass(frozen=True)
class PreprocessConfig:
    """How a detector frame becomes model input.

    Frames are reduced to ``out_shape`` by masked block means (any input size), divided by the
    frame's median block mean (dose normalisation) and log-compressed: x = log1p(I / median).
    Pixels < 0 (Pilatus -1 gaps, -2 bad) and non-finite pixels are masked, as are ``mask`` pixels.
    """

    out_shape: tuple[int, int] = (128, 128)
    fine_shape: tuple[int, int] = (256, 256)  # resolution of the denoised frame
    min_valid_fraction: float = 0.25  # a block with fewer valid pixels counts as masked

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the denoising autoencoder (kept in every checkpoint card)."""

    in_channels: int = 8  # see gisaxs_bluesky.models.preprocess.CHANNELS
    base_channels: int = 16
    identity_dim: int = 16  # latent part that carries structure / radius / distance
    noise_dim: int = 16  # latent part that carries the noise kinds (8 was a bottleneck for 10)
    noise_hidden: int = 256  # hidden layer between the pooled features and the noise latent
    n_noise_kinds: int = 10
    n_structures: int = 5
    refine_channels: int = 16  # the denoiser that refines the decoder's pattern at 256 x 256
    # the decoder's pattern is shifted (in log intensity) onto the frame's own level over the
    # valid blocks, and trained shift-free: the identity latent then need not carry the dose
    # scale, which on the q grid depends on how much of it the detector covers
    align_recon: bool = False

    @property
    def latent_dim(self) -> int:
        return self.identity_dim + self.noise_dim

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BinnerConfig:
    """Online binning in the identity latent space.

    A frame joins the nearest bin when its distance is below ``join_radius`` (in units of the
    calibrated within-identity spread). Its outlier score is the larger of recon_error /
    recon_threshold and (distance to the nearest of ``n_reference`` centres of simulated
    latents) / reference_threshold; above 1 means outlier. The quantiles set how many clean
    simulated frames each part flags (recon 0.5 %, reference 1 % of samples never seen).
    """

    join_radius: float = 2.0  # two frames of one identity can sit 2 spreads apart
    recon_quantile: float = 0.995
    spread_quantile: float = 0.995
    reference_quantile: float = 0.99
    n_reference: int = 64
    centroid_momentum: float = 0.0  # 0: running mean; >0: exponential moving average

    def to_dict(self) -> dict:
        return asdict(self)
