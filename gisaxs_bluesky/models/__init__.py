"""The denoising autoencoder: preprocessing, model, checkpoints, training and inference."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .dae import GisaxsDAE
from .inference import (
    EncodeResult,
    Encoder,
    load_encoder,
    load_pretrained,
    pretrained_path,
    resolve_device,
)
from .preprocess import preprocess, preprocess_batch

__all__ = [
    "CheckpointError",
    "EncodeResult",
    "Encoder",
    "GisaxsDAE",
    "load_checkpoint",
    "load_encoder",
    "load_pretrained",
    "make_binner",
    "preprocess",
    "preprocess_batch",
    "pretrained_path",
    "resolve_device",
    "save_checkpoint",
]


def make_binner(encoder: Encoder):
    """A fresh OnlineBinner calibrated for this encoder (spread, recon threshold from its card)."""
    from ..binning import OnlineBinner

    cal = encoder.card.get("binner")
    if not cal:
        return OnlineBinner(model_sha256=encoder.sha256)  # uncalibrated: unit spread, no outliers
    state = {k: v for k, v in cal.items() if k != "calibrated_on"}
    state["model_sha256"] = encoder.sha256
    return OnlineBinner.from_state(state)
