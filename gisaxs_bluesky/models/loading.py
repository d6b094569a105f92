"""Model and binner loading, in one place: by spec (the CLI's ``--model``), fresh binners
calibrated from a model's card, and saved binner states."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..binning import OnlineBinner
from .dae import GisaxsDAE
from .inference import Encoder, load_encoder, load_pretrained

__all__ = ["ModelSpecError", "load_binner", "load_model", "make_binner", "read_binner_state"]

logger = logging.getLogger(__name__)

_MODEL_CACHE: dict[tuple[str, str], Encoder] = {}


class ModelSpecError(ValueError):
    """A model or binner that cannot be had; the message names the spec and why."""


def load_model(spec: str | Encoder = "pretrained", device: str = "cpu") -> Encoder:
    """Encoder from ``spec``: an Encoder, "pretrained", "untrained[:seed]" or a checkpoint path.

    Cached per process, so Dask workers load a model once.
    """
    if isinstance(spec, Encoder):
        return spec
    key = (str(spec), str(device))
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    text = str(spec)
    if text == "pretrained":
        encoder = load_pretrained(device)
    elif text == "untrained" or text.startswith("untrained:"):
        try:
            seed = int(text.split(":", 1)[1]) if ":" in text else 0
        except ValueError:
            raise ModelSpecError(f"model {text!r}: the seed after 'untrained:' must be an "
                                 "integer, e.g. 'untrained:0'") from None
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = GisaxsDAE()
        encoder = Encoder(model, {"name": "untrained", "version": f"seed{seed}"}, device)
    else:
        if not Path(text).is_file():
            raise ModelSpecError(
                f"model {text!r}: not 'pretrained', 'untrained[:seed]' or a file")
        encoder = load_encoder(text, device)
    _MODEL_CACHE[key] = encoder
    return encoder


def make_binner(encoder: Encoder) -> OnlineBinner:
    """A fresh OnlineBinner calibrated for this encoder (spread, thresholds from its card)."""
    cal = encoder.card.get("binner")
    if not cal:
        return OnlineBinner(model_sha256=encoder.sha256)  # uncalibrated: unit spread, no outliers
    state = {k: v for k, v in cal.items() if k != "calibrated_on"}
    state["model_sha256"] = encoder.sha256
    return OnlineBinner.from_state(state)


def read_binner_state(path: str | Path) -> OnlineBinner:
    """The OnlineBinner saved at ``path`` (``OnlineBinner.save``), also one saved before any
    frame joined a bin (its calibration and reference latents kept)."""
    try:
        return OnlineBinner.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelSpecError(f"binner state {str(path)!r} cannot be read: {exc}") from exc


def load_binner(path: str | Path | None, encoder: Encoder) -> OnlineBinner:
    """The binner saved for ``encoder`` at ``path`` (bins persist across scans), else a fresh
    one: no file yet, an unreadable one, or one saved for another model (both logged)."""
    fresh = make_binner(encoder)
    if path is None or not Path(path).exists():
        return fresh
    try:
        saved = read_binner_state(path)
    except ModelSpecError as exc:
        logger.warning("ignoring binner state: %s", exc)
        return fresh
    if saved.model_sha256 != fresh.model_sha256:
        logger.warning("binner state %s is for another model; starting fresh bins", path)
        return fresh
    return saved
