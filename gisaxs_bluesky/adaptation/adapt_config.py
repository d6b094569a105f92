"""Settings of `gisaxs-bluesky adapt` (recorded in the card) and which parts of the model learn."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .calibration import CalibrationConfig

__all__ = ["TRAINABLE", "AdaptConfig"]

#: the modules of GisaxsDAE that learn, per AdaptConfig.trainable (None: all)
TRAINABLE = {
    "all": None,
    "identity": ("to_identity",),
    "decoder+identity": ("to_identity", "from_identity", "decoder", "refine"),
    "decoder": ("from_identity", "decoder", "refine"),
}

@dataclass(frozen=True)
class AdaptConfig:
    """Settings of :func:`adapt` (recorded in the card)."""

    split_fraction: float = 0.5  # p of the binomial thinning
    thinnings: int = 2  # independent splits per frame (epoch e trains on split e % thinnings)
    epochs: int = 3
    batch_frames: int = 8  # real frames per step, each with its two halves
    anchor_identities: int = 64  # simulated anchor set: identities x 2 frames
    anchor_batch_identities: int = 4  # anchor identities per step (2 frames each)
    lr: float = 3e-4
    weight_decay: float = 1e-4
    w_n2n_decoder: float = 10.0  # as train's w_recon
    w_n2n_denoiser: float = 10.0  # as train's w_denoise
    w_identity: float = 1.0
    w_anchor: float = 1.0
    w_base: float = 0.0  # L2-SP: sum of squared weight changes from the base model
    # anchor frames' identity latents stay where the base model put them (over its spread^2):
    # the structure / size heads read them, so this keeps those heads' inputs
    w_distill: float = 30.0
    # which parts learn: "decoder+identity" (identity MLP, decoder, denoiser; the conv trunk,
    # the noise branch and the heads stay, so noise kinds are untouched), "decoder" (decoder
    # and denoiser only: latents and noise kinds untouched), "identity" (the identity MLP only:
    # the decoder and the denoiser stay the base model's) or "all"
    trainable: str = "decoder+identity"
    denoise_crop: int = 64
    # fraction of the frames left out of the fine-tuning: the outlier thresholds are their
    # quantiles (frames trained on may reconstruct better than the beamtime's next ones); 0:
    # none, the thresholds from all frames (on the shared real frames' variants 0 flagged
    # 1.2 % of held-out variants, 0.2 flagged 3.8 %: bench_noise_transfer.py)
    threshold_holdout: float = 0.0
    detector: str = "auto"  # "auto" | "counting" | "integrating"
    gain_frames: int = 4  # frames per shape whose single-frame gain estimates are averaged
    seed: int = 0
    precision: str = "auto"  # as TrainConfig.precision
    num_threads: int | None = None
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if not 0 < self.split_fraction < 1:
            raise ValueError(f"split_fraction={self.split_fraction} must be in (0, 1)")
        for name in ("thinnings", "epochs", "batch_frames", "anchor_batch_identities",
                     "gain_frames"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.threshold_holdout < 1:
            raise ValueError(f"threshold_holdout={self.threshold_holdout} must be in [0, 1)")
        if self.anchor_identities < 0:
            raise ValueError(f"anchor_identities={self.anchor_identities} must be >= 0")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable={self.trainable!r}: expected one of {sorted(TRAINABLE)}")
        if self.detector not in ("auto", "counting", "integrating"):
            raise ValueError(f"detector={self.detector!r}: expected auto, counting or integrating")
