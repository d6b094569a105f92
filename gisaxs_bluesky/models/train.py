"""Training: `gisaxs-bluesky train` with progress, per-epoch checkpoints, resume, fixed seeds.

Jointly optimises the clean-pattern reconstruction (from the identity latent), the noise-kind
classifier (from the noise latent), structure / radius / distance heads (identity latent) and a
consistency term pulling together identity latents of the same sample under different noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from ..binning import OnlineBinner
from ..config import BinnerConfig, ModelConfig, PreprocessConfig
from ..sim.noise import NOISE_KINDS
from ..sim.sample import STRUCTURES
from .checkpoint import file_sha256, load_checkpoint, save_checkpoint
from .dae import GisaxsDAE
from .inference import recon_error, resolve_device
from .preprocess import N_CHANNELS

__all__ = ["TrainConfig", "TrainingData", "train", "train_denoiser", "refit_noise_head",
           "autocast_dtype", "add_arguments", "run"]

log = logging.getLogger(__name__)
LATTICE = torch.tensor([s not in ("spheres_dilute", "cylinders_dilute") for s in STRUCTURES])


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
    num_threads: int | None = None


class TrainingData:
    """A binned simulated set (from `gisaxs-bluesky simulate`) held in memory as tensors."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"training data {path} does not exist (make it with `gisaxs-bluesky simulate`)")
        with h5py.File(path, "r") as f:
            if "inputs" not in f:
                raise ValueError(f"{path} holds full frames; training needs a binned set (no --full)")
            self.inputs = torch.from_numpy(f["inputs"][:])
            if self.inputs.shape[1] != N_CHANNELS:
                raise ValueError(f"{path} holds {self.inputs.shape[1]}-channel inputs; this version "
                                 f"needs {N_CHANNELS}: simulate the set again")
            # the denoiser's 256 x 256 frames (sets made before it existed lack them)
            self.fine = torch.from_numpy(f["fine"][:]) if "fine" in f else None
            self.fine_target = torch.from_numpy(f["fine_target"][:]) if "fine" in f else None
            self.target = torch.from_numpy(f["target"][:])
            self.noise = torch.from_numpy(f["noise_vector"][:])
            self.structure = torch.from_numpy(f["structure_index"][:])
            self.radius = torch.from_numpy(f["radius_nm"][:])
            self.distance = torch.from_numpy(f["distance_nm"][:])
            self.identity = torch.from_numpy(f["identity"][:])
            self.dose = torch.from_numpy(f["dose_counts"][:])
            self.description = {k: (v.item() if hasattr(v, "item") else str(v))
                                for k, v in f.attrs.items() if k not in ("noise_kinds", "structures")}
        self.path = path
        ids, self.identity_index = torch.unique(self.identity, return_inverse=True)
        self.n_identities = len(ids)
        order = torch.argsort(self.identity_index, stable=True)
        counts = torch.bincount(self.identity_index)
        self.frames_of = list(torch.split(order, counts.tolist()))

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, identities: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.frames_of[i] for i in identities.tolist()])


def _denoise_errors(model: GisaxsDAE, data: TrainingData, idx: torch.Tensor,
                    prior: torch.Tensor, size: int, device: torch.device, flip: bool,
                    rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Per-frame masked MSE of the denoiser and of the plain block means on one random crop
    (the same for the whole batch), and the number of valid blocks. ``prior`` is the decoder
    output of the frames, mirrored already when ``flip``."""
    fine, target = data.fine[idx], data.fine_target[idx]
    if flip:
        fine, target = fine.flip(-1), target.flip(-1)
    factor = fine.shape[-1] // prior.shape[-1]
    r, c = (int(v) * factor for v in rng.integers(0, (fine.shape[-1] - size) // factor + 1, 2))
    fine = fine[..., r : r + size, c : c + size].to(device).float()
    target = target[..., r : r + size, c : c + size].to(device).float()
    prior = prior[..., r // factor : (r + size) // factor, c // factor : (c + size) // factor]
    out = model.denoise(prior.to(device), fine).float()
    weight = ((fine[:, 1] > 0) & (target > 0)).float()
    n = weight.sum(dim=(1, 2))
    err = ((out - target) ** 2 * weight).sum(dim=(1, 2)) / n.clamp_min(1)
    base = ((fine[:, 0] - target) ** 2 * weight).sum(dim=(1, 2)) / n.clamp_min(1)
    return err, base, n


def _losses(model: GisaxsDAE, data: TrainingData, idx: torch.Tensor, cfg: TrainConfig,
            device: torch.device, flip: bool,
            rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    # channels-last: oneDNN's convolutions (forward and backward) run ~10 % faster on CPU
    x = data.inputs[idx].to(device).float().contiguous(memory_format=torch.channels_last)
    target = data.target[idx].to(device).float()
    if flip:  # GISAXS is left-right symmetric about the beam; mirrored frames are physical too
        x, target = x.flip(-1), target.flip(-1)
    out = {k: v.float() for k, v in model(x).items()}  # losses in fp32 under autocast too
    weight = (target > 0).float()
    recon = ((out["recon"] - target) ** 2 * weight).sum() / weight.sum().clamp_min(1)
    noise = F.binary_cross_entropy_with_logits(out["noise_logits"], data.noise[idx].to(device))
    structure_idx = data.structure[idx].to(device)
    structure = F.cross_entropy(out["structure_logits"], structure_idx)
    log_r = torch.log(data.radius[idx].to(device))
    log_d = torch.log(data.distance[idx].to(device))
    size_r = F.mse_loss(out["log_radius"], log_r)
    lattice = LATTICE.to(device)[structure_idx].float()
    size_d = ((out["log_distance"] - log_d) ** 2 * lattice).sum() / lattice.sum().clamp_min(1)
    # consistency: identity latents of one sample under different noise should coincide,
    # measured relative to the spread between samples so that shrinking the latent cannot cheat
    z = out["z_identity"].float()
    ident = data.identity_index[idx].to(device)
    same = (ident[:, None] == ident[None, :]).float() - torch.eye(len(idx), device=device)
    d2 = torch.cdist(z, z) ** 2
    within = (d2 * same).sum() / same.sum().clamp_min(1)
    between = (d2 * (1 - same)).sum() / (1 - same).sum().clamp_min(1)
    consistency = within / between.clamp_min(1e-6)
    total = (cfg.w_recon * recon + cfg.w_noise * noise + cfg.w_structure * structure
             + cfg.w_size * (size_r + size_d) + cfg.w_consistency * consistency)
    losses = {"recon": recon, "noise": noise, "structure": structure, "radius": size_r,
              "distance": size_d, "consistency": consistency}
    if data.fine is not None and cfg.w_denoise > 0:
        err, _, n = _denoise_errors(model, data, idx, out["recon"].detach(), cfg.denoise_crop,
                                    device, flip, rng or np.random.default_rng())
        losses["denoise"] = (err * n).sum() / n.sum().clamp_min(1)
        total = total + cfg.w_denoise * losses["denoise"]
    return {"total": total, **losses}


@torch.inference_mode()
def predict(model: GisaxsDAE, inputs: torch.Tensor, device: torch.device, batch: int = 256) -> dict:
    """Model outputs for preprocessed inputs, as numpy (used for validation and calibration)."""
    model.eval()
    parts = []
    for start in range(0, len(inputs), batch):
        x = inputs[start : start + batch].to(device).float()
        out = model(x)
        parts.append({
            "z_identity": out["z_identity"], "noise_prob": torch.sigmoid(out["noise_logits"]),
            "structure": out["structure_logits"].argmax(1), "radius": out["log_radius"].exp(),
            "distance": out["log_distance"].exp(), "recon": out["recon"],
            "recon_error": recon_error(out["recon"], x),
        })
    return {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}


def validation_metrics(model: GisaxsDAE, data: TrainingData, device: torch.device) -> dict:
    p = predict(model, data.inputs, device)
    truth = data.noise.numpy() > 0.5
    pred = p["noise_prob"] > 0.5
    f1 = []
    for k in range(truth.shape[1]):
        tp = (pred[:, k] & truth[:, k]).sum()
        denom = pred[:, k].sum() + truth[:, k].sum()
        f1.append(2 * tp / denom if denom else 1.0)
    lattice = LATTICE.numpy()[data.structure.numpy()]
    radius = data.radius.numpy()
    distance = data.distance.numpy()
    return {
        "noise_macro_f1": float(np.mean(f1)),
        "noise_f1": {k: float(v) for k, v in zip(NOISE_KINDS, f1, strict=True)},
        "structure_accuracy": float((p["structure"] == data.structure.numpy()).mean()),
        "radius_rel_rmse": float(np.sqrt(np.mean((p["radius"] / radius - 1) ** 2))),
        "distance_rel_rmse": float(np.sqrt(np.mean(((p["distance"] / distance - 1)[lattice]) ** 2))),
    }


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r}: expected auto, fp32, bf16 or fp16")
    if precision == "fp32":
        return None
    if precision == "fp16" or (precision == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    native = device.type == "cpu" and torch.backends.mkldnn.is_available() and bool(
        getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return torch.bfloat16 if native else None


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
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
        history.append(round(total / steps, 5))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return {"epochs": epochs, "frames": len(features), "lr": lr, "weight_decay": weight_decay,
            "noise_hidden": size[0], "noise_dim": size[1],
            "seconds": round(time.time() - t0, 1), "loss": history}


def calibrate_binner(model: GisaxsDAE, data: TrainingData, device: torch.device,
                     config: BinnerConfig | None = None,
                     clean: TrainingData | None = None) -> OnlineBinner:
    """Spread from held-out frames of known identity; outlier thresholds from clean frames."""
    p = predict(model, data.inputs, device)
    kw = {}
    if clean is not None:
        c = predict(model, clean.inputs, device)
        kw = {"clean_latent": c["z_identity"], "clean_recon_error": c["recon_error"],
              "clean_identity_label": clean.identity.numpy()}
    return OnlineBinner(config).calibrate(p["z_identity"], data.identity.numpy(), p["recon_error"],
                                          **kw)


def train(
    data_path: str | Path,
    out: str | Path,
    *,
    val_path: str | Path | None = None,
    calibration_path: str | Path | None = None,
    config: TrainConfig | None = None,
    model_config: ModelConfig | None = None,
    device: str = "auto",
    resume: bool = False,
    name: str = "gisaxs-dae-small",
    version: str | None = None,
    progress: bool = True,
) -> dict:
    """Train a DAE on a binned simulated set; writes ``out`` (+ .json card) each epoch."""
    cfg = config or TrainConfig()
    out = Path(out)
    dev = resolve_device(device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = TrainingData(data_path)
    val = TrainingData(val_path) if val_path else None
    final_config = model_config or ModelConfig()
    joint_config = final_config
    if cfg.noise_refit_epochs > 0:
        joint_config = dataclasses.replace(final_config, noise_hidden=cfg.joint_noise_hidden,
                                           noise_dim=cfg.joint_noise_dim)
    model = GisaxsDAE(joint_config).to(dev, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(data.n_identities / cfg.batch_identities)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=total_steps,
                                                    pct_start=0.15)
    start_epoch, history = 0, []
    if resume and out.is_file():
        model, card, payload = load_checkpoint(out, map_location=dev)
        model.to(dev)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=total_steps,
                                                        pct_start=0.15)
        if "optimizer" in payload:
            optimizer.load_state_dict(payload["optimizer"])
        extra = payload.get("extra", {})
        start_epoch = int(card.get("epochs_done", 0))
        saved = extra.get("scheduler", {})
        if saved.get("total_steps") == total_steps:
            scheduler.load_state_dict(saved)  # the same schedule, interrupted
        else:  # more epochs than first planned: a fresh one-cycle over the remaining steps
            remaining = max((cfg.epochs - start_epoch) * steps_per_epoch, 1)
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=remaining,
                                                            pct_start=0.05)
        history = list(card.get("history", []))
        rng = np.random.default_rng([cfg.seed, start_epoch])
        log.info("resuming %s at epoch %d of %d", out, start_epoch, cfg.epochs)
    amp_dtype = autocast_dtype(cfg.precision, dev)
    use_amp = amp_dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    log.info("training on %s with %s", dev, "fp32" if amp_dtype is None else
             f"{str(amp_dtype).removeprefix('torch.')} autocast")
    card: dict = {}
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(data.n_identities))
        sums: dict[str, float] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, unit="batch")
        for step in bar:
            ids = order[step * cfg.batch_identities : (step + 1) * cfg.batch_identities]
            idx = data.batch(ids)
            with torch.autocast(dev.type, enabled=use_amp, dtype=amp_dtype or torch.float32):
                losses = _losses(model, data, idx, cfg, dev, flip=bool(rng.random() < 0.5), rng=rng)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(losses['total'].detach()):.3f}")
        epoch_losses = {k: v / steps_per_epoch for k, v in sums.items()}
        entry = {"epoch": epoch + 1, "loss": epoch_losses, "elapsed_s": round(time.time() - t0, 1)}
        if val is not None:
            entry["val"] = validation_metrics(model, val, dev)
        history.append(entry)
        log.info("epoch %d: %s", epoch + 1, json.dumps(entry))
        card = _card(model, data, val, cfg, name, version, history, epoch + 1)
        save_checkpoint(out, model, card, optimizer=optimizer,
                        extra={"scheduler": scheduler.state_dict()})
    if card and cfg.noise_refit_epochs > 0:
        card["noise_head_training"] = refit_noise_head(
            model, data, dev, epochs=cfg.noise_refit_epochs, seed=cfg.seed, progress=progress,
            size=(final_config.noise_hidden, final_config.noise_dim))
        if val is not None:
            card["metrics"] = validation_metrics(model, val, dev)
            card["noise_head_training"]["val"] = card["metrics"]
            log.info("noise branch refit: %s", json.dumps(card["metrics"]))
        # the optimizer's state belongs to the replaced branch: a later --resume starts afresh
        optimizer = None
        save_checkpoint(out, model, card, extra={"scheduler": scheduler.state_dict()})
    if not card:  # nothing left to train (resume of a finished run): recalibrate only
        model, card, _ = load_checkpoint(out, map_location=dev)
        card = {k: v for k, v in card.items() if k != "sha256"}
    if val is not None:
        clean = TrainingData(calibration_path) if calibration_path else None
        binner = calibrate_binner(model.to(dev), val, dev, clean=clean)
        card["binner"] = {**binner.state_dict(), "calibrated_on": [str(val.path)] + (
            [str(clean.path)] if clean else [])}
        card = save_checkpoint(out, model, card, optimizer=optimizer,
                               extra={"scheduler": scheduler.state_dict()})
    else:
        card["sha256"] = file_sha256(out)
    return card


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
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
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
            err, base, _ = _denoise_errors(model, data, idx, pr, crop, dev, flip, rng)
            # relative to what block means alone leave (per frame), so that frames at every
            # dose count alike, not just the starved ones whose errors are largest
            loss = (err / (base + 2e-3)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
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


def _card(model, data, val, cfg, name, version, history, epochs_done) -> dict:
    card = _base_card(model, data, val, cfg, name, version, history, epochs_done)
    if data.description.get("input_mode") == "qgrid":
        # a q-grid model: what grid it reads and which instruments it was trained across
        card["input"] = "qgrid"
        card["qgrid"] = json.loads(data.description["qgrid"])
        card["instruments"] = {"drawn": data.description.get("instruments"),
                               **json.loads(data.description.get("instrument_ranges", "{}"))}
    return card


def _base_card(model, data, val, cfg, name, version, history, epochs_done) -> dict:
    return {
        "name": name,
        "version": version or time.strftime("%Y.%m.%d"),
        "preprocess": PreprocessConfig().to_dict(),
        "noise_kinds": list(NOISE_KINDS),
        "structures": list(STRUCTURES),
        "training_data": {"path": str(data.path), "frames": len(data),
                          "identities": data.n_identities, "spec": data.description},
        "train_config": asdict(cfg),
        "epochs_done": epochs_done,
        "history": history,
        "metrics": history[-1].get("val", {}),
        "torch": str(torch.__version__),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="binned HDF5 set from `gisaxs-bluesky simulate`")
    parser.add_argument("--val", help="held-out binned set (metrics each epoch, binner calibration)")
    parser.add_argument("--calibration", help="clean binned set (photon noise only) for the outlier "
                        "thresholds; default: --val")
    parser.add_argument("--out", required=True, help="checkpoint path (.pt); a .json card is written beside it")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-identities", type=int, default=TrainConfig.batch_identities)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-refit-epochs", type=int, default=TrainConfig.noise_refit_epochs,
                        help="epochs of the noise branch on frozen features after the joint "
                        "epochs (0: none)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default=TrainConfig.precision,
                        choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: fp16 autocast on CUDA, bf16 on CPUs with native bf16 "
                        "(AVX512-BF16/AMX), else fp32")
    parser.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    parser.add_argument("--export", help="also write weights only (no optimizer state), e.g. "
                        "gisaxs_bluesky/models/pretrained/gisaxs-dae-small.pt")
    parser.add_argument("--denoiser-from", metavar="CHECKPOINT",
                        help="fine-tune only the denoiser of CHECKPOINT on --data (a set with "
                        "photon noise only, `simulate --p-kind 0`) and write --out")
    parser.add_argument("--name", default="gisaxs-dae-small")
    parser.add_argument("--version", default=None)


def run(args: argparse.Namespace) -> int:
    if args.denoiser_from:
        card = train_denoiser(args.denoiser_from, args.data, args.out, epochs=args.epochs,
                              seed=args.seed, device=args.device)
    else:
        cfg = TrainConfig(epochs=args.epochs, batch_identities=args.batch_identities,
                          lr=args.lr, seed=args.seed, noise_refit_epochs=args.noise_refit_epochs,
                          precision=args.precision)
        card = train(args.data, args.out, val_path=args.val, calibration_path=args.calibration,
                     config=cfg, device=args.device,
                     resume=args.resume, name=args.name, version=args.version)
    if args.export:
        model, card, _ = load_checkpoint(args.out)
        card = save_checkpoint(args.export, model, {k: v for k, v in card.items() if k != "sha256"})
        print(f"exported weights to {args.export} ({Path(args.export).stat().st_size / 1e6:.1f} MB)")
    print(json.dumps({"checkpoint": str(args.out), "sha256": card.get("sha256"),
                      "metrics": card.get("metrics", {})}, indent=2))
    return 0
