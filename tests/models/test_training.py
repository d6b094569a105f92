"""A real (tiny) training run: simulate, train, resume, and beat chance on noise kinds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gisaxs_bluesky.models import load_encoder
from gisaxs_bluesky.models.train import TrainConfig, TrainingData, predict, train
from gisaxs_bluesky.sim.dataset import DatasetSpec, generate


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
    assert card["history"][-1]["loss"]["total"] < card["history"][0]["loss"]["total"]
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
