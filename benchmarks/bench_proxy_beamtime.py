"""Proxy beamtime: adaptation checked on frames of an independent engine at another instrument.

Four samples are simulated by BornAgain (not by this package's simulator) at a PETRA III
P03-like geometry that training never drew (0.095 nm, 2400 mm, incidence 0.40 deg, direct
beam at row 870 / column 420 of a Pilatus 1M, where the shipped model's frames had it at
(719.6, 597.1)), with a detector response that no training frame had: a per-pixel flat-field
response (gain 1 +- 6 %, fixed for the "beamtime"), charge sharing (each count has a 12 %
chance to land in a neighbouring pixel) and a smooth air-scattering background of about
0.05 counts per pixel, on top of Poisson statistics and the module gaps. Each sample is
measured repeatedly: doses drawn from 0.5-30 counts per pixel (median of valid pixels).

The beamtime's frames are split: ``--adapt`` frames per sample for ``adapt``, ``--held`` per
sample held out. Printed, before (shipped model) and after adaptation, on the held-out
frames: outlier fraction, repeated frames sharing their sample's majority bin, number of
bins and bins that mix samples; and side by side the log-block-means + PCA + k-means
baseline (told the true number of samples, which the DAE is not). Also the time to simulate
and to adapt. A fifth sample measured in the same beamtime but absent from the adaptation
set (dilute spheres of 8 nm) should stand out: its flagged fraction is printed.

Needs the ``reference`` extra (``pip install bornagain``).

``python benchmarks/bench_proxy_beamtime.py [--adapt 40] [--held 100] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_adapt import real_figures  # the same figures as the real-frame benchmark

from gisaxs_bluesky.adaptation import AdaptConfig, SourceFrame, adapt, load_adapted
from gisaxs_bluesky.adaptation.anchor import anchor_set
from gisaxs_bluesky.models import Encoder, load_pretrained
from gisaxs_bluesky.models.evaluate import baseline_bins
from gisaxs_bluesky.sim import Geometry, Sample
from gisaxs_bluesky.sim.instruments import at_wavelength

PROXY = Geometry(distance_mm=2400.0, wavelength_nm=0.095, incidence_deg=0.40,
                 beam_center_px=(870.0, 420.0))
PROXY_RECORD = {"detector": "Pilatus 1M", "distance_mm": PROXY.distance_mm,
                "wavelength_nm": PROXY.wavelength_nm, "incidence_deg": PROXY.incidence_deg,
                "beam_center_px": list(PROXY.beam_center_px)}
SAMPLES = {  # name: (structure, radius nm, distance nm)
    "A spheres R5 dilute": ("spheres_dilute", 5.0, None),
    "B cylinders R4 H8 dilute": ("cylinders_dilute", 4.0, None),
    "C spheres R4 paracrystal D25": ("spheres_paracrystal", 4.0, 25.0),
    "D cylinders R3 hexagonal D22": ("cylinders_hexagonal", 3.0, 22.0),
}
#: a sample of the same beamtime that the adaptation set never saw: should stand out
UNSEEN = ("E spheres R8 dilute, not in the adaptation set",
          ("spheres_dilute", 8.0, None))
BINNING = 3  # BornAgain angular grid: one bin per 3 x 3 detector pixels, then interpolated


def bornagain_pattern(structure: str, radius: float, distance: float | None,
                      geometry: Geometry = PROXY) -> np.ndarray:
    """Noise-free intensity on ``geometry``'s detector (default: the proxy Pilatus 1M;
    arbitrary units), from BornAgain."""
    import bornagain as ba

    sample = at_wavelength(Sample(structure, radius_nm=radius), geometry.wavelength_nm)
    grey = (0.5, 0.5, 0.5)
    substrate = ba.RefractiveMaterial("Si", grey, sample.delta_substrate, sample.beta_substrate)
    mat = ba.RefractiveMaterial("Ag", grey, sample.delta_particle, sample.beta_particle)
    ff = (ba.Sphere(radius) if structure.startswith("spheres")
          else ba.Cylinder(radius, 2.0 * radius))
    particle = ba.Particle(mat, ff)
    top = ba.Layer(ba.Vacuum())
    if structure.endswith("dilute"):
        top.deposit2D(ba.Dilute2D(1e-4, particle))
    elif structure == "spheres_paracrystal":
        assembly = ba.RadialParacrystal(particle, distance, 1e3)
        assembly.setProbabilityDistribution(ba.Profile1DGauss(0.12 * distance))
        top.deposit2D(assembly)
    else:
        assembly = ba.Paracrystal2D(particle, ba.HexagonalLattice2D(distance, 0.0), 0.0,
                                    20000.0, 20000.0)
        assembly.setProbabilityDistributions(ba.Profile2DGauss(0.08 * distance, 0.08 * distance, 0.0),
                                             ba.Profile2DGauss(0.08 * distance, 0.08 * distance, 0.0))
        assembly.setIntegrationOverXi(True)
        top.deposit2D(assembly)
    multilayer = ba.Sample()
    multilayer.addLayer(top)
    multilayer.addLayer(ba.Layer(substrate))
    rows_n, cols_n = geometry.shape
    rows = np.arange(BINNING / 2 - 0.5, rows_n, BINNING)
    cols = np.arange(BINNING / 2 - 0.5, cols_n, BINNING)
    tth, _ = geometry.angles(np.zeros(1), cols)
    _, af = geometry.angles(rows, np.full(1, geometry.beam_center_px[1]))
    tth, af = np.ravel(tth), np.ravel(af)[::-1]  # BornAgain: alpha ascending
    step_t, step_a = tth[1] - tth[0], af[1] - af[0]
    detector = ba.SphericalDetector(len(tth), tth[0] - step_t / 2, tth[-1] + step_t / 2,
                                    len(af), af[0] - step_a / 2, af[-1] + step_a / 2)
    beam = ba.Beam(1.0, geometry.wavelength_nm, np.deg2rad(geometry.incidence_deg))
    coarse = np.asarray(ba.ScatteringSimulation(beam, multilayer, detector).simulate()
                        .intensities(), dtype=np.float64)  # (alpha ascending, two theta)
    coarse = np.maximum(coarse[::-1], 0.0)  # rows top to bottom, as the detector
    # bilinear interpolation of log intensity onto every pixel's angles
    prow, pcol = geometry.pixel_grid
    t_pix, a_pix = geometry.angles(prow, pcol)
    fr = np.clip((af[::-1][0] - a_pix) / step_a, 0, len(af) - 1.000001)
    fc = np.clip((t_pix - tth[0]) / step_t, 0, len(tth) - 1.000001)
    r0, c0 = np.floor(fr).astype(int), np.floor(fc).astype(int)
    wr, wc = fr - r0, fc - c0
    log = np.log(coarse + coarse[coarse > 0].min())
    v = ((1 - wr) * (1 - wc) * log[r0, c0] + (1 - wr) * wc * log[r0, c0 + 1]
         + wr * (1 - wc) * log[r0 + 1, c0] + wr * wc * log[r0 + 1, c0 + 1])
    out = np.exp(v)
    out[a_pix < 0] *= 1e-3  # below the horizon: the substrate's shadow
    return out


class Beamtime:
    """The proxy beamtime's detector: one fixed flat field, charge sharing, air background."""

    def __init__(self, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.flat = np.clip(rng.normal(1.0, 0.06, PROXY.shape), 0.7, 1.3)
        r, c = PROXY.pixel_grid
        d = np.hypot(r - PROXY.beam_center_px[0], c - PROXY.beam_center_px[1])
        self.air = 0.05 * np.exp(-d / 600.0) / np.exp(-200 / 600.0)
        self.gaps = PROXY.detector.gap_mask()
        r0, c0 = PROXY.beam_center_px
        self.beamstop = (r - r0) ** 2 + (c - c0) ** 2 <= 14.0**2

    def measure(self, pattern: np.ndarray, dose: float, rng: np.random.Generator) -> np.ndarray:
        valid = ~self.gaps & ~self.beamstop
        scale = dose / np.median(pattern[valid])
        lam = pattern * scale * self.flat + self.air
        lam[self.beamstop] *= 1e-4
        counts = rng.poisson(lam)
        # charge sharing: a count moves to one of the four neighbours with p = 0.12
        moved = rng.binomial(counts, 0.12)
        counts = counts - moved
        for k, (dr, dc) in enumerate(((1, 0), (-1, 0), (0, 1), (0, -1))):
            part = rng.binomial(moved, 1.0 / (4 - k)) if k < 3 else moved
            moved = moved - part
            counts += np.roll(part, (dr, dc), axis=(0, 1))
        counts = counts.astype(np.int32)
        counts[self.gaps] = -1
        return counts


class Measured:
    """One sample's frames of the proxy beamtime as an adaptation source (one repeat group)."""

    def __init__(self, label: str, frames: list[np.ndarray]) -> None:
        self.label, self.frames = label, frames

    def __iter__(self):
        for i, f in enumerate(self.frames):
            yield SourceFrame(f, f"{self.label}#{i}", PROXY_RECORD, f < 0, self.label)

    def describe(self) -> dict:
        return {"kind": "bornagain proxy beamtime", "label": self.label,
                "frames": len(self.frames), "geometry": PROXY_RECORD}


def measure_all(patterns: dict, n: int, seed: int, beamtime: Beamtime):
    rng = np.random.default_rng(seed)
    frames = {k: [] for k in patterns}
    for _ in range(n):
        for k, p in patterns.items():  # the samples in turn, as a scan over them would be
            frames[k].append(beamtime.measure(p, float(np.exp(rng.uniform(np.log(0.5),
                                                                           np.log(30.0)))), rng))
    return frames


def encode(encoder: Encoder, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    z, err = [], []
    for i in range(0, len(frames), 8):
        r = encoder.encode(np.stack(frames[i:i + 8]))
        z.append(r.identity_latent)
        err.append(r.recon_error)
    return np.concatenate(z), np.concatenate(err)


def baseline(frames: dict[str, list[np.ndarray]]) -> dict:
    labels = list(frames)
    flat = [f for k in labels for f in frames[k]]
    who = np.array([k for k in labels for _ in frames[k]])
    bins = baseline_bins(flat, [f < 0 for f in flat], n_clusters=len(labels))
    mixed = sum(len(np.unique(who[bins == b])) > 1 for b in np.unique(bins))
    share = {k: float(np.bincount(bins[who == k]).max() / (who == k).sum()) for k in labels}
    return {"bins": int(len(np.unique(bins))), "bins_mixing_samples": int(mixed),
            "sharing_majority_bin": share, "outlier_fraction": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapt", type=int, default=40, help="adaptation frames per sample")
    parser.add_argument("--held", type=int, default=100,
                        help="held-out frames per sample (100: 1 % of the four is 4 frames)")
    parser.add_argument("--epochs", type=int, default=AdaptConfig.epochs)
    parser.add_argument("--threshold-holdout", type=float,
                        default=AdaptConfig.threshold_holdout,
                        help="fraction of the adaptation frames kept out of the fine-tuning "
                             "for the outlier thresholds (adapt --threshold-holdout)")
    parser.add_argument("--trainable", default=AdaptConfig.trainable)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="/tmp/bench_proxy/adapted.pt")
    parser.add_argument("--json", help="also write all figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fig: dict = {"geometry": PROXY_RECORD, "threads": args.threads, "device": args.device}

    t0 = time.time()
    patterns = {k: bornagain_pattern(*v) for k, v in SAMPLES.items()}
    fig["bornagain_seconds"] = round(time.time() - t0, 1)
    beamtime = Beamtime()
    train = measure_all(patterns, args.adapt, 1, beamtime)
    held = measure_all(patterns, args.held, 2, beamtime)
    unseen = measure_all({UNSEEN[0]: bornagain_pattern(*UNSEEN[1])}, 20, 3, beamtime)
    print(f"BornAgain: {len(patterns)} samples in {fig['bornagain_seconds']} s; "
          f"{args.adapt} + {args.held} frames per sample")

    sources = [Measured(k, frames) for k, frames in train.items()]
    anchor = anchor_set(AdaptConfig.anchor_identities, workers=max(1, args.threads))
    cfg = AdaptConfig(epochs=args.epochs, num_threads=args.threads, trainable=args.trainable,
                      threshold_holdout=args.threshold_holdout)
    fig["config"] = {"threshold_holdout": cfg.threshold_holdout, "trainable": cfg.trainable,
                     "epochs": cfg.epochs}
    t0 = time.time()
    result = adapt(sources, args.out, name="proxy-beamtime", config=cfg, anchor=anchor,
                   device=args.device)
    fig["adapt_seconds"] = round(time.time() - t0, 1)
    fig["adapt_frames"] = result.card["adaptation"]["frames"]
    print(f"adapted on {fig['adapt_frames']} frames in {fig['adapt_seconds']} s")

    for when, enc in (("before", load_pretrained(args.device)),
                      ("after", load_adapted(result.path, args.device))):
        fig[when] = real_figures(enc, {k: encode(enc, v) for k, v in held.items()},
                                 {k: encode(enc, v) for k, v in unseen.items()})
    fig["baseline"] = baseline(held)
    print(json.dumps(fig, indent=2, default=str))
    print("\nsummary (held-out frames of the proxy beamtime)")
    for when in ("before", "after"):
        r = fig[when]
        share = ", ".join(f"{k[0]} {r[k]['sharing_majority_bin']:.0%}" for k in SAMPLES)
        print(f"  DAE {when:6s}: outliers {r['outlier_fraction']:.1%}; sharing their "
              f"sample's bin {share}; bins {r['bins']}, mixing samples "
              f"{r['bins_mixing_samples']}; unseen sample flagged "
              f"{r['unlike:' + UNSEEN[0]]['flagged']:.0%}")
    b = fig["baseline"]
    share = ", ".join(f"{k[0]} {b['sharing_majority_bin'][k]:.0%}" for k in SAMPLES)
    print(f"  baseline (k = {len(SAMPLES)} given): sharing {share}; bins {b['bins']}, "
          f"mixing samples {b['bins_mixing_samples']}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2, default=str))


if __name__ == "__main__":
    main()
