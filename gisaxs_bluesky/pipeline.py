"""Frames -> DAE encode -> online binning -> derived-table rows; no Bluesky needed.

The live callback (:mod:`gisaxs_bluesky.callbacks.dae_binning`) and offline replay share this
stage, so a run re-binned later produces the same columns as the live one.

Rows follow :meth:`gisaxs_bluesky.store.DerivedRunWriter.append`: ``seq_num``, ``time``,
``latent`` (N, D), ``bin_id``, ``outlier_score``, ``is_outlier``, ``recon_error``,
``noise_prob`` (N, K), ``structure``, ``radius_nm``, ``distance_nm``, ``flag`` and one column
per motor.

Geometry: every frame comes with its geometry (``geometries``: what the frame layer resolved,
a record, or None). A q-grid model (card ``"input": "qgrid"``) remaps each frame with it; a
frame without one gets an UNPROCESSED row whose ``flag`` names the missing key, a frame whose
geometry lies outside the card's ranges is encoded but not binned (``bin_id`` UNBINNED_BIN,
``is_outlier`` True, ``flag`` the reason). The pixel model does not use the geometry.

Frames that cannot be encoded (wrong ndim/dtype/shape, too many NaN/inf pixels, or a model
error for their batch) still get a row, with ``bin_id == UNPROCESSED_BIN`` (-2), NaN latent
and scores, ``is_outlier`` False; the reason is returned in :attr:`PipelineResult.errors`.
``bin_id == -1`` comes from the binner: the model could not reconstruct the frame.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from .binning import OnlineBinner
from .derived import FLAG_COLUMN, UNBINNED_BIN, UNPROCESSED_BIN, DerivedSchema
from .models.inference import Encoder
from .models.qmodel import QEncoder, is_qgrid_card, plain_encoder
from .runtime import RuntimeConfig

__all__ = [
    "UNPROCESSED_BIN",
    "BinningPipeline",
    "PipelineResult",
    "PreparedFrames",
    "check_frame",
]

logger = logging.getLogger(__name__)

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_frame(
    frame: Any,
    *,
    expected_shape: tuple[int, ...] | None = None,
    max_nonfinite_fraction: float = 0.05,
    label: str = "frame",
    mask: np.ndarray | None = None,
    require_signal: bool = False,
) -> tuple[np.ndarray | None, str | None]:
    """Validate one detector frame: returns (2-D array, None) or (None, reason naming the fault).

    Accepts (H, W) or (1, H, W); numeric (int/uint/float) dtypes only; at most
    ``max_nonfinite_fraction`` NaN/inf pixels; values within the float32 range (the model's);
    the shape must match ``expected_shape`` if given; at least one data pixel (>= 0: detectors
    flag gaps -1 and bad pixels -2; finite; not in ``mask``). ``require_signal`` (the pipeline
    sets it) also refuses a frame whose data pixels all have one value. Such frames have
    nothing to bin: encoded, they get recon_error 0 and open a bin of their own that persists.
    """
    try:
        a = np.asarray(frame)
    except Exception as exc:  # noqa: BLE001 - anything odd in the document
        return None, f"{label}: cannot be read as an array ({type(frame).__name__}: {exc})"
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        return None, f"{label}: wrong ndim {a.ndim} (shape {a.shape}); expected a 2-D image"
    if a.dtype.kind not in "iuf":
        return None, f"{label}: wrong dtype {a.dtype}; expected an integer or float image"
    if expected_shape is not None and tuple(a.shape) != tuple(expected_shape):
        return None, f"{label}: shape {a.shape} differs from the run's {tuple(expected_shape)}"
    if a.size == 0:
        return None, f"{label}: empty image, shape {a.shape}"
    if a.dtype.kind == "f":
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad > max_nonfinite_fraction * a.size:
            n_nan = int(np.count_nonzero(np.isnan(a)))
            return None, (
                f"{label}: {bad} of {a.size} pixels are non-finite ({n_nan} NaN, {bad - n_nan} "
                f"inf), above max_nonfinite_fraction={max_nonfinite_fraction}"
            )
    data = a >= 0  # detectors flag gaps -1 and bad pixels -2; NaN compares False
    if mask is not None and mask.shape == a.shape:
        data &= ~mask
    values = a[data]
    if values.size == 0:
        return None, (f"{label}: no data pixel (all {a.size} pixels are gaps, bad, masked or "
                      "non-finite)")
    lo, hi = values.min(), values.max()
    if a.dtype.kind == "f" and hi > _FLOAT32_MAX:
        return None, (f"{label}: pixel values up to {float(hi):.3g} exceed the float32 range "
                      f"({_FLOAT32_MAX:.3g}) the model computes in")
    if require_signal and lo == hi:
        return None, f"{label}: no signal (all {values.size} data pixels are {float(lo):g})"
    return a, None


@dataclass
class PipelineResult:
    """Rows for :meth:`DerivedRunWriter.append` plus per-frame problems (empty if none)."""

    rows: dict[str, np.ndarray]
    errors: list[str] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return len(self.rows["seq_num"])


@dataclass
class PreparedFrames:
    """Frames checked and preprocessed by :meth:`BinningPipeline.prepare`, ready for the model."""

    seq: np.ndarray  # seq_num of every frame given, good or not
    idx: np.ndarray  # positions (in ``seq``) of the frames that passed the checks
    inputs: Any  # (len(idx), C, h, w) model input of those (numpy; q-grid on a GPU: a tensor)
    errors: list[str] = field(default_factory=list)
    flags: dict[int, str] = field(default_factory=dict)  # position in ``seq`` -> flag
    unbinned: set[int] = field(default_factory=set)  # positions encoded, kept out of the bins


class BinningPipeline:
    """Encode frames with ``encoder`` and bin identity latents with ``binner``.

    :meth:`process` = :meth:`prepare` (checks and preprocessing: no model, no binner state,
    so it may run on another thread, e.g. for the next batch while this one is encoded) then
    :meth:`process_prepared` (model pass and binning). Binning is not thread-safe: one thread
    (the callback's worker, or replay) calls :meth:`process_prepared`, in frame order,
    because the binner's state changes as frames join bins.

    ``encoder``: an :class:`Encoder`, or a :class:`QEncoder` (an Encoder whose card says
    ``"input": "qgrid"`` is made one): then :attr:`qencoder` is set and frames need geometry.
    """

    def __init__(
        self,
        encoder: Encoder,
        binner: OnlineBinner,
        *,
        mask: np.ndarray | None = None,
        batch_size: int = RuntimeConfig.batch_size,
        max_nonfinite_fraction: float = 0.05,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if binner.model_sha256 and encoder.sha256 and binner.model_sha256 != encoder.sha256:
            raise ValueError(
                f"binner was calibrated for model sha256={binner.model_sha256[:12]}..., "
                f"encoder is sha256={encoder.sha256[:12]}...; use make_binner(encoder)"
            )
        self.encoder = plain_encoder(encoder)
        self.qencoder: QEncoder | None = (
            encoder if isinstance(encoder, QEncoder)
            else QEncoder(encoder) if is_qgrid_card(getattr(encoder, "card", {}) or {}) else None)
        self.binner = binner
        self.mask = mask
        self.batch_size = int(batch_size)
        self.max_nonfinite_fraction = float(max_nonfinite_fraction)

    # ------------------------------------------------------------------ metadata
    @property
    def latent_dim(self) -> int:
        return int(self.encoder.latent_dim)

    @property
    def noise_kinds(self) -> list[str]:
        return list(self.encoder.noise_kinds)

    def open_writer(
        self,
        store: Any,
        raw_uid: str,
        *,
        scan_id: int | None,
        motors: Sequence[str] = (),
        extra_metadata: dict | None = None,
        geometry: Mapping[str, Any] | None = None,
    ) -> Any:
        """``store.open(...)`` with this pipeline's model, binner settings, latent size, noise
        kinds; ``geometry`` (the run's, :func:`~gisaxs_bluesky.frames.geometry_summary`) and
        the model's input (``pixels`` or ``qgrid``) go into the node's metadata."""
        extra_metadata = {**(extra_metadata or {}), "geometry": geometry,
                          "model_input": "qgrid" if self.qencoder is not None else "pixels"}
        return store.open(
            raw_uid,
            scan_id=scan_id,
            model=self.encoder.info(),
            binner=self.binner.settings(),
            latent_dim=self.latent_dim,
            noise_kinds=self.noise_kinds,
            motors=list(motors),
            extra_metadata=extra_metadata,
        )

    # ------------------------------------------------------------------- process
    def process(
        self,
        frames: Sequence[Any] | np.ndarray,
        seq_nums: Sequence[int] | np.ndarray,
        times: Sequence[float] | np.ndarray,
        positions: Mapping[str, Sequence[float] | np.ndarray] | None = None,
        *,
        expected_shape: tuple[int, ...] | None = None,
        geometries: Sequence[Any] | None = None,
    ) -> PipelineResult:
        """Encode and bin N frames (in order); one row per frame, bad frames included.

        ``frames`` is a sequence of arrays (None for a frame that could not be read) or an
        (N, H, W) array; ``positions`` maps motor name -> N values (NaN where unknown);
        ``geometries`` N geometries (see the module docstring; None: none given).
        """
        prepared = self.prepare(frames, seq_nums, expected_shape=expected_shape,
                                geometries=geometries)
        return self.process_prepared(prepared, times, positions)

    def prepare(
        self,
        frames: Sequence[Any] | np.ndarray,
        seq_nums: Sequence[int] | np.ndarray,
        *,
        expected_shape: tuple[int, ...] | None = None,
        geometries: Sequence[Any] | None = None,
    ) -> PreparedFrames:
        """Check and preprocess N frames (thread-safe: touches neither model nor binner)."""
        seq = np.asarray(seq_nums, dtype=np.int64).reshape(-1)
        if len(frames) != len(seq):
            raise ValueError(f"frames ({len(frames)}), seq_nums ({len(seq)}) differ")
        if geometries is not None and len(geometries) != len(seq):
            raise ValueError(f"frames ({len(seq)}), geometries ({len(geometries)}) differ")
        errors: list[str] = []
        good_idx: list[int] = []
        good_frames: list[np.ndarray] = []
        for i, frame in enumerate(frames):
            label = f"frame seq_num={int(seq[i])}"
            if frame is None:
                errors.append(f"{label}: no frame data")
                continue
            a, why = check_frame(
                frame,
                expected_shape=expected_shape,
                max_nonfinite_fraction=self.max_nonfinite_fraction,
                label=label,
                mask=self.mask,
                require_signal=True,
            )
            if why is not None:
                errors.append(why)
                continue
            expected_shape = expected_shape or a.shape
            good_idx.append(i)
            good_frames.append(a)
        idx = np.asarray(good_idx, dtype=np.int64)
        if not good_idx:
            return PreparedFrames(seq, idx, None, errors)
        if self.qencoder is not None:
            return self._prepare_q(seq, good_idx, good_frames, geometries, errors)
        try:
            inputs = self.encoder.preprocess(good_frames, self.mask)
        except Exception as exc:  # noqa: BLE001 - e.g. a frame smaller than the model input
            logger.exception("preprocessing failed for %d frames", len(idx))
            errors.append(f"preprocessing error for frames seq_num={seq[idx].tolist()}: "
                          f"{type(exc).__name__}: {exc}")
            return PreparedFrames(seq, idx, None, errors)
        return PreparedFrames(seq, idx, inputs, errors)

    def _prepare_q(self, seq: np.ndarray, good_idx: list[int], good_frames: list[np.ndarray],
                   geometries: Sequence[Any] | None, errors: list[str]) -> PreparedFrames:
        """q-grid input of the good frames, each with its geometry; refusals are flagged."""
        given = [None if geometries is None else geometries[i] for i in good_idx]
        try:
            q = self.qencoder.prepare(good_frames, given, self.mask)
        except Exception as exc:  # noqa: BLE001 - e.g. a remap fault: the frames get rows
            logger.exception("q-grid preprocessing failed for %d frames", len(good_idx))
            errors.append(f"preprocessing error for frames seq_num={seq[good_idx].tolist()}: "
                          f"{type(exc).__name__}: {exc}")
            return PreparedFrames(seq, np.asarray(good_idx, dtype=np.int64), None, errors)
        flags: dict[int, str] = {}
        for k, why in q.refused.items():
            flags[good_idx[k]] = why
            errors.append(f"frame seq_num={int(seq[good_idx[k]])}: {why}")
        outside: dict[str, list[int]] = {}
        for k, why in q.outside.items():
            flags[good_idx[k]] = why
            outside.setdefault(why, []).append(int(seq[good_idx[k]]))
        for why, seqs in outside.items():
            errors.append(f"frames seq_num={seqs}: {why}; encoded, not binned")
        idx = np.asarray([good_idx[k] for k in q.kept], dtype=np.int64)
        unbinned = {good_idx[k] for k in q.outside}
        return PreparedFrames(seq, idx, q.inputs, errors, flags, unbinned)

    def process_prepared(
        self,
        prepared: PreparedFrames,
        times: Sequence[float] | np.ndarray,
        positions: Mapping[str, Sequence[float] | np.ndarray] | None = None,
    ) -> PipelineResult:
        """Model pass and binning of :meth:`prepare`'s output; one row per frame."""
        seq = prepared.seq
        n = len(seq)
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        if len(t) != n:
            raise ValueError(f"frames ({n}), seq_nums ({n}), times ({len(t)}) differ")
        pos: dict[str, np.ndarray] = {}
        for name, values in (positions or {}).items():
            v = np.asarray(values, dtype=np.float64).reshape(-1)
            if len(v) != n:
                raise ValueError(f"positions[{name!r}] has {len(v)} values, expected {n}")
            pos[str(name)] = v
        rows = DerivedSchema(self.latent_dim, tuple(self.noise_kinds), tuple(pos)).empty_rows(
            seq, t, pos)
        errors = list(prepared.errors)
        for i, why in prepared.flags.items():
            rows[FLAG_COLUMN][i] = why
        idx = prepared.idx
        if prepared.inputs is None or not len(idx):
            return PipelineResult(rows, errors)
        model = self.qencoder if self.qencoder is not None else self.encoder
        try:
            enc = model.encode_inputs(prepared.inputs, batch_size=self.batch_size)
            if len(enc) != len(idx):
                raise RuntimeError(f"encoder returned {len(enc)} rows for {len(idx)} frames")
        except Exception as exc:  # noqa: BLE001 - a model fault must not stop the scan
            logger.exception("DAE encode failed for %d frames", len(idx))
            errors.append(
                f"model error for frames seq_num={seq[idx].tolist()}: {type(exc).__name__}: {exc}"
            )
            return PipelineResult(rows, errors)
        finite = (np.isfinite(enc.latent).all(axis=1) & np.isfinite(enc.recon_error))
        if not finite.all():  # never into the binner: a NaN centroid spoils every later frame
            errors.append(f"model gave non-finite latents for frames seq_num="
                          f"{seq[idx[~finite]].tolist()}; not binned")
            if not finite.any():
                return PipelineResult(rows, errors)
            idx = idx[finite]
            enc = _select_rows(enc, finite)
        rows["latent"][idx] = enc.latent
        rows["noise_prob"][idx] = enc.noise_prob
        rows["recon_error"][idx] = enc.recon_error
        # frames whose geometry lies outside the model card: stored, never into the bins
        binned = np.asarray([i not in prepared.unbinned for i in idx], dtype=bool)
        rows["bin_id"][idx[~binned]] = UNBINNED_BIN
        rows["is_outlier"][idx[~binned]] = True
        if binned.any():
            kept = enc if binned.all() else _select_rows(enc, binned)
            assignment = self.binner.assign(kept.identity_latent, kept.recon_error)
            rows["bin_id"][idx[binned]] = assignment.bin_id
            rows["outlier_score"][idx[binned]] = assignment.outlier_score
            rows["is_outlier"][idx[binned]] = assignment.is_outlier
        rows["structure"][idx] = np.asarray(enc.structure, dtype=object)
        rows["radius_nm"][idx] = enc.radius_nm
        rows["distance_nm"][idx] = enc.distance_nm
        return PipelineResult(rows, errors)

    def process_and_write(self, writer: Any, *frames: Any, **options: Any) -> PipelineResult:
        """:meth:`process` (``frames`` and ``options`` are its arguments), then
        ``writer.append(rows)`` and ``writer.record_error`` per problem."""
        result = self.process(*frames, **options)
        writer.append(result.rows)
        if result.errors:
            writer.record_error("; ".join(result.errors))
        return result


def _select_rows(enc: Any, keep: np.ndarray) -> Any:
    """The rows ``keep`` of an :class:`~gisaxs_bluesky.models.inference.EncodeResult`."""
    changes = {f.name: getattr(enc, f.name)[keep] for f in fields(enc)
               if isinstance(getattr(enc, f.name), np.ndarray)}
    return replace(enc, **changes)
