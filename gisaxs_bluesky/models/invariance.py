"""How far a q-grid model's identity latent is from instrument-invariant, on a set that
measures each sample on several instruments (``simulate --instruments-per-identity K``).

Binning across set-ups works when one sample's frames on two instruments lie closer together
than two samples on one: :func:`evaluate_invariance` reports the mean latent distances
(same sample and instrument, same sample across instruments, other samples), their ratios,
and how often a frame's nearest frame measured on another instrument is the same sample (or
at least the same structure type). A baseline that needs no model is alongside: the q grid's
own log intensity in 4 x 4 blocks, compared over the blocks both frames see, level-free.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .inference import Encoder

__all__ = ["evaluate_invariance", "latent_invariance", "nearest_across",
           "qgrid_template_distances"]

_INSTRUMENT_KEYS = ("detector_index", "sample_distance_mm", "wavelength_nm", "incidence_deg")


def latent_invariance(z: np.ndarray, identity: np.ndarray, instrument: np.ndarray,
                      structure: np.ndarray) -> dict:
    """Distances and nearest-across retrieval of (N, D) latents with their labels."""
    z = np.asarray(z, dtype=np.float64)
    sq = (z**2).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * z @ z.T, 0))
    return {**_distances(d, identity, instrument),
            **_retrieval(d, identity, instrument, structure)}


def qgrid_template_distances(inputs: np.ndarray, block: int = 4, min_blocks: int = 20
                             ) -> np.ndarray:
    """(N, N) level-free mean squared difference of the q-grid log intensity of each pair of
    (N, 8, n_q_z, n_q_par) inputs over the ``block`` x ``block`` blocks both see (inf where they
    share fewer than ``min_blocks``)."""
    x = np.asarray(inputs, dtype=np.float32)
    n, _, rows, cols = x.shape
    good = (x[:, 1] > 0).astype(np.float32)
    shape = (n, rows // block, block, cols // block, block)
    seen = good.reshape(shape).mean(axis=(2, 4))
    level = (x[:, 0] * good).reshape(shape).sum(axis=(2, 4)) / np.maximum(
        seen * block * block, 1e-3)
    w = (seen > 0.75).reshape(n, -1).astype(np.float64)
    li = level.reshape(n, -1).astype(np.float64)
    out = np.full((n, n), np.inf)
    for i in range(n):
        both = w[i] * w
        count = both.sum(1)
        diff = (li[i] - li) * both
        shift = diff.sum(1) / np.maximum(count, 1)
        var = (((li[i] - li) - shift[:, None]) ** 2 * both).sum(1) / np.maximum(count, 1)
        out[i] = np.where(count >= min_blocks, var, np.inf)
    return out


def nearest_across(d: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest, has): for each row of the (N, N) distances ``d``, the nearest column in
    another ``group`` (instrument, set-up), and whether it has any finite distance there (a
    frame that shares nothing comparable with any frame across finds none)."""
    group = np.asarray(group)
    other = np.where(group[:, None] != group[None], d, np.inf)
    return other.argmin(1), np.isfinite(other).any(1)


def _retrieval(d: np.ndarray, identity, instrument, structure, prefix: str = "") -> dict:
    identity, structure = np.asarray(identity), np.asarray(structure)
    nearest, has = nearest_across(d, instrument)
    return {
        prefix + "nearest_across_same_sample": float((identity[nearest] == identity)[has].mean()),
        prefix + "nearest_across_same_structure": float(
            (structure[nearest] == structure)[has].mean()),
        prefix + "frames_compared": int(has.sum()),
    }


def _distances(d: np.ndarray, identity, instrument) -> dict:
    identity, instrument = np.asarray(identity), np.asarray(instrument)
    same = identity[:, None] == identity[None]
    same_inst = instrument[:, None] == instrument[None]
    off = ~np.eye(len(d), dtype=bool)
    within = d[same & same_inst & off]
    across = d[same & ~same_inst]
    between = d[~same & np.isfinite(d)]
    if not within.size or not across.size:
        raise ValueError("the set has no sample measured twice on one instrument and on two "
                         "instruments: simulate it with --instruments-per-identity 2 and "
                         "--frames-per-identity >= 4")
    return {
        "same_sample_same_instrument": float(within.mean()),
        "same_sample_across_instruments": float(across.mean()),
        "other_samples": float(between.mean()),
        "across_over_same_instrument": float(across.mean() / within.mean()),
        "other_over_across": float(between.mean() / across.mean()),
    }


def evaluate_invariance(encoder: Encoder, path: str | Path, batch: int = 64) -> dict:
    """:func:`latent_invariance` of ``encoder`` on a binned q-grid set at ``path``, with the
    q-grid template baseline (:func:`qgrid_template_distances`) alongside."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("input_mode") != "qgrid" or "inputs" not in f:
            raise ValueError(f"{path}: not a binned q-grid set (simulate --input-mode qgrid)")
        missing = [k for k in ("identity", "structure_index", *_INSTRUMENT_KEYS) if k not in f]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)}: simulate it again with this "
                             "version")
        inputs = f["inputs"][:].astype(np.float32)
        identity = f["identity"][:]
        structure = f["structure_index"][:]
        keys = np.stack([f[k][:].astype(np.float64) for k in _INSTRUMENT_KEYS], axis=1)
        per_identity = int(f.attrs.get("instruments_per_identity", 1))
    instrument = np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)
    z = np.concatenate([encoder.encode_preprocessed(inputs[s : s + batch])["latent"]
                        for s in range(0, len(inputs), batch)])[:, : encoder.identity_dim]
    samples = len(np.unique(identity))
    out = {"set": str(path), "frames": len(inputs), "samples": samples,
           "instruments_per_identity": per_identity, "chance": 1 / samples}
    out.update(latent_invariance(z, identity, instrument, structure))
    out.update(_retrieval(qgrid_template_distances(inputs), identity, instrument, structure,
                          prefix="baseline_"))
    return out
