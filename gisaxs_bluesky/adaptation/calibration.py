"""Binner calibration from the beamtime's own frames, without labels.

Two halves of one frame (binomial thinning) and repeated thinnings of it are measurements of
one identity with independent noise, and so are the halves of frames that the sources call
repeated measurements of one sample (a repeat group): the latents of one frame, or of one
repeat group, play the part of the labelled identity in
:meth:`gisaxs_bluesky.binning.OnlineBinner.calibrate`. The spread is the ``spread_quantile``
of the latents' distances (halves and whole frames) to their identity's mean; the
reconstruction threshold the ``recon_quantile`` of the whole frames' errors; the reference
centres are k-means centres of the latents of all whole frames, and the reference threshold
the ``reference_quantile`` of each frame's distance to centres fitted without it
(``reference_folds``-fold cross-fitting; :meth:`~gisaxs_bluesky.binning.OnlineBinner.
reference_cross_fitted`). With fewer than 2 x ``reference_folds`` frames, centres come from
half of the frames and the threshold from the other half; with fewer than 4 frames the
halves set them, split by thinning (centres from one noise draw, threshold from the other).
Where each whole frame has both a reconstruction error and an out-of-fit reference distance
(cross-fitted, or held out of the fine-tuning), both thresholds are then widened by one factor
>= 1 until at most 1 - ``joint_quantile`` of those frames score above 1 on either test
(:meth:`~gisaxs_bluesky.binning.OnlineBinner.widen_to_joint_quantile`; the card's
``joint_factor``): a frame is an outlier when either test flags it, and without this step the
two rates add up where the tests disagree. So ordinary frames of this beamtime score below 1
but for about 1 - ``joint_quantile`` of them, and a frame unlike all of them stands out.

Why cross-fitted: with centres from half of the frames, held-out frames of a BornAgain proxy
beamtime (``benchmarks/bench_proxy_beamtime.py``) crossed the reference threshold 3.3-5.8 %
of the time, where the reconstruction threshold flagged none: the next ordinary frame fell
into the gaps between centres that only half of the frames had placed.

Halves carry a fraction p of the dose: their latents scatter at least as much as whole
frames do (a generous spread), but their reconstruction errors and positions shift with the
dose, which is why the thresholds come from the whole frames when there are enough.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..binning import OnlineBinner
from ..config import BinnerConfig

__all__ = ["CalibrationConfig", "calibrate_from_groups"]


@dataclass(frozen=True)
class CalibrationConfig:
    """Quantiles of the beamtime calibration (documented in the module docstring)."""

    spread_quantile: float = 0.995
    recon_quantile: float = 0.99
    reference_quantile: float = 0.99
    n_reference: int = 64
    min_groups_for_frame_split: int = 4
    reference_folds: int = 5
    joint_quantile: float | None = 0.99  # None: each threshold at its own quantile

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_from_groups(
    identity_latent: np.ndarray,
    recon_error: np.ndarray,
    group: np.ndarray,
    draw: np.ndarray,
    *,
    identity: np.ndarray | None = None,
    frame_latent: np.ndarray | None = None,
    frame_recon_error: np.ndarray | None = None,
    config: CalibrationConfig | None = None,
    binner_config: BinnerConfig | None = None,
    model_sha256: str = "",
    held_out: np.ndarray | None = None,
) -> tuple[OnlineBinner, dict]:
    """A binner calibrated on latents of thinned halves: ``group`` = which measured frame
    (0 .. n_frames - 1), ``draw`` = which thinning of it, ``identity`` = the frame's repeat
    group (default: the frame itself). ``frame_latent`` / ``frame_recon_error`` (one row per
    frame, in frame order): the whole frames, which carry the dose that live frames have:
    with >= ``min_groups_for_frame_split`` of them they set the outlier thresholds and the
    reference (a half, at a fraction of the dose, reconstructs and sits differently), and
    they join the spread. ``held_out`` (bool, one per frame): frames that the fine-tuning did
    not train on; with >= 2 of them and >= 2 others, the thresholds are their quantiles and
    the reference centres those of the other whole frames (a frame the model trained on
    reconstructs better than a live frame will). Returns the binner and a summary."""
    cfg = config or CalibrationConfig()
    z = np.asarray(identity_latent, dtype=np.float64)
    err = np.asarray(recon_error, dtype=np.float64).reshape(-1)
    group = np.asarray(group)
    draw = np.asarray(draw)
    identity = group if identity is None else np.asarray(identity)
    if not (len(z) == len(err) == len(group) == len(draw)) or len(z) < 4:
        raise ValueError(f"calibration needs >= 4 latents with one error, group and draw each; "
                         f"got {len(z)}, {len(err)}, {len(group)}, {len(draw)}")
    n_groups = len(np.unique(group))
    base = binner_config or BinnerConfig()
    bcfg = BinnerConfig(**{**base.to_dict(), "spread_quantile": cfg.spread_quantile,
                           "recon_quantile": cfg.recon_quantile,
                           "reference_quantile": cfg.reference_quantile,
                           "n_reference": cfg.n_reference})
    by_frame = n_groups >= cfg.min_groups_for_frame_split
    if not by_frame and len(np.unique(draw)) < 2:
        raise ValueError(f"{n_groups} frame(s) with one thinning each: calibration needs 4 "
                         "frames, or 2 thinnings per frame")
    split_label = group if by_frame else draw
    z_spread, id_spread = z, identity
    z_ref, err_ref, thresholds_from = z, err, "halves"
    if frame_latent is not None:
        zf = np.asarray(frame_latent, dtype=np.float64)
        ef = np.asarray(frame_recon_error, dtype=np.float64).reshape(-1)
        if len(zf) != n_groups or len(ef) != n_groups:
            raise ValueError(f"frame_latent has {len(zf)} rows and frame_recon_error {len(ef)}; "
                             f"expected one per frame ({n_groups})")
        frame_identity = np.zeros(n_groups, dtype=identity.dtype)
        frame_identity[group] = identity  # each frame's repeat group
        z_spread = np.concatenate([z, zf])
        id_spread = np.concatenate([identity, frame_identity])
        if by_frame:
            z_ref, err_ref, split_label = zf, ef, np.arange(n_groups)
            thresholds_from = "whole frames"
    held = None if held_out is None else np.asarray(held_out, dtype=bool)
    if held is not None and len(held) != n_groups:
        raise ValueError(f"held_out has {len(held)} entries; expected one per frame "
                         f"({n_groups})")
    use_held = (held is not None and frame_latent is not None and held.sum() >= 2
                and (~held).sum() >= 2)
    cross_fit = (not use_held and thresholds_from == "whole frames"
                 and len(z_ref) >= 2 * cfg.reference_folds)
    # the reference is computed once, by whichever of the three methods applies
    binner = OnlineBinner(bcfg, model_sha256=model_sha256).calibrate(
        z_spread, id_spread, err_ref, clean_latent=z_ref, clean_recon_error=err_ref,
        clean_identity_label=split_label, reference=not (use_held or cross_fit))
    reference_from = ("by frame" if by_frame else "by thinning (fewer than "
                      f"{cfg.min_groups_for_frame_split} frames)")
    joint = None
    if use_held:
        distance = binner.thresholds_from_held_out(zf[~held], zf[held], ef[held])
        joint = ef[held], distance
        thresholds_from = f"{int(held.sum())} whole frames held out of the fine-tuning"
        reference_from = (f"centres of the {int((~held).sum())} frames fine-tuned on, "
                          f"threshold from the {int(held.sum())} held out")
    elif cross_fit:
        joint = err_ref, binner.reference_cross_fitted(z_ref, cfg.reference_folds)
        reference_from = (f"centres of all {len(z_ref)} frames, threshold "
                          f"{cfg.reference_folds}-fold cross-fitted")
    joint_factor = (1.0 if joint is None or cfg.joint_quantile is None
                    else binner.widen_to_joint_quantile(*joint, cfg.joint_quantile))

    def within(labels):
        return np.concatenate([np.sqrt(((z[labels == g] - z[labels == g].mean(0)) ** 2).sum(1))
                               for g in np.unique(labels)])

    summary = {
        "method": "groups of split halves and repeated thinnings of each adaptation frame",
        "config": cfg.to_dict(),
        "latents": len(z),
        "frames": n_groups,
        "identities": int(len(np.unique(identity))),
        "reference_split": reference_from,
        "thresholds_from": thresholds_from,
        "spread": binner.spread,
        "median_distance_within_frame": float(np.median(within(group))),
        "median_distance_within_identity": float(np.median(within(identity))),
        "recon_threshold": binner.recon_threshold,
        "recon_error_median": float(np.median(err_ref)),
        "reference_threshold": binner.reference_threshold,
        "joint_factor": joint_factor,
        "n_reference": len(binner.reference),
    }
    return binner, summary
