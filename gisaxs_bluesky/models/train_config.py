"""Settings of `gisaxs-bluesky train` (recorded in the card): epochs, batches, loss weights,
the noise branch's refit, precision."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_identities: int = 32  # each identity brings all its noisy frames to the batch
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    w_recon: float = 10.0
    w_noise: float = 3.0
    w_structure: float = 1.0
    w_size: float = 4.0
    w_consistency: float = 1.0
    w_denoise: float = 10.0
    denoise_crop: int = 64  # the denoiser trains on random crops of the 256 x 256 frames
    # the noise branch is refit on frozen features after the joint epochs (noise_refit_epochs),
    # at the model's size (ModelConfig.noise_hidden / noise_dim); during the joint epochs it is
    # this small, so that it cannot memorise the training frames and the shared encoder must
    # carry the noise kinds in features that generalise (a full-size branch there learnt the
    # training frames' beamstop shadows: val beamstop F1 0.50 instead of 0.80)
    noise_refit_epochs: int = 40
    joint_noise_hidden: int = 64
    joint_noise_dim: int = 8
    # "auto": float16 autocast on CUDA, bfloat16 autocast on CPUs that compute it natively
    # (AVX512-BF16 / AMX: ~25 % faster epochs), else float32; or "fp32", "bf16", "fp16"
    precision: str = "auto"
    # q-grid training: this fraction of the frames loses part of its q coverage (a smaller
    # detector, a larger beamstop, a gap), renormalised as q_inputs would; the consistency
    # loss then pulls one sample's latents together whatever part of the grid is seen
    coverage_dropout: float = 0.0
    num_threads: int | None = None
