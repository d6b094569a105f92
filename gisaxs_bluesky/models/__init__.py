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
    from ..config import BinnerConfig

    cal = encoder.card.get("binner", {})
    return OnlineBinner(
        BinnerConfig(**cal.get("config", {})),
        spread=float(cal.get("spread", 1.0)),
        recon_threshold=float(cal.get("recon_threshold", float("inf"))),
        model_sha256=encoder.sha256,
    )
