"""Labelled training / evaluation sets: streamed to HDF5, bounded memory, parallel workers."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from ..geometry import QGrid, remap, remap_table
from ..sim.geometry import Geometry
from ..sim.instruments import (
    ALL_DETECTORS,
    HELD_OUT,
    at_wavelength,
    instrument_ranges,
    random_instrument,
)
from ..sim.noise import NOISE_KINDS, NoiseSpec, random_noise
from ..sim.noise_transfer import (
    NoiseModel,
    NoiseModelError,
    load_noise_model,
    simulate_with_noise_model,
)
from ..sim.sample import STRUCTURES, Sample, random_sample
from ..sim.simulate import SimResult, expected_intensity, nominal_mask, simulate
from .preprocess import N_CHANNELS, preprocess_fine, preprocess_with_scale, q_inputs

__all__ = ["DatasetSpec", "generate", "iter_identity", "pool2", "add_arguments", "run"]


@dataclass(frozen=True)
class DatasetSpec:
    """What to simulate: identities x noisy frames each, and at which resolution to store.

    ``binned=True`` stores model inputs (8, 128, 128), clean targets (64, 64) and, for the
    denoiser, the measured and clean log intensity at 256 x 256 as float16;
    ``binned=False`` stores full detector counts and expected intensity (float32).
    """

    n_identities: int = 100
    frames_per_identity: int = 2
    seed: int = 0
    binned: bool = True
    dose_range: tuple[float, float] = (0.1, 100.0)
    p_kind: float = 0.3
    dose_counts: float | None = None  # fixed dose (evaluation at a dose level)
    structures: tuple[str, ...] = STRUCTURES
    jitter_geometry: bool = True
    # probability that a frame is preprocessed with the nominal mask (gaps + beamstop), as
    # with a user mask; otherwise with the detector's own flags only, as a callback without a
    # mask sees it (the beamstop and, when the stop is off its place, the direct beam)
    p_mask: float = 0.5
    compute_binning: int = 6
    # "shipped": the Pilatus 1M set-up the shipped model knows (beam and incidence jittered);
    # "train": random instruments per identity (sim.instruments.random_instrument);
    # a name in sim.instruments.HELD_OUT: that set-up, which training never draws
    instruments: str = "shipped"
    # with instruments="train" and the q grid: each identity measured on this many random
    # instruments (frames round-robin over them), so that the consistency loss pulls one
    # sample's latents together across geometries, not only across noise draws
    instruments_per_identity: int = 1
    # "pixels": detector blocks (models.preprocess.preprocess); "qgrid": the fixed (q_z, q_par)
    # grid of geometry.QGrid() (models.preprocess.q_inputs)
    input_mode: str = "pixels"
    # a noise model (sim.noise_transfer, `gisaxs-bluesky noise-fit`): detector noise, dose and
    # artefacts of a beamtime's frames instead of random_noise's
    noise_from: str | None = None
    noise_from_fraction: float = 1.0  # share of the frames with it; the others random_noise's

    def __post_init__(self) -> None:
        if self.n_identities < 1 or self.frames_per_identity < 1:
            raise ValueError(
                f"n_identities={self.n_identities} and frames_per_identity="
                f"{self.frames_per_identity} must be >= 1"
            )
        if not 0 <= self.p_mask <= 1:
            raise ValueError(f"p_mask={self.p_mask} must be a probability in [0, 1]")
        for s in self.structures:
            if s not in STRUCTURES:
                raise ValueError(f"structure {s!r} is not one of {STRUCTURES}")
        if self.instruments not in ("shipped", "train", *HELD_OUT):
            raise ValueError(f"instruments={self.instruments!r} must be 'shipped', 'train' or "
                             f"one of {sorted(HELD_OUT)}")
        if self.input_mode not in ("pixels", "qgrid"):
            raise ValueError(f"input_mode={self.input_mode!r} must be 'pixels' or 'qgrid'")
        if self.instruments_per_identity < 1:
            raise ValueError(f"instruments_per_identity={self.instruments_per_identity} must "
                             "be >= 1")
        if self.instruments_per_identity > 1 and (self.instruments != "train"
                                                  or self.input_mode != "qgrid"):
            raise ValueError("instruments_per_identity > 1 needs instruments='train' and "
                             "input_mode='qgrid' (one sample on several random instruments, on "
                             "the common q grid)")
        if not self.binned and self.instruments == "train":
            raise ValueError("full frames (binned=False) need one detector: instruments='train' "
                             "draws several")

    @property
    def n_frames(self) -> int:
        return self.n_identities * self.frames_per_identity


def pool2(log_image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """2 x 2 valid-weighted mean of a (h, w) image -> (h/2, w/2): the decoder's resolution."""
    h, w = log_image.shape
    num = (log_image * valid).reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3))
    den = valid.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3))
    return np.where(den > 0, num / np.maximum(den, 1e-6), 0).astype(np.float32)


def _identity_geometry(rng: np.random.Generator, jitter: bool) -> Geometry:
    base = Geometry()
    if not jitter:
        return base
    r, c = base.beam_center_px
    return replace(
        base,
        beam_center_px=(r + rng.uniform(-8, 8), c + rng.uniform(-8, 8)),
        incidence_deg=float(rng.uniform(0.40, 0.55)),
    )


def _identity_sample(spec: DatasetSpec, index: int) -> tuple[np.random.Generator, Sample]:
    """The identity's random stream and its sample at the reference wavelength."""
    rng = np.random.default_rng([spec.seed, index])
    structure = spec.structures[index % len(spec.structures)]
    return rng, random_sample(rng, structure=structure)


def identity_setups(spec: DatasetSpec, index: int
                    ) -> tuple[np.random.Generator, list[tuple[Sample, Geometry]]]:
    """(rng, [(sample, geometry)] * ``spec.instruments_per_identity``): one sample on each of
    its instruments, its refractive indices at each instrument's wavelength. The first is
    :func:`identity_setup`'s; the others are drawn after it from the same stream."""
    rng, base, geometry = _identity_draw(spec, index)
    setups = [(_at_instrument(spec, base, geometry), geometry)]
    if spec.instruments_per_identity > 1:
        for _ in range(spec.instruments_per_identity - 1):
            g = random_instrument(rng)
            setups.append((at_wavelength(base, g.wavelength_nm), g))
    return rng, setups


def identity_setup(spec: DatasetSpec, index: int) -> tuple[np.random.Generator, Sample, Geometry]:
    """(rng, sample, geometry) of identity ``index``; the sample's refractive indices are those
    at the instrument's wavelength."""
    rng, sample, geometry = _identity_draw(spec, index)
    return rng, _at_instrument(spec, sample, geometry), geometry


def _identity_draw(spec: DatasetSpec, index: int
                   ) -> tuple[np.random.Generator, Sample, Geometry]:
    """(rng, sample at the reference wavelength, geometry) of identity ``index``."""
    rng, sample = _identity_sample(spec, index)
    if spec.instruments == "shipped":
        return rng, sample, _identity_geometry(rng, spec.jitter_geometry)
    if spec.instruments == "train":
        return rng, sample, random_instrument(rng)
    geometry = HELD_OUT[spec.instruments]
    if spec.jitter_geometry:
        r, c = geometry.beam_center_px
        geometry = replace(geometry, beam_center_px=(r + rng.uniform(-8, 8),
                                                     c + rng.uniform(-8, 8)))
    return rng, sample, geometry


def _at_instrument(spec: DatasetSpec, sample: Sample, geometry: Geometry) -> Sample:
    """The sample's refractive indices at the geometry's wavelength (the shipped instrument
    keeps the reference ones)."""
    if spec.instruments == "shipped":
        return sample
    return at_wavelength(sample, geometry.wavelength_nm)


def _detector_noise(noise: NoiseSpec, geometry: Geometry, rng: np.random.Generator) -> NoiseSpec:
    """An integrating detector (CCD) always has gain and readout noise and flags no gaps."""
    if geometry.detector.counting:
        return noise
    kinds = {k: v for k, v in noise.kinds.items() if k != "gaps"}
    kinds.setdefault("readout", float(rng.uniform(0.2, 1.0)))
    return NoiseSpec(noise.dose_counts, kinds)


def iter_identity(spec: DatasetSpec, index: int) -> Iterator[dict]:
    """Frames of identity ``index``: one sample + geometry, fresh noise for each frame."""
    if spec.input_mode == "qgrid":
        yield from _iter_identity_q(spec, index)
        return
    rng, sample, geometry = identity_setup(spec, index)
    mask = nominal_mask(geometry)
    clean = expected_intensity(sample, geometry, dose_counts=10.0,
                               compute_binning=spec.compute_binning)
    clean_in, clean_scale = preprocess_with_scale(clean, mask, None)
    target = pool2(clean_in[0], clean_in[1])
    fine_target = preprocess_fine(clean, clean_scale, mask)[0] if spec.binned else None
    for _ in range(spec.frames_per_identity):
        noise, result = _noisy_frame(spec, sample, geometry, rng)
        row = _labels(index, sample, noise, geometry)
        if spec.binned:
            frame_mask = mask if rng.random() < spec.p_mask else None
            inputs, scale = preprocess_with_scale(result.counts, frame_mask, None)
            row["inputs"] = inputs.astype(np.float16)
            row["target"] = target.astype(np.float16)
            row["fine"] = preprocess_fine(result.counts, scale, frame_mask).astype(np.float16)
            row["fine_target"] = fine_target.astype(np.float16)
        else:
            row["counts"] = result.counts.astype(np.float32)
            row["expected"] = clean * np.float32(noise.dose_counts / 10.0)
        yield row


def _noisy_frame(spec: DatasetSpec, sample: Sample, geometry: Geometry,
                 rng: np.random.Generator) -> tuple[NoiseSpec, SimResult]:
    if spec.noise_from and (spec.noise_from_fraction >= 1
                            or rng.random() < spec.noise_from_fraction):
        result, noise = simulate_with_noise_model(sample, geometry, _noise_model(spec.noise_from),
                                                  rng, compute_binning=spec.compute_binning,
                                                  dose_counts=spec.dose_counts)
        return noise, result
    noise = _detector_noise(random_noise(rng, dose_range=spec.dose_range, p_kind=spec.p_kind,
                                         dose_counts=spec.dose_counts), geometry, rng)
    return noise, simulate(sample, geometry, noise, rng, compute_binning=spec.compute_binning)


@lru_cache(maxsize=4)
def _noise_model(path: str) -> NoiseModel:
    return load_noise_model(path)


def _labels(index: int, sample: Sample, noise: NoiseSpec, geometry: Geometry) -> dict:
    name = geometry.detector.name
    return {
        "identity": index,
        "structure_index": sample.structure_index,
        "radius_nm": sample.radius_nm,
        "distance_nm": sample.distance_nm,
        "dose_counts": noise.dose_counts,
        "noise_vector": noise.label_vector(),
        "detector_index": ALL_DETECTORS.index(name) if name in ALL_DETECTORS else -1,
        "wavelength_nm": geometry.wavelength_nm,
        "sample_distance_mm": geometry.distance_mm,
        "incidence_deg": geometry.incidence_deg,
    }


def _iter_identity_q(spec: DatasetSpec, index: int) -> Iterator[dict]:
    """:func:`iter_identity` on the fixed q grid: remapped with the geometry of each frame's
    instrument (frames round-robin over the identity's instruments)."""
    rng, setups = identity_setups(spec, index)
    grid = QGrid()
    prepared = []
    for sample, geometry in setups:
        instrument = geometry.instrument()
        nominal = remap_table(instrument, grid, nominal_mask(geometry))
        clean = expected_intensity(sample, geometry, dose_counts=10.0,
                                   compute_binning=spec.compute_binning)
        clean_in = q_inputs(remap(nominal, clean, threads=1), nominal)[0][0]
        prepared.append((sample, geometry, instrument, nominal, clean,
                         pool2(clean_in[0], clean_in[1])))
    for j in range(spec.frames_per_identity):
        sample, geometry, instrument, nominal, clean, target = prepared[j % len(prepared)]
        noise, result = _noisy_frame(spec, sample, geometry, rng)
        row = _labels(index, sample, noise, geometry)
        if spec.binned:
            # with the user's mask, or with what the record knows (gaps, round beamstop)
            table = nominal if rng.random() < spec.p_mask else remap_table(instrument, grid)
            row["inputs"] = q_inputs(remap(table, result.counts, threads=1), table)[0][0].astype(
                np.float16)
            row["target"] = target.astype(np.float16)
        else:
            row["counts"] = result.counts.astype(np.float32)
            row["expected"] = clean * np.float32(noise.dose_counts / 10.0)
        yield row


def _identity_rows(args: tuple[DatasetSpec, int]) -> list[dict]:
    spec, index = args
    return list(iter_identity(spec, index))


_SCALARS = {
    "identity": np.int64,
    "structure_index": np.int64,
    "radius_nm": np.float32,
    "distance_nm": np.float32,
    "dose_counts": np.float32,
    "detector_index": np.int64,
    "wavelength_nm": np.float32,
    "sample_distance_mm": np.float32,
    "incidence_deg": np.float32,
}


def generate(
    path: str | Path, spec: DatasetSpec, *, workers: int | None = None, progress: bool = True
) -> Path:
    """Simulate ``spec`` into HDF5 at ``path`` (rows written as they arrive; memory bounded)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(mp.cpu_count(), 8))
    n = spec.n_frames
    tmp = path.with_suffix(".partial.h5")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(
            {k: str(v) if isinstance(v, tuple) or v is None else v
             for k, v in spec.__dict__.items()}
        )
        f.attrs["noise_kinds"] = list(NOISE_KINDS)
        f.attrs["structures"] = list(STRUCTURES)
        if spec.binned:
            f.create_dataset("inputs", (n, N_CHANNELS, 128, 128), np.float16,
                             chunks=(1, N_CHANNELS, 128, 128))
            f.create_dataset("target", (n, 64, 64), np.float16, chunks=(1, 64, 64))
            if spec.input_mode == "pixels":
                f.create_dataset("fine", (n, 2, 256, 256), np.float16, chunks=(1, 2, 256, 256))
                f.create_dataset("fine_target", (n, 256, 256), np.float16,
                                 chunks=(1, 256, 256))
            else:
                f.attrs["qgrid"] = json.dumps(QGrid().to_dict())
                f.attrs["instrument_ranges"] = json.dumps(instrument_ranges())
        else:
            shape = identity_setup(spec, 0)[2].shape
            f.create_dataset("counts", (n, *shape), np.float32, chunks=(1, *shape),
                             compression="lzf")
            f.create_dataset("expected", (n, *shape), np.float32, chunks=(1, *shape),
                             compression="lzf")
        for name, dtype in _SCALARS.items():
            f.create_dataset(name, (n,), dtype)
        f.create_dataset("noise_vector", (n, len(NOISE_KINDS)), np.float32)
        tasks = [(spec, i) for i in range(spec.n_identities)]
        bar = tqdm(total=n, desc=f"simulating {path.name}", unit="frame", disable=not progress)
        row_index = 0
        if workers > 1:
            ctx = mp.get_context("fork")
            with ctx.Pool(workers) as pool:
                for rows in pool.imap(_identity_rows, tasks, chunksize=2):
                    row_index = _write_rows(f, rows, row_index)
                    bar.update(len(rows))
        else:
            for task in tasks:
                rows = _identity_rows(task)
                row_index = _write_rows(f, rows, row_index)
                bar.update(len(rows))
        bar.close()
    tmp.replace(path)
    return path


def _write_rows(f: h5py.File, rows: list[dict], start: int) -> int:
    for i, row in enumerate(rows, start):
        for key, value in row.items():
            f[key][i] = value
    return start + len(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="HDF5 file to write")
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--frames-per-identity", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="store full detector frames")
    parser.add_argument("--dose", type=float, default=None, help="fixed dose (counts/pixel)")
    parser.add_argument("--p-kind", type=float, default=DatasetSpec.p_kind,
                        help="probability of each artefact kind (0: clean frames, photon noise only)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--instruments", default=DatasetSpec.instruments,
                        help="shipped (the Pilatus 1M set-up of the shipped model), train (a "
                        "random instrument per identity) or a held-out set-up of "
                        "sim.instruments.HELD_OUT")
    parser.add_argument("--instruments-per-identity", type=int,
                        default=DatasetSpec.instruments_per_identity,
                        help="with --instruments train --input-mode qgrid: each sample on this "
                        "many random instruments (its frames round-robin over them)")
    parser.add_argument("--input-mode", default=DatasetSpec.input_mode,
                        choices=["pixels", "qgrid"],
                        help="model input: detector blocks or the fixed (q_z, q_par) grid")
    parser.add_argument("--noise-from", metavar="FILE",
                        help="a noise model (`gisaxs-bluesky noise-fit` / `adapt "
                        "--noise-model-out`): the beamtime's detector noise, dose and artefacts "
                        "instead of the random noise mix (--p-kind, --dose range)")
    parser.add_argument("--noise-fraction", type=float, default=1.0,
                        help="with --noise-from: the share of frames with the model's noise "
                        "(the others get the random mix)")


def run(args: argparse.Namespace) -> int:
    spec = DatasetSpec(
        n_identities=args.identities,
        frames_per_identity=args.frames_per_identity,
        seed=args.seed,
        binned=not args.full,
        dose_counts=args.dose,
        p_kind=args.p_kind,
        instruments=args.instruments,
        input_mode=args.input_mode,
        noise_from=args.noise_from,
        noise_from_fraction=args.noise_fraction,
        instruments_per_identity=args.instruments_per_identity,
    )
    if args.noise_from:
        try:  # a missing or corrupt file fails before any work
            load_noise_model(args.noise_from)
        except NoiseModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    out = generate(args.out, spec, workers=args.workers)
    print(f"wrote {spec.n_frames} frames to {out}")
    return 0
