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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import ModelConfig, PreprocessConfig
from ..sim.noise import NOISE_KINDS
from ..sim.sample import STRUCTURES
from .checkpoint import file_sha256, load_checkpoint, save_checkpoint
from .dae import GisaxsDAE
from .inference import resolve_device
from .losses import training_losses
from .refit import refit_noise_head, train_denoiser
from .steps import Precision, add_losses, optimizer_step, start_run
from .train_config import TrainConfig
from .training_data import TrainingData
from .validation import calibrate_binner, validation_metrics

__all__ = ["train", "add_arguments", "run"]

log = logging.getLogger(__name__)


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
    rng = start_run(cfg.seed, cfg.num_threads)
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
    precision = Precision(cfg.precision, dev)
    log.info("training on %s with %s", dev, precision)
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
            with precision.autocast():
                losses = training_losses(model, data, idx, cfg, dev,
                                         flip=bool(rng.random() < 0.5), rng=rng)
            optimizer_step(losses["total"], optimizer, scheduler, precision.scaler)
            add_losses(sums, losses)
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
    parser.add_argument("--coverage-dropout", type=float, default=TrainConfig.coverage_dropout,
                        help="q-grid sets: the fraction of frames that lose part of their q "
                        "coverage in training (a smaller detector, a beamstop, a gap)")
    parser.add_argument("--w-consistency", type=float, default=TrainConfig.w_consistency,
                        help="weight of the loss that pulls one sample's identity latents "
                        "together (over its noise and, with several instruments, geometry)")
    parser.add_argument("--align-recon", action="store_true",
                        help="the decoder's pattern is put on the frame's own level and "
                        "trained shift-free (the identity latent need not carry the dose "
                        "scale; recommended for q-grid sets)")
    parser.add_argument("--name", default="gisaxs-dae-small")
    parser.add_argument("--version", default=None)


def run(args: argparse.Namespace) -> int:
    if args.denoiser_from:
        card = train_denoiser(args.denoiser_from, args.data, args.out, epochs=args.epochs,
                              seed=args.seed, device=args.device)
    else:
        cfg = TrainConfig(epochs=args.epochs, batch_identities=args.batch_identities,
                          lr=args.lr, seed=args.seed, noise_refit_epochs=args.noise_refit_epochs,
                          precision=args.precision, coverage_dropout=args.coverage_dropout,
                          w_consistency=args.w_consistency)
        if not 0 <= cfg.coverage_dropout <= 1:
            raise SystemExit(f"--coverage-dropout {cfg.coverage_dropout} must lie in [0, 1]")
        model_config = ModelConfig(align_recon=True) if args.align_recon else None
        card = train(args.data, args.out, val_path=args.val, calibration_path=args.calibration,
                     config=cfg, model_config=model_config, device=args.device,
                     resume=args.resume, name=args.name, version=args.version)
    if args.export:
        model, card, _ = load_checkpoint(args.out)
        card = save_checkpoint(args.export, model, {k: v for k, v in card.items() if k != "sha256"})
        print(f"exported weights to {args.export} ({Path(args.export).stat().st_size / 1e6:.1f} MB)")
    print(json.dumps({"checkpoint": str(args.out), "sha256": card.get("sha256"),
                      "metrics": card.get("metrics", {})}, indent=2))
    return 0
