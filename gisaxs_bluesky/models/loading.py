"""Model and binner loading, in one place: by spec (the CLI's ``--model``), fresh binners
calibrated from a model's card, and saved binner states."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..binning import OnlineBinner
from ..runtime import cache_dir
from .checkpoint import CheckpointError
from .dae import GisaxsDAE
from .inference import Encoder, load_encoder, load_pretrained, pretrained_path

__all__ = ["ModelSpecError", "list_adapted", "load_binner", "load_model", "make_binner",
           "model_cache_dir", "read_binner_state", "resolve_model"]

logger = logging.getLogger(__name__)

_MODEL_CACHE: dict[tuple[str, str], Encoder] = {}


class ModelSpecError(ValueError):
    """A model or binner that cannot be had; the message names the spec and why."""


def load_model(spec: str | Encoder = "pretrained", device: str = "cpu") -> Encoder:
    """Encoder from ``spec``: an Encoder, "pretrained", "untrained[:seed]", a checkpoint path
    or the name of a model in :func:`model_cache_dir` (``gisaxs-bluesky adapt --name``).

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
        try:
            path = resolve_model(text)
        except CheckpointError as exc:
            raise ModelSpecError(f"{exc} (or 'untrained[:seed]')") from None
        encoder = load_encoder(path, device)
    _MODEL_CACHE[key] = encoder
    return encoder


def model_cache_dir() -> Path:
    """Where adapted models live by name: $GISAXS_BLUESKY_MODELS, else
    $XDG_CACHE_HOME/gisaxs_bluesky/models, else ~/.cache/gisaxs_bluesky/models."""
    if os.environ.get("GISAXS_BLUESKY_MODELS"):
        return Path(os.environ["GISAXS_BLUESKY_MODELS"]).expanduser()
    return cache_dir() / "models"


def list_adapted() -> list[str]:
    """Names of the models in :func:`model_cache_dir`."""
    d = model_cache_dir()
    return sorted(p.stem for p in d.glob("*.pt")) if d.is_dir() else []


def resolve_model(spec: str | Path | None = "pretrained") -> Path:
    """Checkpoint path of ``spec``: "pretrained" (or None) the shipped model, an existing file
    as it is, else a name in the user cache (``<cache>/<name>.pt``)."""
    if spec is None or str(spec) == "pretrained":
        return pretrained_path()
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = str(spec)
    if "/" not in name and os.sep not in name:
        cached = model_cache_dir() / (name if name.endswith(".pt") else f"{name}.pt")
        if cached.is_file():
            return cached
    raise CheckpointError(
        f"model {str(spec)!r} is neither 'pretrained', a checkpoint file, nor a name in "
        f"{model_cache_dir()} (there: {list_adapted() or 'none'})"
    )


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
