"""The denoising autoencoder: preprocessing, model, checkpoints, training and inference."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .dae import GisaxsDAE
from .inference import (
    Encoder,
    EncodeResult,
    load_encoder,
    load_pretrained,
    pretrained_path,
    resolve_device,
)
from .loading import ModelSpecError, load_binner, load_model, make_binner, read_binner_state
from .preprocess import preprocess, preprocess_batch

__all__ = [
    "CheckpointError",
    "EncodeResult",
    "Encoder",
    "GisaxsDAE",
    "load_checkpoint",
    "load_binner",
    "load_encoder",
    "load_model",
    "load_pretrained",
    "make_binner",
    "ModelSpecError",
    "preprocess",
    "preprocess_batch",
    "pretrained_path",
    "read_binner_state",
    "resolve_device",
    "save_checkpoint",
]

