"""A real (tiny) training run: simulate, train, resume, and beat chance on noise kinds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gisaxs_bluesky.models import load_encoder
from gisaxs_bluesky.models.dataset import DatasetSpec, generate
from gisaxs_bluesky.models.refit import refit_noise_head, train_denoiser
from gisaxs_bluesky.models.steps import autocast_dtype
from gisaxs_bluesky.models.train import train
from gisaxs_bluesky.models.train_config import TrainConfig
from gisaxs_bluesky.models.training_data import TrainingData
from gisaxs_bluesky.models.validation import predict


def auroc(score: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve by ranks (ties averaged)."""
    order = np.argsort(score)
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    for value in np.unique(score):
        same = score == value
        ranks[same] = ranks[same].mean()
    pos = truth.sum()
    neg = len(truth) - pos
    return float((ranks[truth].sum() - pos * (pos + 1) / 2) / (pos * neg))


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    kw = dict(frames_per_identity=2, compute_binning=12, p_kind=0.5)
    train_path = generate(root / "train.h5", DatasetSpec(n_identities=250, seed=1, **kw),
                          workers=2, progress=False)
    val_path = generate(root / "val.h5", DatasetSpec(n_identities=80, seed=2, **kw),
                        workers=2, progress=False)
    return train_path, val_path


@pytest.mark.slow  # training: `make test-all`
def test_tiny_model_beats_chance_on_noise_kinds_and_resumes(tiny_sets, tmp_path):
    train_path, val_path = tiny_sets
    out = tmp_path / "tiny.pt"
    # the noise head is what this test is about: reconstruction weighted down
    cfg = TrainConfig(epochs=2, batch_identities=10, lr=1e-3, seed=0, w_recon=0.3)
    train(train_path, out, config=cfg, device="cpu", progress=False)
    card_2 = json.loads(out.with_suffix(".json").read_text())
    assert card_2["epochs_done"] == 2 and len(card_2["history"]) == 2
    # resume to 12 epochs: continues from epoch 2, keeps the history
    cfg = TrainConfig(epochs=12, batch_identities=10, lr=1e-3, seed=0, w_recon=0.3)
    card = train(train_path, out, val_path=val_path, config=cfg, device="cpu", resume=True,
                 progress=False)
    assert card["epochs_done"] == 12 and [h["epoch"] for h in card["history"]] == list(range(1, 13))
    first, last = card["history"][0]["loss"], card["history"][-1]["loss"]
    assert last["total"] < first["total"] and last["denoise"] < first["denoise"]
    assert card["binner"]["spread"] > 0 and card["binner"]["recon_threshold"] > 0
    assert len(card["sha256"]) == 64
    # held-out noise-kind AUROC: chance is 0.5
    encoder = load_encoder(out, device="cpu")
    val = TrainingData(val_path)
    p = predict(encoder.model, val.inputs, encoder.device)
    truth = val.noise.numpy() > 0.5
    scores = [auroc(p["noise_prob"][:, k], truth[:, k]) for k in range(truth.shape[1])
              if 3 <= truth[:, k].sum() <= len(truth) - 3]
    assert len(scores) >= 6
    assert np.mean(scores) > 0.6, scores


@pytest.mark.slow  # training: `make test-all`
def test_denoiser_fine_tune_changes_only_the_denoiser(tiny_sets, tmp_path):
    train_path, val_path = tiny_sets
    base = tmp_path / "base.pt"
    train(train_path, base, config=TrainConfig(epochs=1, batch_identities=10, seed=0),
          device="cpu", progress=False)
    tuned = tmp_path / "tuned.pt"
    card = train_denoiser(base, val_path, tuned, epochs=2, crop=64, device="cpu",
                          progress=False)
    history = card["denoiser_training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2] and len(card["sha256"]) == 64
    assert all(np.isfinite(h["loss_vs_block_means"]) for h in history)
    a, b = load_encoder(base, device="cpu"), load_encoder(tuned, device="cpu")
    val = TrainingData(val_path)
    x, fine = val.inputs[:6].float().numpy(), val.fine[:6].float().numpy()
    out_a = a.encode_preprocessed(x, fine=fine, return_denoised=True)
    out_b = b.encode_preprocessed(x, fine=fine, return_denoised=True)
    # latents, noise kinds and reconstruction errors are untouched; the denoised frames moved
    for key in ("latent", "noise_prob", "recon_error"):
        np.testing.assert_array_equal(out_a[key], out_b[key])
    assert out_b["denoised"].shape == (6, 256, 256)
    assert np.abs(out_a["denoised"] - out_b["denoised"]).max() > 1e-3


@pytest.mark.slow  # training: `make test-all`
def test_noise_branch_refit_changes_only_the_noise_branch(tiny_sets, tmp_path):
    train_path, val_path = tiny_sets
    base = tmp_path / "base.pt"
    cfg = TrainConfig(epochs=1, batch_identities=10, seed=0, noise_refit_epochs=0)
    card = train(train_path, base, config=cfg, device="cpu", progress=False)
    assert "noise_head_training" not in card
    encoder = load_encoder(base, device="cpu")
    model, device = encoder.model, encoder.device
    data, val = TrainingData(train_path), TrainingData(val_path)
    before = predict(model, val.inputs, device)
    report = refit_noise_head(model, data, device, epochs=15, progress=False)
    after = predict(model, val.inputs, device)
    assert report["epochs"] == 15 and report["frames"] == 2 * len(data)  # + mirror images
    assert report["loss"][-1] < 0.8 * report["loss"][0]
    # identity, reconstruction and sizes untouched; the noise kinds moved and beat chance
    for key in ("z_identity", "recon", "recon_error", "structure", "radius", "distance"):
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert np.abs(before["noise_prob"] - after["noise_prob"]).max() > 0.05
    truth = val.noise.numpy() > 0.5
    scores = [auroc(after["noise_prob"][:, k], truth[:, k]) for k in range(truth.shape[1])
              if 3 <= truth[:, k].sum() <= len(truth) - 3]
    assert len(scores) >= 6 and np.mean(scores) > 0.7, scores

    # as the last phase of `train`: recorded in the card, metrics from after the refit
    out = tmp_path / "refit.pt"
    cfg = TrainConfig(epochs=1, batch_identities=10, seed=0, noise_refit_epochs=3)
    card = train(train_path, out, val_path=val_path, config=cfg, device="cpu", progress=False)
    assert card["noise_head_training"]["epochs"] == 3
    assert card["metrics"] == card["noise_head_training"]["val"]
    assert set(card["metrics"]["noise_f1"]) == set(card["noise_kinds"])
    # the joint epochs ran with the small branch; the refit gave the model its full-size one
    assert card["history"][-1]["val"] != card["metrics"]
    assert (card["model"]["noise_hidden"], card["model"]["noise_dim"]) == (256, 16)
    refit = load_encoder(out, device="cpu")
    assert refit.latent_dim == 16 + 16 and len(refit.encode(np.ones((1, 160, 150))).latent[0]) == 32


def test_precision_choices():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("auto", cpu) in (None, torch.bfloat16)  # bf16 where the CPU has it
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="precision='half'"):
        autocast_dtype("half", cpu)
