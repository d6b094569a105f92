"""The CUDA path: skipped where torch sees no GPU (CI); run on a GPU machine before a release.

The encoder runs fp16 autocast on CUDA: its latents, bins and outlier scores must agree with
the fp32 CPU encoder on the same frames, and a training run (fp16 + GradScaler) must give a
checkpoint that loads and encodes on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gisaxs_bluesky.models import load_encoder, load_pretrained, make_binner
from gisaxs_bluesky.models.dataset import DatasetSpec, generate
from gisaxs_bluesky.models.steps import autocast_dtype
from gisaxs_bluesky.models.train import train
from gisaxs_bluesky.models.train_config import TrainConfig
from gisaxs_bluesky.sim import NoiseSpec, Sample, simulate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def identity_frames() -> tuple[np.ndarray, np.ndarray]:
    """Three identities x four noise draws of full-size frames, and the identity of each."""
    samples = [Sample(structure="spheres_dilute", radius_nm=4.0),
               Sample(structure="cylinders_hexagonal", radius_nm=6.0, distance_nm=25.0),
               Sample(structure="lamellar", distance_nm=30.0)]
    noise = NoiseSpec(3.0, {"poisson": 1.0, "gaps": 1.0})
    frames, ident = [], []
    for i, sample in enumerate(samples):
        for seed in range(4):
            frames.append(simulate(sample, noise=noise, seed=100 * i + seed,
                                   compute_binning=8).counts)
            ident.append(i)
    return np.stack(frames), np.array(ident)


def test_cuda_encoder_agrees_with_cpu():
    frames, ident = identity_frames()
    cpu, gpu = load_pretrained("cpu"), load_pretrained("cuda")
    assert gpu.device.type == "cuda"
    a, b = cpu.encode(frames, batch_size=4), gpu.encode(frames, batch_size=4)
    assert a.latent.shape == b.latent.shape == (len(frames), cpu.latent_dim)
    assert np.isfinite(b.latent).all() and np.isfinite(b.recon_error).all()
    # fp16 autocast on the GPU vs fp32 on the CPU: close, not equal
    scale = np.abs(a.latent).max()
    assert np.abs(a.latent - b.latent).max() < 0.02 * scale
    np.testing.assert_allclose(b.recon_error, a.recon_error, rtol=0.05)
    assert (a.structure == b.structure).all()
    # the same binner settings put the same frames together on both devices
    bins = [make_binner(enc).assign(res.identity_latent, res.recon_error).bin_id
            for enc, res in ((cpu, a), (gpu, b))]
    assert ((bins[0][:, None] == bins[0][None, :]) == (bins[1][:, None] == bins[1][None, :])).all()
    # identity: frames of one sample are closer to each other than to the others
    z = b.identity_latent
    d = np.linalg.norm(z[:, None] - z[None, :], axis=-1)
    same = ident[:, None] == ident[None, :]
    assert d[same].max() < d[~same].min()


def test_cuda_denoised_frames_match_cpu():
    frames, _ = identity_frames()
    a = load_pretrained("cpu").encode(frames[:4], return_denoised=True)
    b = load_pretrained("cuda").encode(frames[:4], return_denoised=True)
    assert a.denoised.shape == b.denoised.shape
    assert np.abs(a.denoised - b.denoised).max() < 0.05 * np.abs(a.denoised).max()


def test_cuda_training_fp16_gives_a_checkpoint_the_cpu_loads(tmp_path):
    assert autocast_dtype("auto", torch.device("cuda")) == torch.float16
    spec = DatasetSpec(n_identities=40, frames_per_identity=2, compute_binning=12, p_kind=0.5,
                       seed=3)
    data = generate(tmp_path / "train.h5", spec, workers=2, progress=False)
    out = tmp_path / "gpu.pt"
    card = train(data, out, config=TrainConfig(epochs=2, batch_identities=10, seed=0),
                 device="cuda", progress=False)
    assert card["epochs_done"] == 2
    assert all(np.isfinite(h["loss"]["total"]) for h in card["history"])
    enc = load_encoder(out, device="cpu")
    res = enc.encode(np.ones((2, 160, 150)))
    assert res.latent.shape == (2, enc.latent_dim) and np.isfinite(res.latent).all()
