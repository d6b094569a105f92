"""Refits of one part of a trained model: the noise branch on frozen features, the denoiser on a
set with photon noise only."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F  # noqa: N812 - torch's own spelling
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .dae import GisaxsDAE
from .inference import resolve_device
from .losses import denoise_errors
from .steps import optimizer_step, start_run
from .training_data import TrainingData
from .validation import predict

__all__ = ["refit_noise_head", "train_denoiser"]

log = logging.getLogger(__name__)


def refit_noise_head(model: GisaxsDAE, data: TrainingData, device: torch.device, *,
                     epochs: int = 40, batch: int = 128, lr: float = 2e-3,
                     weight_decay: float = 1e-3, seed: int = 0, progress: bool = True,
                     size: tuple[int, int] | None = None) -> dict:
    """Refit the noise branch (``to_noise`` and ``noise_head``, from fresh weights; of
    ``size`` = (noise_hidden, noise_dim) if given) on the frozen encoder's features of
    ``data`` and its mirror image.

    The joint epochs shape the encoder's features for every task at once; the noise kinds are
    learnt last and slowest there. With the features fixed, the branch trains in seconds per
    epoch, so it gets many more epochs than the joint training could afford. Nothing else
    changes: identity latents, reconstructions, bins and outlier scores stay as they are.
    """
    t0 = time.time()
    model.eval()
    feats = []
    with torch.inference_mode():
        for flip in (False, True):
            for start in range(0, len(data), 256):
                x = data.inputs[start : start + 256].to(device).float()
                feats.append(model.features(x.flip(-1) if flip else x)[1].float())
    features = torch.cat(feats).clone()  # out of inference mode, so autograd can use it
    labels = torch.cat([data.noise, data.noise]).to(device).float()
    torch.manual_seed(seed)
    size = size or (model.config.noise_hidden, model.config.noise_dim)
    model.replace_noise_branch(*size)
    branch = [*model.to_noise, model.noise_head]
    params = [p for layer in branch for p in layer.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = max(len(features) // batch, 1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(epochs), desc="noise branch", disable=not progress, unit="epoch")
    for epoch in bar:
        order = torch.randperm(len(features), generator=gen)
        total = 0.0
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch].to(device)
            logits = model.noise_head(model.to_noise(features[idx]))
            loss = F.binary_cross_entropy_with_logits(logits, labels[idx])
            optimizer_step(loss, optimizer, scheduler)
            total += float(loss.detach())
        history.append(round(total / steps, 5))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return {"epochs": epochs, "frames": len(features), "lr": lr, "weight_decay": weight_decay,
            "noise_hidden": size[0], "noise_dim": size[1],
            "seconds": round(time.time() - t0, 1), "loss": history}


def train_denoiser(
    checkpoint: str | Path,
    data_path: str | Path,
    out: str | Path,
    *,
    epochs: int = 10,
    batch_frames: int = 32,
    crop: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Fine-tune only the denoiser of ``checkpoint`` on ``data_path`` and write ``out``.

    Meant for a set with photon noise only (``simulate --p-kind 0``): the joint training asks
    the denoiser to remove artefacts too, which costs it on frames that have none. Everything
    else (encoder, decoder, heads, binner calibration) stays as it is, so latents, bins and
    outlier scores do not change.
    """
    dev = resolve_device(device)
    rng = start_run(seed)
    model, card, _ = load_checkpoint(checkpoint, map_location=dev)
    model.to(dev)
    data = TrainingData(data_path)
    if data.fine is None:
        raise ValueError(f"{data_path} has no 256 x 256 frames ('fine'): simulate it again")
    prior = torch.from_numpy(predict(model, data.inputs, dev)["recon"])
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.refine.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = math.ceil(len(data) / batch_frames)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps)
    history = []
    model.refine.train()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(data)))
        total = 0.0
        bar = tqdm(range(steps), desc=f"denoiser {epoch + 1}/{epochs}", disable=not progress,
                   unit="batch")
        for step in bar:
            idx = order[step * batch_frames : (step + 1) * batch_frames]
            flip = bool(rng.random() < 0.5)
            pr = prior[idx].flip(-1) if flip else prior[idx]
            err, base, _ = denoise_errors(model, data, idx, pr, crop, dev, flip, rng)
            # relative to what block means alone leave (per frame), so that frames at every
            # dose count alike, not just the starved ones whose errors are largest
            loss = (err / (base + 2e-3)).mean()
            optimizer_step(loss, optimizer, scheduler)
            total += float(loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        history.append({"epoch": epoch + 1, "loss_vs_block_means": total / steps})
        log.info("denoiser epoch %d: error / block-mean error %.4f", epoch + 1, total / steps)
    for p in model.parameters():
        p.requires_grad_(True)
    card = {k: v for k, v in card.items() if k != "sha256"}
    card["denoiser_training"] = {
        "from": str(checkpoint), "path": str(data.path), "frames": len(data),
        "spec": data.description, "epochs": epochs, "crop": crop, "history": history,
    }
    return save_checkpoint(out, model, card)
