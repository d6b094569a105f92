"""A bin's representative frame: the denoised medoid, on the (q_par, q_z) grid of its geometry.

:class:`MedoidFrames` reads the medoid's raw frame from the run in Tiled, denoises it with the
model that binned the run (the DAE's denoiser, the frame as ``evaluate`` judges it) and, when
the run carries its instrument geometry (the start document's ``gisaxs_geometry``, the
descriptor's configuration, the incidence motor of the event; else what the binning callback
recorded in the derived node), remaps it onto a (q_par, q_z) grid with equal steps in 1/nm.

Why remap rather than put q ticks on the detector image: a GISAXS pixel's q is neither linear
nor separable in (row, col) -- q_par depends on the row too (lines of constant q_par curve),
q_z on the incidence angle and the sample horizon, and a tilted detector mixes both -- so
ticks on a pixel image are right along one row and one column only, and the hover of any
other pixel would state a wrong q. The remap (pyFAI pixel positions, sub-pixel splitting,
solid-angle correction) puts every pixel at its own (q_par, q_z) and leaves blank what the
detector does not see (gaps, below the horizon); its cost, averaging the pixels that share a
bin, is stated on the page. Without a geometry the frame is shown on detector pixels and the
page says why.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..geometry import (
    GeometryError,
    GeometryResolver,
    InstrumentGeometry,
    QGrid,
    pixel_q,
    remap_table,
)
from ..geometry import remap as remap_frames
from ..models import Encoder, load_model
from ..models.inference import PRETRAINED_NAME, to_detector_resolution
from ..models.preprocess import frame_scale, preprocess_q
from ..models.qmodel import grid_from_card, is_qgrid_card
from ..replay import find_image_key

__all__ = ["MedoidFrames", "q_grid_for"]

Q_UNITS = "nm⁻¹"


def q_grid_for(geometry: InstrumentGeometry, max_pixels: int = 128) -> QGrid:
    """A (q_z, q_par) grid covering what the detector sees above the horizon, both sides of
    the beam as measured (no folding), square bins, at most ``max_pixels`` per side."""
    q_par, q_z, alpha_f = pixel_q(geometry)
    seen = (alpha_f >= 0) & ~geometry.inactive_mask()
    if not seen.any():
        raise GeometryError("the detector sees nothing above the sample horizon")
    qp = float(np.abs(q_par[seen]).max())
    qz = float(q_z[seen].max()) * (1 + 1e-6)
    step = max(qz / max_pixels, 2 * qp / max_pixels)
    return QGrid(n_q_z=max(2, math.ceil(qz / step)), n_q_par=max(2, math.ceil(2 * qp / step)),
                 q_z_max_nm=qz, q_par_max_nm=qp, q_z_min_nm=0.0, fold=False)


def _model_matches(encoder: Encoder, want: Mapping[str, Any]) -> bool:
    sha = str(want.get("sha256") or "")
    if sha and encoder.sha256:
        return sha == encoder.sha256
    return (str(want.get("name")) == encoder.name
            and str(want.get("version")) == encoder.version)


def _rounded(a: np.ndarray, digits: int = 4) -> list:
    return [[None if not math.isfinite(v) else round(v, digits) for v in row]
            for row in np.asarray(a, dtype=np.float64).tolist()]


class MedoidFrames:
    """Renders (and caches) representative frames for the view; thread-safe.

    model: an :class:`Encoder` or a :func:`load_model` spec to denoise with; default the run's
        own model found by name ("pretrained" for the shipped one, an adapted name in the
        model cache). A frame is denoised only by the model that binned its run (same sha256,
        else same name and version); otherwise the raw frame is shown and the page says why.
    """

    def __init__(self, client: Any, *, model: Encoder | str | None = None, device: str = "cpu",
                 max_pixels: int = 128, cache_size: int = 256) -> None:
        self.client = client
        self.model = model
        self.device = device
        self.max_pixels = int(max_pixels)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._encoders: dict[tuple, tuple[Encoder | None, str]] = {}
        self._lock = threading.Lock()  # one model pass at a time (the page asks per bin)

    # -- the model -----------------------------------------------------------------------
    def encoder_for(self, metadata: Mapping[str, Any]) -> tuple[Encoder | None, str]:
        """The model that binned the run, or None and why not."""
        want = dict(metadata.get("model") or {})
        key = (want.get("name"), want.get("version"), want.get("sha256"), id(self.model))
        if key in self._encoders:
            return self._encoders[key]
        specs: list[Any] = [self.model] if self.model is not None else []
        if want.get("name") == PRETRAINED_NAME:
            specs.append("pretrained")
        elif want.get("name"):
            specs.append(str(want["name"]))  # an adapted model in the cache, by name
        tried = []
        found: tuple[Encoder | None, str] | None = None
        for spec in specs:
            try:
                encoder = load_model(spec, self.device)
            except Exception as exc:  # noqa: BLE001 - not available here
                tried.append(f"{spec}: {exc}")
                continue
            if _model_matches(encoder, want):
                found = (encoder, "")
                break
            tried.append(f"{encoder.name} {encoder.version} has sha256 {encoder.sha256[:12]}")
        if found is None:
            found = (None, (f"raw frame: the model that binned this run ({want.get('name')} "
                            f"{want.get('version')}) is not available to the view"
                            + (f" ({'; '.join(tried)})" if tried else "")
                            + "; start the view with --model to denoise"))
        self._encoders[key] = found
        return found

    # -- geometry ------------------------------------------------------------------------
    def geometry_for(self, run: Any, stream: Any, index: int, metadata: Mapping[str, Any]
                     ) -> tuple[InstrumentGeometry | None, str]:
        """The frame's geometry from the raw run's documents, else the derived node's record;
        (None, why) when there is none."""
        start = dict(run.metadata.get("start") or {})
        reason = ""
        try:
            resolver = GeometryResolver(start, dict(stream.metadata))
            event = {}
            if resolver.incidence_key is not None:
                key = resolver.incidence_key
                event[key] = np.asarray(stream[key][index]).reshape(-1)[0]
            return resolver.for_event(event).geometry, "the run's documents"
        except GeometryError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - incidence column unreadable
            reason = f"{type(exc).__name__}: {exc}"
        recorded = metadata.get("geometry")
        if isinstance(recorded, Mapping) and isinstance(recorded.get("record"), Mapping):
            try:
                return (InstrumentGeometry.from_dict(recorded["record"]),
                        "the binning callback's record in the derived node")
            except GeometryError as exc:
                reason += f"; recorded geometry unusable: {exc}"
        if "gisaxs_geometry" not in start and not recorded:
            reason = ("the run records no instrument geometry (no gisaxs_geometry in its start "
                      "document)")
        return None, f"detector pixels: {reason}"

    # -- frames --------------------------------------------------------------------------
    def render(self, metadata: Mapping[str, Any], seq_num: int) -> dict:
        """The payload of one representative frame (see the module docstring)."""
        key = (metadata.get("raw_uid"), metadata.get("model_id"), int(seq_num))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        run = self.client[metadata["raw_uid"]]
        stream = run[metadata.get("stream") or "primary"]
        image_key = metadata.get("image_key")
        if not image_key:
            image_key = find_image_key(dict(stream.metadata.get("data_keys", {})), None,
                                       where=f"run {metadata['raw_uid']}")
        index = int(seq_num) - 1
        frame = np.asarray(stream[image_key][index])
        while frame.ndim > 2:
            frame = frame[0]
        geometry, where = self.geometry_for(run, stream, index, metadata)
        encoder, model_note = self.encoder_for(metadata)
        with self._lock:
            payload = self._render(frame, geometry, encoder)
        payload.update({"seq_num": int(seq_num), "image_key": image_key,
                        "shape": list(frame.shape),
                        "model_id": metadata.get("model_id") if encoder is not None else None,
                        "geometry_source": where if geometry is not None else None,
                        "notes": [n for n in (model_note, payload.pop("note", ""),
                                              "" if geometry is not None else where) if n]})
        with self._lock:
            self._cache[key] = payload
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return payload

    def _render(self, frame: np.ndarray, geometry: InstrumentGeometry | None,
                encoder: Encoder | None) -> dict:
        if encoder is not None and is_qgrid_card(encoder.card):
            if geometry is not None:
                return self._qgrid_model(frame, geometry, encoder)
            encoder = None  # a q-grid model cannot see a frame without its geometry
        flagged = ~np.isfinite(frame) | (frame == -1) | (frame == -2)
        if encoder is not None:
            x, fine = encoder.preprocess_with_fine([frame])
            d = encoder.encode_preprocessed(x, fine=fine, return_denoised=True)["denoised"][0]
            # log1p(I / median) at the denoiser's resolution -> detector pixels -> I / median
            rel = np.expm1(to_detector_resolution(d, fine[0, 1] > 0, frame.shape))
            image = "denoised"
        else:
            rel = np.clip(frame, 0, None) / frame_scale(frame)
            image = "raw"
        rel = np.where(flagged, np.nan, np.clip(rel, 0, None)).astype(np.float32)
        value = "log(1 + I / frame median)"
        if geometry is not None and geometry.shape == frame.shape:
            grid = q_grid_for(geometry, self.max_pixels)
            stats = remap_frames(remap_table(geometry, grid), rel, threads=1)
            seen = stats.n_valid[0] > 0
            z = np.where(seen, np.log1p(stats.mean[0]), np.nan)
            rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            return {"image": image, "coords": "q", "units": Q_UNITS, "value": value,
                    "z": _rounded(z[r0:r1, c0:c1]),
                    "x": np.round(grid.q_par_centres()[c0:c1], 4).tolist(),
                    "y": np.round(grid.q_z_centres()[r0:r1], 4).tolist(),
                    "x_title": f"q_par ({Q_UNITS})", "y_title": f"q_z ({Q_UNITS})",
                    "binning": f"remapped onto {grid.n_q_z} x {grid.n_q_par} bins of "
                               f"{grid.q_z_step:.4f} {Q_UNITS} (pixels sharing a bin averaged, "
                               "solid angle corrected; blank: not seen)"}
        note = ("" if geometry is None else f"detector pixels: the geometry's detector_shape "
                f"{list(geometry.shape)} is not the frame's {list(frame.shape)}")
        return {**self._pixels(np.nan_to_num(rel)), "image": image, "value": value, "note": note}

    def _pixels(self, rel: np.ndarray) -> dict:
        f = max(math.ceil(max(rel.shape) / self.max_pixels), 1)
        h, w = (rel.shape[0] // f) * f, (rel.shape[1] // f) * f
        z = np.log1p(rel[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3)))
        return {"coords": "pixels", "units": "pixels", "z": _rounded(z),
                "x": ((np.arange(z.shape[1]) + 0.5) * f).tolist(),
                "y": ((np.arange(z.shape[0]) + 0.5) * f).tolist(),
                "x_title": "detector column (pixels)", "y_title": "detector row (pixels)",
                "binning": f"block-averaged {f} x {f} pixels"}

    def _qgrid_model(self, frame: np.ndarray, geometry: InstrumentGeometry,
                     encoder: Encoder) -> dict:
        """A q-grid model: its own grid, its decoder's clean pattern (half the grid's
        resolution), |q_par| as the model sees it."""
        grid = grid_from_card(encoder.card)
        x = preprocess_q(frame, geometry, grid=grid)
        d = encoder.encode_preprocessed(x, return_denoised=True)["denoised"][0]
        fz, fp = grid.n_q_z // d.shape[0], grid.n_q_par // d.shape[1]
        valid = x[0, 1].reshape(d.shape[0], fz, d.shape[1], fp).max(axis=(1, 3)) > 0
        qz = grid.q_z_centres().reshape(-1, fz).mean(axis=1)
        qp = grid.q_par_centres().reshape(-1, fp).mean(axis=1)
        return {"image": "denoised", "coords": "q", "units": Q_UNITS,
                "value": "log(1 + I / frame median)", "z": _rounded(np.where(valid, d, np.nan)),
                "x": np.round(qp, 4).tolist(), "y": np.round(qz, 4).tolist(),
                "x_title": f"|q_par| ({Q_UNITS})", "y_title": f"q_z ({Q_UNITS})",
                "binning": f"the q-grid model's own {grid.n_q_z} x {grid.n_q_par} grid, its "
                           f"decoder at {d.shape[0]} x {d.shape[1]}; both sides folded"}
