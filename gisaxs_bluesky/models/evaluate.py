"""`gisaxs-bluesky evaluate`: JSON metrics on held-out simulation, or what the model sees on real frames."""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

from ..binning import OnlineBinner
from ..geometry import (
    GeometryError,
    InstrumentGeometry,
    geometry_for_frame,
    user_geometry,
    user_geometry_flags,
)
from ..sim.geometry import Geometry
from ..sim.instruments import HELD_OUT
from ..sim.noise import NOISE_KINDS, NoiseSpec
from ..sim.sample import STRUCTURES
from ..sim.simulate import nominal_mask, simulate
from . import make_binner
from .dataset import DatasetSpec, _detector_noise, identity_setup, iter_identity
from .inference import Encoder, load_encoder, load_pretrained, to_detector_resolution
from .invariance import nearest_across as nearest_across_frames
from .invariance import qgrid_template_distances
from .preprocess import frame_scale, preprocess, preprocess_fine
from .qmodel import QEncoder, is_qgrid_card, plain_encoder

__all__ = [
    "adjusted_rand_index",
    "macro_f1",
    "psnr",
    "psnr_gain_at_detector_resolution",
    "evaluate_simulated",
    "evaluate_instruments",
    "cross_setup_figures",
    "latent_separation",
    "baseline_bins",
    "homogeneity",
    "evaluate_real",
    "read_frame",
    "add_arguments",
    "run",
]

LATTICE = np.array([s not in ("spheres_dilute", "cylinders_dilute") for s in STRUCTURES])


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two labelings of the same items."""
    a = np.unique(np.asarray(labels_true), return_inverse=True)[1]
    b = np.unique(np.asarray(labels_pred), return_inverse=True)[1]
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)

    def comb2(x):
        return (x * (x - 1) / 2).sum()

    index = comb2(table)
    sum_a, sum_b = comb2(table.sum(1)), comb2(table.sum(0))
    expected = sum_a * sum_b / comb2(np.array([len(a)]))
    maximum = (sum_a + sum_b) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


def macro_f1(truth: np.ndarray, pred: np.ndarray) -> tuple[float, list[float]]:
    f1 = []
    for k in range(truth.shape[1]):
        tp = np.sum(pred[:, k] & truth[:, k])
        denom = pred[:, k].sum() + truth[:, k].sum()
        f1.append(float(2 * tp / denom) if denom else 1.0)
    return float(np.mean(f1)), f1


def psnr(estimate: np.ndarray, target: np.ndarray, weight: np.ndarray) -> float:
    """PSNR in dB over weighted pixels, peak = the target's range."""
    mse = (((estimate - target) ** 2) * weight).sum() / max(weight.sum(), 1)
    peak = target[weight > 0].max() - target[weight > 0].min()
    return float(10 * np.log10(peak**2 / max(mse, 1e-12)))


def psnr_gain_at_detector_resolution(encoder: Encoder, counts: np.ndarray, expected: np.ndarray,
                                     mask: np.ndarray) -> tuple[float, float]:
    """PSNR(denoised) - PSNR(noisy) against log1p(expected / scale), over valid pixels; and the
    same for plain block means at the denoiser's resolution (what binning alone gives)."""
    valid = ~mask & (counts >= 0)
    scale = frame_scale(counts, mask)
    target = np.log1p(expected / frame_scale(expected, mask))
    noisy = np.log1p(np.maximum(counts, 0) / scale)
    out = encoder.encode(counts, mask, return_denoised=True)
    fine = preprocess_fine(counts, scale, mask, out.denoised.shape[1:])
    # both 256 x 256 images onto the detector pixels the same way (masked bilinear)
    denoised = to_detector_resolution(out.denoised[0], fine[1] > 0, counts.shape)
    binned = to_detector_resolution(fine[0], fine[1] > 0, counts.shape)
    weight = valid.astype(np.float32)
    base = psnr(noisy, target, weight)
    return psnr(denoised, target, weight) - base, psnr(binned, target, weight) - base


def _simulate_frames(spec: DatasetSpec) -> dict[str, np.ndarray]:
    rows = [row for i in range(spec.n_identities) for row in iter_identity(spec, i)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def evaluate_simulated(
    encoder: Encoder,
    *,
    n_identities: int = 150,
    seed: int = 10_000,
    dose_levels: tuple[float, ...] = (0.3, 3.0, 30.0),
    frames_per_dose: int = 20,
    n_clean: int = 100,
    n_psnr: int = 10,
) -> dict:
    """Held-out metrics (seeds disjoint from training, which uses small seeds)."""
    # identity, noise and sizes: random identities, random artefacts, random dose
    spec = DatasetSpec(n_identities=n_identities, frames_per_identity=2, seed=seed)
    data = _simulate_frames(spec)
    out = encoder.encode_preprocessed(data["inputs"].astype(np.float32))
    truth = data["noise_vector"] > 0.5
    f1, per_kind = macro_f1(truth, out["noise_prob"] >= 0.5)
    structure = data["structure_index"]
    lattice = LATTICE[structure]
    radius_err = out["radius_nm"] / data["radius_nm"] - 1
    distance_err = (out["distance_nm"] / data["distance_nm"] - 1)[lattice]
    metrics: dict = {
        "frames": int(len(structure)),
        "noise_macro_f1": f1,
        "noise_f1": dict(zip(NOISE_KINDS, per_kind, strict=True)),
        "structure_accuracy": float((out["structure_prob"].argmax(1) == structure).mean()),
        "radius_rel_rmse": float(np.sqrt(np.mean(radius_err**2))),
        "distance_rel_rmse": float(np.sqrt(np.mean(distance_err**2))),
    }
    # binning: one identity per structure type, many noisy frames at each dose level
    ari = {}
    flagged = []
    for level, dose in enumerate(dose_levels):
        spec = DatasetSpec(n_identities=len(STRUCTURES), frames_per_identity=frames_per_dose,
                           seed=seed + 1 + level, dose_counts=dose)
        d = _simulate_frames(spec)
        o = encoder.encode_preprocessed(d["inputs"].astype(np.float32))
        order = np.random.default_rng(seed + level).permutation(len(o["latent"]))  # interleaved stream
        binner: OnlineBinner = make_binner(encoder)
        result = binner.assign(o["latent"][order, : encoder.identity_dim], o["recon_error"][order])
        ari[f"{dose:g}"] = adjusted_rand_index(d["structure_index"][order], result.bin_id)
        flagged.append(result.is_outlier)
    metrics["bins_ari_vs_structure"] = ari
    metrics["outlier_fraction_with_artefacts"] = float(np.concatenate(flagged).mean())
    # clean frames (photon noise only, random dose): the binner is calibrated to flag ~1 %
    spec = DatasetSpec(n_identities=n_clean, frames_per_identity=2, seed=seed + 50, p_kind=0.0)
    d = _simulate_frames(spec)
    o = encoder.encode_preprocessed(d["inputs"].astype(np.float32))
    clean = make_binner(encoder).assign(o["latent"][:, : encoder.identity_dim], o["recon_error"])
    metrics["outlier_fraction_clean"] = float(clean.is_outlier.mean())
    # denoising at a median of 1 count / pixel, judged at detector resolution: the frame as
    # measured vs the clean log intensity, and the model's reconstruction expanded to pixels
    spec = DatasetSpec(n_identities=n_psnr, frames_per_identity=1, seed=seed + 99, dose_counts=1.0,
                       p_kind=0.0, binned=False, jitter_geometry=False)
    mask = nominal_mask(Geometry())
    gains = np.array([psnr_gain_at_detector_resolution(encoder, row["counts"], row["expected"],
                                                       mask)
                      for i in range(spec.n_identities) for row in iter_identity(spec, i)])
    metrics["psnr_gain_db_at_1_count"] = float(gains[:, 0].mean())
    metrics["psnr_gain_db_at_1_count_block_means_only"] = float(gains[:, 1].mean())
    metrics["reference_recon_error"] = np.quantile(out["recon_error"], [0.5, 0.9, 0.99]).tolist()
    return metrics


def homogeneity(classes: np.ndarray, bins: np.ndarray) -> float:
    """Fraction of frames whose bin's majority class is their own (1: no bin mixes classes)."""
    classes, bins = np.asarray(classes), np.asarray(bins)
    agree = 0
    for b in np.unique(bins):
        in_bin = classes[bins == b]
        agree += np.bincount(in_bin).max()
    return float(agree / max(len(classes), 1))


def baseline_features(frames: list[np.ndarray], masks: list[np.ndarray],
                      n_components: int = 10) -> np.ndarray:
    """The baseline's features: log block means (128 x 128, the pixel model's first channel),
    centred, projected on their first ``n_components`` principal components."""
    x = np.stack([preprocess(f, m)[0].ravel() for f, m in zip(frames, masks, strict=True)])
    x = x - x.mean(0)
    u, sv, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :n_components] * sv[:n_components]


def baseline_bins(frames: list[np.ndarray], masks: list[np.ndarray], n_clusters: int,
                  seed: int = 0, n_components: int = 10) -> np.ndarray:
    """Log block means (128 x 128, the pixel model's first channel) + PCA + k-means with the
    true number of identities: what plain binning achieves without a model."""
    z = baseline_features(frames, masks, n_components)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(10):  # k-means++ restarts
        centres = [z[rng.integers(len(z))]]
        for _ in range(1, n_clusters):
            d2 = np.min([((z - c) ** 2).sum(1) for c in centres], axis=0)
            centres.append(z[rng.choice(len(z), p=d2 / d2.sum())] if d2.sum() > 0 else z[0])
        centres = np.array(centres)
        for _ in range(100):
            labels = np.argmin(((z[:, None] - centres[None]) ** 2).sum(-1), axis=1)
            new = np.array([z[labels == k].mean(0) if (labels == k).any() else centres[k]
                            for k in range(n_clusters)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = ((z - centres[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def _held_out_frames(name: str, n_identities: int, frames_per_identity: int, dose: float,
                     seed: int) -> tuple:
    """Frames of ``n_identities`` samples on the held-out set-up ``name`` (photon and the
    detector's own noise): frames, masks, identity, structure, radius, distance, geometry.
    The samples depend on ``seed`` only, so one seed on two set-ups measures the same
    samples on both."""
    spec = DatasetSpec(n_identities=n_identities, frames_per_identity=frames_per_identity,
                       seed=seed, instruments=name, dose_counts=dose, p_kind=0.0,
                       binned=False, jitter_geometry=False)
    frames, masks, ids, structure, radius, distance = [], [], [], [], [], []
    for i in range(n_identities):
        rng, sample, geometry = identity_setup(spec, i)
        for _ in range(frames_per_identity):
            noise = _detector_noise(NoiseSpec(dose, {"poisson": 1.0, "gaps": 1.0}),
                                    geometry, rng)
            frames.append(simulate(sample, geometry, noise, rng, compute_binning=4).counts)
            masks.append(nominal_mask(geometry))
            ids.append(i)
            structure.append(sample.structure_index)
            radius.append(sample.radius_nm)
            distance.append(sample.distance_nm)
    return (frames, masks, np.array(ids), np.array(structure), np.array(radius),
            np.array(distance), geometry)


def evaluate_cross_instrument(
    qencoder,
    *,
    instruments: tuple[str, str] = ("p03_pilatus1m_2.4m", "lab_ccd1024_cu_1.2m"),
    n_identities: int = 10,
    frames_per_identity: int = 4,
    dose: float = 3.0,
    seed: int = 31_000,
) -> dict:
    """One set of samples measured on two held-out set-ups (:func:`cross_setup_figures`)."""
    if not isinstance(qencoder, QEncoder):
        qencoder = QEncoder(qencoder)
    sets = [_held_out_frames(name, n_identities, frames_per_identity, dose, seed)
            for name in instruments]
    return {"instruments": list(instruments), "dose_counts": dose,
            **cross_setup_figures(qencoder, sets, seed=seed)}


def cross_setup_figures(encoder, sets, *, seed: int = 0) -> dict:
    """The same samples measured on two set-ups, streamed in random order through one fresh
    calibrated binner: the fraction of (frame on one, frame on the other) pairs of the same
    sample that share a bin (issue target >= 90 %), the same for pairs of different samples
    (merges), ARI of bins vs sample over both, how often a frame's nearest frame on the other
    set-up (identity latents) is the same sample, and per set-up structure accuracy, radius /
    distance relative RMS and clean frames flagged; log block means + PCA (+ k-means with the
    true number of samples) on the same frames alongside.

    ``sets``: two (frames, masks, sample ids, structure index, radius nm, distance nm,
    :class:`~gisaxs_bluesky.sim.geometry.Geometry`) tuples, the ids shared between them. A
    :class:`QEncoder` remaps each set with its geometry (and the model-free q-grid template
    baseline is added); a pixel :class:`Encoder` takes the pixels as they are."""
    is_q = isinstance(encoder, QEncoder)
    latent, err, ids, side, frames, masks, q_in, per_setup = [], [], [], [], [], [], [], []
    for k, (fr, ms, idk, structure, radius, distance, geometry) in enumerate(sets):
        if is_q:
            x = encoder.inputs(list(fr), geometry.instrument(), ms[0])
            out = encoder.encode_inputs(x)
            q_in.append(x.cpu().numpy() if hasattr(x, "cpu") else x)
        else:
            out = encoder.encode(np.stack(fr), ms[0])
        latent.append(out.identity_latent)
        err.append(out.recon_error)
        ids.append(np.asarray(idk))
        side.append(np.full(len(idk), k))
        frames += list(fr)
        masks += list(ms)
        per_setup.append(_estimates(out, np.asarray(structure), np.asarray(radius),
                                    np.asarray(distance, dtype=float)))
    latent, err = np.concatenate(latent), np.concatenate(err)
    ids, side = np.concatenate(ids), np.concatenate(side)
    n_identities = len(np.unique(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    assigned = make_binner(plain_encoder(encoder)).assign(latent[order], err[order])
    bins = np.empty_like(assigned.bin_id)
    bins[order] = assigned.bin_id
    flagged = np.empty_like(assigned.is_outlier)
    flagged[order] = assigned.is_outlier
    base = baseline_bins(frames, masks, n_identities, seed=seed)

    def pairs(labels: np.ndarray) -> tuple[float, float]:
        """(same sample, different samples): fractions of cross-instrument pairs in one bin
        (frames without a bin, id < 0, share none)."""
        ia, ib = np.flatnonzero(side == 0), np.flatnonzero(side == 1)
        same_bin = (labels[ia][:, None] == labels[ib][None, :]) & (labels[ia][:, None] >= 0)
        same_id = ids[ia][:, None] == ids[ib][None, :]
        return float(same_bin[same_id].mean()), float(same_bin[~same_id].mean())

    def nearest_across(features: np.ndarray | None, d2: np.ndarray | None = None) -> float:
        """Fraction of frames whose nearest frame on the other set-up is the same sample
        (chance: 1 / n_identities); needs no binner calibration. ``d2``: (N, N) distances
        in place of features."""
        if d2 is None:
            d2 = ((features[:, None] - features[None]) ** 2).sum(-1)
        nearest, has = nearest_across_frames(d2, side)  # a frame that finds none: a miss
        return float(((ids[nearest] == ids) & has).mean())

    same, other = pairs(bins)
    base_same, base_other = pairs(base)
    base_features = baseline_features(frames, masks)
    for k, row in enumerate(per_setup):
        row["outlier_fraction_clean"] = float(flagged[side == k].mean())
    report = {
        "frames": int(len(ids)),
        "bins": int(len(np.unique(bins))),
        "pairs_same_sample_in_one_bin": same,
        "pairs_other_samples_in_one_bin": other,
        "ari_vs_identity": adjusted_rand_index(ids, bins),
        "nearest_across_same_sample": nearest_across(latent),
        "chance": 1.0 / n_identities,
        "outlier_fraction_clean": float(assigned.is_outlier.mean()),
        "per_setup": per_setup,
        "baseline_nearest_across_same_sample": nearest_across(base_features),
        "baseline_pairs_same_sample_in_one_bin": base_same,
        "baseline_pairs_other_samples_in_one_bin": base_other,
        "baseline_ari_vs_identity": adjusted_rand_index(ids, base),
    }
    if is_q:  # the q grid without a model: 4 x 4 blocks over what both frames see, level-free
        report["qgrid_baseline_nearest_across_same_sample"] = nearest_across(
            None, qgrid_template_distances(np.concatenate(q_in)))
    return report


def latent_separation(latent: np.ndarray, ids: np.ndarray, binner: OnlineBinner) -> dict:
    """How far apart the identity latents of one sample's frames and of other samples' frames
    lie, beside the distance at which the calibrated binner joins a frame to a bin: what
    binning can reach with these latents whatever the binner's calibration."""
    z = np.asarray(latent, dtype=np.float64)
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    same = np.asarray(ids)[:, None] == np.asarray(ids)[None]
    within = d[same & ~np.eye(len(z), dtype=bool)]
    return {
        "latent_same_sample_q95": float(np.quantile(within, 0.95)) if within.size else None,
        "latent_other_samples_q05": float(np.quantile(d[~same], 0.05)) if (~same).any() else None,
        "binner_join_distance": float(binner.config.join_radius * binner.spread),
    }


def _estimates(out, structure: np.ndarray, radius: np.ndarray, distance: np.ndarray) -> dict:
    """Structure accuracy and radius / distance (lattice classes only) relative RMS."""
    lattice = LATTICE[structure]
    return {
        "structure_accuracy": float((out.structure_prob.argmax(1) == structure).mean()),
        "radius_rel_rmse": float(np.sqrt(np.mean((out.radius_nm / radius - 1) ** 2))),
        "distance_rel_rmse": float(np.sqrt(np.mean(
            (out.distance_nm / distance - 1)[lattice] ** 2))) if lattice.any() else None,
    }


def evaluate_instruments(
    qencoder,
    *,
    instruments: tuple[str, ...] | None = None,
    n_identities: int = 10,
    frames_per_identity: int = 6,
    dose_levels: tuple[float, ...] = (0.3, 3.0, 30.0),
    seed: int = 30_000,
) -> dict:
    """A q-grid model on set-ups that training never draws, with the baseline side by side.

    Per instrument and dose: ``n_identities`` samples (all structure types), each measured
    ``frames_per_identity`` times (photon noise and the detector's own noise only), streamed in
    random order through a fresh calibrated binner; ARI of bins vs identity, homogeneity of bins
    in structure type, clean frames flagged as outliers, structure accuracy, radius/distance
    relative RMS; and log block means + PCA + k-means on the same frames.
    """
    if not isinstance(qencoder, QEncoder):
        qencoder = QEncoder(qencoder)
    instruments = instruments or tuple(HELD_OUT)
    report: dict = {}
    for name in instruments:
        per_dose = {}
        for level, dose in enumerate(dose_levels):
            frames, masks, ids, structure, radius, distance, geometry = _held_out_frames(
                name, n_identities, frames_per_identity, dose, seed + 100 * level)
            out = qencoder.encode(np.stack(frames), geometry.instrument(), masks[0])
            order = np.random.default_rng(seed + level).permutation(len(ids))
            binner = make_binner(qencoder.encoder)
            assigned = binner.assign(out.identity_latent[order], out.recon_error[order])
            bins = np.empty_like(assigned.bin_id)
            bins[order] = assigned.bin_id
            base = baseline_bins(frames, masks, n_identities, seed=seed)
            per_dose[f"{dose:g}"] = {
                "frames": int(len(ids)),
                "bins": int(len(np.unique(bins))),
                "ari_vs_identity": adjusted_rand_index(ids, bins),
                "homogeneity_structure": homogeneity(structure, bins),
                "outlier_fraction_clean": float(assigned.is_outlier.mean()),
                **_estimates(out, structure, radius, distance),
                **latent_separation(out.identity_latent, ids, binner),
                "baseline_ari_vs_identity": adjusted_rand_index(ids, base),
                "baseline_homogeneity_structure": homogeneity(structure, base),
            }
        report[name] = per_dose
    return report


def read_frame(path: str | Path) -> np.ndarray:
    """A detector frame from TIFF (optionally .gz), .npy or HDF5 (first 2-D dataset)."""
    frame = _read_frame(Path(path))
    if frame.size == 0:  # tifffile returns an empty array for a file without a readable page
        raise ValueError(f"cannot read detector frame {path}: no image data (shape {frame.shape})")
    return frame


def _read_frame(path: Path) -> np.ndarray:
    import tifffile

    name = path.name.lower()
    try:
        if name.endswith((".tif.gz", ".tiff.gz")):
            with gzip.open(path) as f:
                return tifffile.imread(f)
        if name.endswith((".tif", ".tiff")):
            return tifffile.imread(path)
        if name.endswith(".npy"):
            return np.load(path)
        if name.endswith((".h5", ".hdf5", ".nxs")):
            import h5py

            with h5py.File(path, "r") as f:
                found = []
                f.visititems(lambda k, v: found.append(k) if getattr(v, "ndim", 0) >= 2 else None)
                if not found:
                    raise ValueError(f"{path} has no 2-D dataset")
                data = f[found[0]]
                return data[()] if data.ndim == 2 else data[0]
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"cannot read detector frame {path}: {exc}") from exc
    raise ValueError(f"{path}: unknown frame format (use .tif, .tif.gz, .npy, .h5)")


def evaluate_real(encoder: Encoder, paths: list[Path], reference_errors: np.ndarray | None = None,
                  masks: list[Path] = (), geometry=None) -> list[dict]:
    """What the model sees on measured frames: noise kinds, identity guess, recon-error rank,
    outlier score (the card's calibrated binner, as a scan's first frame would get it).

    ``masks`` are detector masks (non-zero = not data), applied to frames of their shape. A
    q-grid model (card ``"input": "qgrid"``) needs ``geometry`` (a record, a mapping of
    ``gisaxs_geometry`` keys or a PONI path; the frame's shape fills ``detector_shape``) and
    remaps each frame with it; without one each frame's report says so. The pixel model
    ignores it.
    """
    qgrid = is_qgrid_card(encoder.card)
    qencoder = (encoder if isinstance(encoder, QEncoder) else QEncoder(encoder)) if qgrid else None
    encoder = plain_encoder(encoder)
    explicit = user_geometry(geometry) if qgrid else None
    reports = []
    mask_by_shape = {}
    for path in masks:
        mask = read_frame(path) != 0
        mask_by_shape[mask.shape] = (mask, Path(path).name)
    if reference_errors is None:
        spec = (DatasetSpec(n_identities=20, frames_per_identity=2, seed=20_000,
                            instruments="train", input_mode="qgrid") if qgrid
                else DatasetSpec(n_identities=20, frames_per_identity=2, seed=20_000))
        ref = _simulate_frames(spec)["inputs"].astype(np.float32)
        reference_errors = (qencoder.encode_inputs(ref).recon_error if qgrid
                            else encoder.encode_preprocessed(ref)["recon_error"])
    for path in paths:
        report: dict = {}
        try:
            frame = read_frame(path)
            if frame.ndim != 2:
                raise ValueError(f"{path} holds shape {frame.shape}, not a 2-D frame")
            mask, mask_name = mask_by_shape.get(frame.shape, (None, None))
            if qgrid:
                record = _real_frame_geometry(explicit, frame.shape)
                report["geometry"] = record.to_dict()
                report["geometry_outside_card"] = qencoder.outside_card(record)
                r = qencoder.encode(frame, record, mask)
            else:
                r = encoder.encode(frame, mask)
        except (ValueError, GeometryError) as exc:
            reports.append({"file": str(path), "error": str(exc)})
            continue
        err = float(r.recon_error[0])
        assigned = make_binner(encoder).assign(r.identity_latent, r.recon_error)
        reports.append({
            "file": Path(path).name,
            "shape": list(frame.shape),
            "dtype": str(frame.dtype),
            "model_input": "qgrid" if qgrid else "pixels",
            "flagged_pixels": int((frame < 0).sum()),
            "mask": mask_name,
            **report,
            "noise_kinds_detected": r.noise_detected()[0],
            "noise_prob": {k: round(float(p), 3) for k, p in zip(r.noise_kinds, r.noise_prob[0], strict=True)},
            "structure": str(r.structure[0]),
            "structure_prob": {k: round(float(p), 3)
                               for k, p in zip(r.structures, r.structure_prob[0], strict=True)},
            "radius_nm": round(float(r.radius_nm[0]), 2),
            "distance_nm": round(float(r.distance_nm[0]), 2),
            "recon_error": round(err, 4),
            "recon_error_percentile_vs_sim": round(float((reference_errors < err).mean() * 100), 1),
            "outlier_score": round(float(assigned.outlier_score[0]), 3),
            "is_outlier": bool(assigned.is_outlier[0]),
        })
    return reports


def _real_frame_geometry(explicit, shape: tuple[int, ...]) -> InstrumentGeometry:
    """The geometry a q-grid model remaps a measured frame with: the user's, the frame's own
    shape where the user named no detector (GeometryError names what is missing)."""
    if explicit is None:
        raise GeometryError("a q-grid model needs the frame's geometry: give --geometry "
                            "(gisaxs_geometry keys as JSON or a JSON file) or --poni FILE")
    descriptor = {"data_keys": {"frame": {"dtype": "array", "shape": list(shape)}}}
    record = geometry_for_frame({}, descriptor, {}, explicit)
    if tuple(record.shape) != tuple(shape):
        raise GeometryError(f"the geometry's detector is {tuple(record.shape)} pixels, "
                            f"the frame {tuple(shape)}")
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint (.pt); default: the shipped pretrained model")
    parser.add_argument("--identities", type=int, default=150)
    parser.add_argument("--seed", type=int, default=10_000, help="held-out seed (training uses < 100)")
    parser.add_argument("--real", nargs="*", metavar="PATH",
                        help="measured frames or folders of them (.tif, .tif.gz, .npy, .h5)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--instruments", nargs="*", metavar="NAME",
                        help="a q-grid model on held-out set-ups (sim.instruments.HELD_OUT; "
                        "none named: all), with log block means + PCA + k-means alongside")
    parser.add_argument("--frames-per-identity", type=int, default=6)
    parser.add_argument("--invariance", metavar="SET",
                        help="a q-grid model on a binned q-grid set with each sample on several "
                        "instruments (simulate --instruments-per-identity 2): latent distances "
                        "within and across instruments, nearest-across retrieval, the q-grid "
                        "template baseline alongside")
    parser.add_argument("--geometry", metavar="JSON|FILE",
                        help="--real with a q-grid model: the frames' geometry as "
                        "gisaxs_geometry keys (JSON text or file) or a PONI file")
    parser.add_argument("--poni", metavar="FILE",
                        help="--real with a q-grid model: a pyFAI PONI calibration")


def run(args: argparse.Namespace) -> int:
    encoder = load_encoder(args.model, args.device) if args.model else load_pretrained(args.device)
    result: dict = {"model": encoder.info()}
    if args.invariance:
        from .invariance import evaluate_invariance

        result["invariance"] = evaluate_invariance(encoder, args.invariance)
    elif args.instruments is not None:
        names = tuple(args.instruments) or tuple(HELD_OUT)
        result["instruments"] = evaluate_instruments(
            encoder, instruments=names, n_identities=min(args.identities, 50),
            frames_per_identity=args.frames_per_identity, seed=args.seed)
        if len(names) >= 2:  # the same samples on the first two set-ups
            result["cross_instrument"] = evaluate_cross_instrument(
                encoder, instruments=names[:2], n_identities=min(args.identities, 50),
                frames_per_identity=args.frames_per_identity, seed=args.seed + 1000)
    elif args.real is not None:
        paths: list[Path] = []
        for p in map(Path, args.real or []):
            if p.is_dir():
                paths += sorted(q for q in p.iterdir()
                                if q.name.lower().endswith((".tif", ".tif.gz", ".tiff", ".npy", ".h5")))
            else:
                paths.append(p)
        # files named *mask* are detector masks, not frames
        masks = [p for p in paths if "mask" in p.name.lower()]
        frames = [p for p in paths if p not in masks]
        try:
            geometry = user_geometry_flags(args.geometry, args.poni)
        except GeometryError as exc:
            print(f"evaluate: {exc}", file=sys.stderr)
            return 2
        result["real"] = evaluate_real(encoder, frames, masks=masks, geometry=geometry)
    else:
        result["simulated"] = evaluate_simulated(encoder, n_identities=args.identities, seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0
