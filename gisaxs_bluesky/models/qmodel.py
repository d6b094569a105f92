"""Inference on the reciprocal-space grid: frames + their geometry -> latent, on any instrument.

The hook the live callback and replay can call when a model's card says ``"input": "qgrid"``
(:func:`is_qgrid_card`): :class:`QEncoder` remaps each frame with its
:class:`~gisaxs_bluesky.geometry.InstrumentGeometry` (table cached per geometry; the gather in
numba on CPU, in torch on the model's GPU), builds the q-grid input (:func:`q_inputs`) and
runs the same DAE as the pixel model. The pixel model (:class:`Encoder`) is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..geometry import (
    GeometryError,
    GeometryUnavailable,
    InstrumentGeometry,
    QGrid,
    ResolvedGeometry,
    remap,
    remap_table,
    remap_torch,
)
from .inference import Encoder, EncodeResult, load_encoder, recon_error
from .preprocess import q_inputs

__all__ = ["QEncoder", "QPrepared", "frame_geometry", "geometry_outside_card",
           "grid_from_card", "is_qgrid_card", "load_qencoder", "plain_encoder"]

#: what a frame's row says when a q-grid model gets it without any geometry
NO_GEOMETRY = ("no geometry given; a q-grid model needs the frame's geometry: pass geometry= "
               "(a record, a mapping or a PONI path; --geometry / --poni on the command line) "
               "or put gisaxs_geometry in the run's start document")


def is_qgrid_card(card: dict) -> bool:
    """Whether a checkpoint card describes a q-grid model."""
    return card.get("input") == "qgrid"


def grid_from_card(card: dict) -> QGrid:
    if not is_qgrid_card(card):
        raise ValueError(f"model {card.get('name')!r} is not a q-grid model (card input "
                         f"{card.get('input', 'pixels')!r})")
    return QGrid(**card.get("qgrid", {}))


def geometry_outside_card(geometry: InstrumentGeometry, card: dict) -> list[str]:
    """Why a frame's geometry lies outside what the model was trained across (empty: inside).

    The caller flags such frames with these reasons instead of binning them silently.
    """
    ranges = card.get("instruments") or {}
    reasons = []
    for key, value in (("wavelength_nm", geometry.wavelength_nm),
                       ("distance_mm", geometry.distance_mm),
                       ("incidence_deg", geometry.incidence_deg)):
        lo_hi = ranges.get(key)
        if lo_hi and not lo_hi[0] <= value <= lo_hi[1]:
            reasons.append(f"{key}={value:g} outside the trained range {lo_hi}")
    if geometry.tilt_deg and abs(geometry.tilt_deg) > 5:
        reasons.append(f"tilt_deg={geometry.tilt_deg:g}: training drew untilted detectors")
    if "min_q_reach_nm" in ranges:
        table = remap_table(geometry, grid_from_card(card))
        seen = table.valid
        grid = table.grid
        q_par = grid.q_par_centres()[seen.any(axis=0)]
        q_z = grid.q_z_centres()[seen.any(axis=1)]
        reach = min(q_par.max() if q_par.size else 0.0, q_z.max() if q_z.size else 0.0)
        if reach < ranges["min_q_reach_nm"]:
            reasons.append(f"the detector sees q up to {reach:.2f} 1/nm, less than the "
                           f"{ranges['min_q_reach_nm']} 1/nm every training set-up saw")
    return reasons


def frame_geometry(value: Any) -> tuple[InstrumentGeometry | None, str | None]:
    """A frame's geometry as the frame layer hands it on (a record, a ``ResolvedGeometry``, a
    ``GeometryUnavailable`` or None) -> (record, None), or (None, why there is none)."""
    if isinstance(value, ResolvedGeometry):
        return value.geometry, None
    if isinstance(value, InstrumentGeometry):
        return value, None
    if isinstance(value, GeometryUnavailable):
        return None, value.reason
    if value is None:
        return None, NO_GEOMETRY
    return None, f"not a geometry: {type(value).__name__}"


def plain_encoder(encoder: Any) -> Encoder:
    """The :class:`Encoder` inside a :class:`QEncoder` (an Encoder as it is)."""
    return encoder.encoder if isinstance(encoder, QEncoder) else encoder


@dataclass
class QPrepared:
    """Frames made q-grid input by :meth:`QEncoder.prepare`: ``inputs`` of the frames at
    ``kept`` (positions in the list given, in order); ``refused`` position -> why the frame
    has no input (no geometry, the key named); ``outside`` position -> why a kept frame's
    geometry lies outside the card's ranges (encoded, not to be binned)."""

    inputs: Any
    kept: list[int]
    refused: dict[int, str] = field(default_factory=dict)
    outside: dict[int, str] = field(default_factory=dict)


class QEncoder:
    """A q-grid DAE: ``encode(frames, geometry)`` for frames of one geometry, or
    ``encode_frames(frames, geometries)`` for frames each with its own (a theta scan).

    Other attributes (``name``, ``sha256``, ``info()``, ``latent_dim``...) are the wrapped
    :class:`Encoder`'s, so it goes wherever an Encoder goes."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.grid = grid_from_card(encoder.card)
        self._outside: dict[tuple, list[str]] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "encoder":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def outside_card(self, geometry: InstrumentGeometry) -> list[str]:
        """:func:`geometry_outside_card` of this model, cached per geometry."""
        key = geometry.key()
        if key not in self._outside:
            if len(self._outside) >= 1024:  # a long theta scan: one entry per angle
                self._outside.clear()
            self._outside[key] = geometry_outside_card(geometry, self.encoder.card)
        return self._outside[key]

    def prepare(self, frames: Sequence[np.ndarray], geometries: Sequence[Any],
                mask: np.ndarray | None = None) -> QPrepared:
        """Each frame remapped with its own geometry (frames of one geometry together); a
        frame without one is refused with the reason, never given a default."""
        if len(frames) != len(geometries):
            raise ValueError(f"{len(frames)} frames but {len(geometries)} geometries")
        refused: dict[int, str] = {}
        outside: dict[int, str] = {}
        groups: dict[tuple, tuple[InstrumentGeometry, list[int]]] = {}
        for i, value in enumerate(geometries):
            geometry, why = frame_geometry(value)
            if geometry is None:
                refused[i] = f"geometry: {why}"
                continue
            groups.setdefault(geometry.key(), (geometry, []))[1].append(i)
        parts, order = [], []
        for geometry, members in groups.values():
            try:
                # a list, not a stacked copy: the gather reads each frame where it lies
                parts.append(self.inputs([frames[i] for i in members], geometry, mask))
            except (GeometryError, ValueError) as exc:
                refused.update({i: f"geometry: {exc}" for i in members})
                continue
            order += members
            reasons = self.outside_card(geometry)
            if reasons:
                outside.update({i: "geometry outside the model card: " + "; ".join(reasons)
                                for i in members})
        kept = sorted(order)
        if not parts:
            return QPrepared(None, [], refused, outside)
        # back to frame order: the binner takes frames in the order they came
        where = np.argsort(np.asarray(order))
        if isinstance(parts[0], np.ndarray):
            inputs = np.concatenate(parts)[where]
        else:
            inputs = torch.cat(parts)[torch.as_tensor(where, device=parts[0].device)]
        return QPrepared(inputs, kept, refused, outside)

    def encode_inputs(self, x, *, batch_size: int = 64) -> EncodeResult:
        """Encode prepared (N, 8, n_q_z, n_q_par) inputs (numpy, or a tensor on the GPU)."""
        if len(x) == 0:
            raise ValueError("inputs are empty: nothing to encode")
        return self.encoder._result([self._forward(x[s : s + batch_size])
                                     for s in range(0, len(x), batch_size)])

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def inputs(self, frames, geometry: InstrumentGeometry, mask: np.ndarray | None = None):
        """(N, 8, n_q_z, n_q_par) model input of (N, H, W) frames or a list of (H, W) frames:
        numpy on CPU, a tensor on a GPU."""
        table = remap_table(geometry, self.grid, mask)
        if self.device.type == "cuda":
            # one host array to copy over (a list is stacked, mixed dtypes given one)
            t = torch.as_tensor(np.asarray(frames)).to(self.device, non_blocking=True)
            return q_inputs(remap_torch(table, t), table)[0]
        return q_inputs(remap(table, frames), table)[0]

    def encode(self, frames, geometry: InstrumentGeometry, mask: np.ndarray | None = None, *,
               batch_size: int = 64) -> EncodeResult:
        frames = np.asarray(frames)
        if frames.ndim == 2:
            frames = frames[None]
        parts = [self._forward(self.inputs(frames[s : s + batch_size], geometry, mask))
                 for s in range(0, len(frames), batch_size)]
        return self.encoder._result(parts)

    def encode_frames(self, frames: Sequence[np.ndarray],
                      geometries: Sequence[InstrumentGeometry],
                      mask: np.ndarray | None = None) -> EncodeResult:
        if len(frames) != len(geometries):
            raise ValueError(f"{len(frames)} frames but {len(geometries)} geometries")
        parts = [self._forward(self.inputs(f, g, mask))
                 for f, g in zip(frames, geometries, strict=True)]
        return self.encoder._result(parts)

    @torch.inference_mode()
    def _forward(self, x) -> dict:
        model = self.encoder.model
        t = torch.as_tensor(x).to(self.device, non_blocking=True)
        t = t.contiguous(memory_format=torch.channels_last)
        use_amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=use_amp, dtype=torch.float16):
            out = model(t)
        result = {
            "latent": torch.cat([out["z_identity"], out["z_noise"]], 1).float(),
            "noise_prob": torch.sigmoid(out["noise_logits"].float()),
            "recon_error": recon_error(out["recon"].float(), t.float()),
            "structure_prob": torch.softmax(out["structure_logits"].float(), 1),
            "radius_nm": torch.exp(out["log_radius"].float()),
            "distance_nm": torch.exp(out["log_distance"].float()),
        }
        return {k: v.cpu().numpy().astype(np.float32) for k, v in result.items()}


def load_qencoder(path, device: str | torch.device = "auto") -> QEncoder:
    """A q-grid checkpoint ready for inference (a pixel model is refused, naming its input)."""
    return QEncoder(load_encoder(path, device))
