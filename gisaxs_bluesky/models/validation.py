"""A trained model on held-out frames: outputs, validation metrics, the binner's calibration."""

from __future__ import annotations

import numpy as np
import torch

from ..binning import OnlineBinner
from ..config import BinnerConfig
from ..sim.noise import NOISE_KINDS
from .dae import GisaxsDAE
from .inference import recon_error
from .training_data import LATTICE, TrainingData

__all__ = ["predict", "validation_metrics", "calibrate_binner"]


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
