"""Checkpoints: weights plus a JSON card (architecture, preprocessing, noise kinds, metrics, sha256)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import torch

from ..config import ModelConfig, PreprocessConfig
from .dae import GisaxsDAE

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "file_sha256", "card_path",
           "state_sha256"]

CARD_FORMAT = "gisaxs-bluesky-dae/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, truncated or mismatched."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(state_dict: dict) -> str:
    """Digest of the weights themselves (names, dtypes, shapes, bytes), stored in the payload so
    that a checkpoint without its .json card is still checked."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def card_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(
    path: str | Path,
    model: GisaxsDAE,
    card: dict,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict | None = None,
) -> dict:
    """Write ``path`` (.pt) and its card (.json, with the sha256 of the .pt); returns the card."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card = dict(card)
    card.update(format=CARD_FORMAT, model=model.config.to_dict())
    state = model.state_dict()
    payload = {"state_dict": state, "card": card, "weights_sha256": state_sha256(state)}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if extra:
        payload["extra"] = extra
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path.with_suffix(".pt.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint under the name
    card["sha256"] = file_sha256(path)
    card_path(path).write_text(json.dumps(card, indent=2, sort_keys=True))
    return card


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu", verify_sha256: bool = True
) -> tuple[GisaxsDAE, dict, dict]:
    """Load (model, card, payload); raises CheckpointError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / truncated zips
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {exc}") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "card" not in payload:
        raise CheckpointError(f"checkpoint {path} has no 'state_dict'/'card': not a gisaxs-bluesky DAE")
    card = dict(payload["card"])
    if card.get("format") != CARD_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {card.get('format')!r}, expected {CARD_FORMAT!r}"
        )
    json_card = card_path(path)
    if json_card.is_file():
        try:
            on_disk = json.loads(json_card.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"card {json_card} is not valid JSON: {exc}") from exc
        if verify_sha256 and on_disk.get("sha256") not in (None, file_sha256(path)):
            raise CheckpointError(
                f"checkpoint {path} sha256 {file_sha256(path)} does not match its card "
                f"{json_card} ({on_disk.get('sha256')}): file changed or card belongs elsewhere"
            )
        card = {**card, **on_disk}
    digest = payload.get("weights_sha256")
    if verify_sha256 and digest is not None and digest != state_sha256(payload["state_dict"]):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its weights do not match the digest saved with them"
        )
    if digest is None and not json_card.is_file():
        logging.getLogger(__name__).warning(
            "checkpoint %s has neither a weights digest nor a %s card: its integrity cannot be "
            "checked", path, json_card.name)
    for name, t in payload["state_dict"].items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"checkpoint {path} weight {name!r} has {n_bad} non-finite values (NaN/inf): "
                "the training diverged or the file is damaged"
            )
    card["sha256"] = file_sha256(path)
    try:
        # cards written before noise_hidden existed had a 64-unit layer there
        config = ModelConfig(**{"noise_hidden": 64, **card["model"]})
        PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in card.get("preprocess", {}).items()})
    except (TypeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} card has a bad model/preprocess entry: {exc}") from exc
    model = GisaxsDAE(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} weights do not match its architecture {card['model']}: {exc}"
        ) from exc
    return model, card, payload
