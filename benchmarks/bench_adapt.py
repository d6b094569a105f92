"""Adapting the shipped model to a beamtime's own frames: figures before / after.

The measured frames in ``../shared/data/real`` are two single frames (GALAXI Pilatus 1M; a
1024 x 1024 PS-PB CCD frame, converted to photons with its estimated gain). Their "repeated
frames" are variants: the frame's window shifted by up to 16 px (the simulated beam jitters
by +-8 px) and thinned to a random 40-90 % of its photons. The adaptation set and the
held-out set are disjoint draws of such variants. Printed:

1. time to adapt on the adaptation set (a few hundred frames) with the torch threads given;
2. real held-out variants: outlier fraction, repeated frames sharing a bin, bins mixing the
   two samples, before / after; frames unlike the beamtime (simulated frames; the real frames
   rotated by 90 degrees, same counts and noise, a pattern no GISAXS frame has): flagged?
3. split-half consistency on synthetic Poisson frames: the two thinned halves of a frame in
   one bin, base and adapted;
4. held-out simulation metrics (``gisaxs_bluesky.models.evaluate.evaluate_simulated``) of the
   shipped model and of the adapted weights (with the shipped, simulation-calibrated binner:
   the weights' change alone), and their difference;
5. Noise2Noise losses on halves of held-out real variants (each half's decoder pattern and
   denoiser output against the other half), base and adapted: denoising of real frames.

``python benchmarks/bench_adapt.py [--variants 100] [--held 300] [--threads 2] [--device cpu]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from gisaxs_bluesky.adaptation import (
    AdaptConfig,
    SourceFrame,
    adapt,
    binomial_split,
    estimate_gain,
    load_adapted,
    to_photon_counts,
)
from gisaxs_bluesky.adaptation.anchor import anchor_set
from gisaxs_bluesky.adaptation.halves import build_pairs
from gisaxs_bluesky.adaptation.n2n import pair_losses
from gisaxs_bluesky.models import Encoder, load_checkpoint, load_pretrained, make_binner
from gisaxs_bluesky.models.evaluate import evaluate_simulated
from gisaxs_bluesky.sim import STRUCTURES, Geometry, NoiseSpec, Sample, simulate

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
SHIFT_PX = 16
GALAXI_GEOMETRY = {"detector": "Pilatus 1M", "distance_mm": 1730.0, "wavelength_nm": 0.134,
                   "incidence_deg": 0.463, "beam_center_px": [719.6, 597.1]}


class Variants:
    """Repeated frames of one measured frame (a FrameSource): shifted window, thinned dose."""

    def __init__(self, counts, mask, n: int, seed: int, label: str, geometry="unknown",
                 rotate: bool = False) -> None:
        self.counts, self.mask, self.n, self.seed = counts, mask, n, seed
        self.label, self.geometry, self.rotate = label, geometry, rotate

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        h, w = (s - SHIFT_PX for s in self.counts.shape)
        for i in range(self.n):
            dr, dc = (int(v) for v in rng.integers(0, SHIFT_PX + 1, 2))
            crop = self.counts[dr : dr + h, dc : dc + w]
            mask = None if self.mask is None else self.mask[dr : dr + h, dc : dc + w]
            frame = binomial_split(crop, float(rng.uniform(0.4, 0.9)), mask=mask, rng=rng).a
            if self.rotate:
                frame = np.ascontiguousarray(np.rot90(frame))
                mask = None if mask is None else np.ascontiguousarray(np.rot90(mask))
            # the variants of one measured frame are its repeated frames: one repeat group
            yield SourceFrame(frame, f"{self.label}#{i}", self.geometry, mask, self.label)

    def describe(self) -> dict:
        return {"kind": "variants", "label": self.label, "frames": self.n, "seed": self.seed,
                "shift_px": SHIFT_PX, "dose_fraction": [0.4, 0.9]}


def real_frames() -> dict[str, tuple[np.ndarray, np.ndarray | None, dict | str, dict]]:
    with gzip.open(REAL / "galaxi_pilatus1m.tif.gz") as f:
        galaxi = tifffile.imread(f)
    mask = tifffile.imread(REAL / "pilatus1m_mask.tif") != 0
    ccd = tifffile.imread(REAL / "pspb05_180.tif")
    gain = estimate_gain(ccd)
    return {
        "galaxi": (galaxi, mask, GALAXI_GEOMETRY, {"detector": "counting"}),
        "pspb": (to_photon_counts(ccd, gain), None, "unknown",
                 {"detector": "integrating", "gain": gain.to_dict()}),
    }


def encode(encoder: Encoder, source: Variants) -> tuple[np.ndarray, np.ndarray]:
    z, err = [], []
    for item in source:
        r = encoder.encode(item.frame, item.mask)
        z.append(r.identity_latent[0])
        err.append(r.recon_error[0])
    return np.array(z), np.array(err)


def real_figures(encoder: Encoder, held: dict[str, tuple[np.ndarray, np.ndarray]],
                 unlike: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    labels = list(held)
    n = min(len(held[k][0]) for k in labels)
    # interleaved stream: sample A, sample B, A, B, ... as a scan over two samples would be
    z = np.concatenate([held[k][0][i : i + 1] for i in range(n) for k in labels])
    err = np.concatenate([held[k][1][i : i + 1] for i in range(n) for k in labels])
    who = np.array([k for _ in range(n) for k in labels])
    res = make_binner(encoder).assign(z, err)
    out: dict = {"frames": int(len(z)), "outlier_fraction": float(res.is_outlier.mean()),
                 "bins": int(len(np.unique(res.bin_id[res.bin_id >= 0])))}
    mixed = 0
    for b in np.unique(res.bin_id[res.bin_id >= 0]):
        mixed += len(np.unique(who[res.bin_id == b])) > 1
    out["bins_mixing_samples"] = int(mixed)
    for k in labels:
        ids = res.bin_id[who == k]
        top = np.bincount(ids[ids >= 0]).max() if (ids >= 0).any() else 0
        out[k] = {"outlier_fraction": float(res.is_outlier[who == k].mean()),
                  "sharing_majority_bin": float(top / len(ids)),
                  "bins": int(len(np.unique(ids[ids >= 0]))),
                  "median_score": float(np.median(res.outlier_score[who == k]))}
    for k, (zu, eu) in unlike.items():
        r = make_binner(encoder).assign(zu, eu)
        out[f"unlike:{k}"] = {"frames": int(len(zu)), "flagged": float(r.is_outlier.mean()),
                              "median_score": float(np.median(r.outlier_score))}
    return out


def sim_frames(n_per: int = 2, doses=(0.5, 2.0, 10.0, 50.0), seed: int = 500):
    """Clean Poisson frames (gaps flagged) of every structure at several doses."""
    rng = np.random.default_rng(seed)
    out = []
    for s in STRUCTURES:
        for dose in doses:
            for _ in range(n_per):
                sample = Sample(s, radius_nm=float(rng.uniform(3, 8)),
                                distance_nm=float(rng.uniform(20, 50)))
                r = simulate(sample, Geometry(), NoiseSpec(dose, {"poisson": 1, "gaps": 1}),
                             seed=int(rng.integers(1 << 30)), compute_binning=6)
                out.append(r.counts)
    return out


def split_half(encoder: Encoder, frames: list[np.ndarray], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    halves = []
    for f in frames:
        pair = binomial_split(f, 0.5, rng=rng)
        halves += [pair.a, pair.b]
    r = encoder.encode(np.stack(halves))
    order = rng.permutation(len(halves))
    res = make_binner(encoder).assign(r.identity_latent[order], r.recon_error[order])
    bins = np.empty(len(halves), dtype=np.int64)
    bins[order] = res.bin_id
    a, b = bins[0::2], bins[1::2]
    return {"pairs": len(frames), "together": float(((a == b) & (a >= 0)).mean()),
            "outlier_fraction": float(res.is_outlier.mean())}


def held_out_n2n(encoders: dict[str, Encoder], sources: list[Variants]) -> dict:
    """Noise2Noise losses on held-out real frames' halves (each half's decoder pattern and
    denoiser output against the other half, as adapt trains them, here on frames it never
    saw), per model: does the denoiser predict real frames better after adaptation?"""
    first = next(iter(encoders.values()))
    cfg = AdaptConfig(num_threads=torch.get_num_threads())
    pairs, _, _ = build_pairs(sources, first, cfg, None, None, False, None, False)
    out = {}
    for name, enc in encoders.items():
        rng = np.random.default_rng(7)
        sums = {"n2n_decoder": 0.0, "n2n_denoiser": 0.0}
        n = len(pairs.group)
        with torch.no_grad():
            for s in range(0, n, 8):
                idx = torch.arange(s, min(s + 8, n))
                losses = pair_losses(enc.model.eval(), pairs, idx, cfg, 1.0, enc.device, rng)
                for k in sums:
                    sums[k] += float(losses[k]) * len(idx)
        out[name] = {k: v / n for k, v in sums.items()}
    out["pairs"] = int(len(pairs.group))  # frames x thinnings
    return out


def with_binner_of(encoder: Encoder, card_from: dict) -> Encoder:
    card = {**encoder.card, "binner": card_from["binner"]}
    return Encoder(encoder.model, card, encoder.device)


SIM_KEYS = ("noise_macro_f1", "structure_accuracy", "radius_rel_rmse", "distance_rel_rmse",
            "bins_ari_vs_structure", "outlier_fraction_clean", "outlier_fraction_with_artefacts",
            "psnr_gain_db_at_1_count")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=100, help="adaptation frames per sample")
    parser.add_argument("--held", type=int, default=300,
                        help="held-out variants per sample (300: 1 % is 6 frames)")
    parser.add_argument("--epochs", type=int, default=AdaptConfig.epochs)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="/tmp/bench_adapt/adapted.pt")
    parser.add_argument("--skip-sim-eval", action="store_true")
    parser.add_argument("--json", help="also write all figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict = {"threads": args.threads, "device": args.device}
    if not REAL.is_dir():
        raise SystemExit(f"{REAL} is absent: the real frames are needed")
    real = real_frames()
    figures["real_detectors"] = {k: v[3] for k, v in real.items()}

    t0 = time.time()
    anchor = anchor_set(AdaptConfig.anchor_identities, workers=max(1, args.threads))
    figures["anchor_seconds"] = round(time.time() - t0, 1)
    sources = [Variants(c, m, args.variants, 1 + i, k, g) for i, (k, (c, m, g, _))
               in enumerate(real.items())]
    cfg = AdaptConfig(epochs=args.epochs, num_threads=args.threads)
    t0 = time.time()
    result = adapt(sources, args.out, name="bench-beamtime", config=cfg, anchor=anchor,
                   device=args.device)
    figures["adapt_seconds"] = round(time.time() - t0, 1)
    figures["adapt_frames"] = result.card["adaptation"]["frames"]
    figures["adapt_losses_first_last"] = [result.card["adaptation"]["history"][0]["loss"],
                                          result.card["adaptation"]["losses"]]
    figures["calibration"] = result.card["adaptation"]["calibration"]
    print(f"adapted on {figures['adapt_frames']} frames in {figures['adapt_seconds']} s "
          f"({args.threads} threads, {args.device}); anchor set {figures['anchor_seconds']} s")

    base = load_pretrained(args.device)
    adapted = load_adapted(result.path, args.device)
    base_card = base.card
    held = {k: Variants(c, m, args.held, 100 + i, k, g) for i, (k, (c, m, g, _))
            in enumerate(real.items())}
    unlike_sources = {f"{k} rotated 90 deg": Variants(c, m, 10, 200 + i, k, g, rotate=True)
                      for i, (k, (c, m, g, _)) in enumerate(real.items())}
    sims = sim_frames(n_per=1)
    for name, enc in (("before", base), ("after", adapted)):
        h = {k: encode(enc, s) for k, s in held.items()}
        u = {k: encode(enc, s) for k, s in unlike_sources.items()}
        r = enc.encode(np.stack(sims))
        u["simulated frames"] = (r.identity_latent, r.recon_error)
        figures[f"real_{name}"] = real_figures(enc, h, u)
    t0 = time.time()
    figures["held_out_real_n2n"] = held_out_n2n(
        {"before": base, "after": adapted},
        [Variants(c, m, 20, 400 + i, k, g) for i, (k, (c, m, g, _)) in enumerate(real.items())])
    figures["held_out_real_n2n"]["seconds"] = round(time.time() - t0, 1)
    sims2 = sim_frames(n_per=2, seed=501)
    figures["split_half_before"] = split_half(base, sims2)
    figures["split_half_after"] = split_half(adapted, sims2)
    figures["split_half_after_weights_sim_binner"] = split_half(
        with_binner_of(adapted, base_card), sims2)
    if not args.skip_sim_eval:
        t0 = time.time()
        before = evaluate_simulated(base)
        after = evaluate_simulated(with_binner_of(adapted, base_card))
        figures["sim_seconds"] = round(time.time() - t0, 1)
        figures["sim_before"] = {k: before[k] for k in SIM_KEYS}
        figures["sim_after_weights"] = {k: after[k] for k in SIM_KEYS}
        drops = {}
        for k in ("noise_macro_f1", "structure_accuracy"):
            drops[k] = before[k] - after[k]
        for k in ("radius_rel_rmse", "distance_rel_rmse"):
            drops[k] = after[k] - before[k]  # an error: a rise is a drop
        for dose, v in before["bins_ari_vs_structure"].items():
            drops[f"ari@{dose}"] = v - after["bins_ari_vs_structure"][dose]
        figures["sim_drop"] = drops
        figures["sim_max_drop"] = max(drops.values())
    _, card, _ = load_checkpoint(result.path)
    figures["card_adaptation_keys"] = sorted(card["adaptation"])
    _print(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))


def _print(f: dict) -> None:
    print(json.dumps(f, indent=2, default=str))
    print("\nsummary")
    for when in ("before", "after"):
        r = f[f"real_{when}"]
        unlike = {k[7:]: v["flagged"] for k, v in r.items() if k.startswith("unlike:")}
        print(f"  real held-out {when:6s}: outliers {r['outlier_fraction']:.1%}; sharing a bin "
              f"galaxi {r['galaxi']['sharing_majority_bin']:.0%} pspb "
              f"{r['pspb']['sharing_majority_bin']:.0%}; bins {r['bins']}, mixing samples "
              f"{r['bins_mixing_samples']}; unlike flagged {unlike}")
    for k in ("split_half_before", "split_half_after", "split_half_after_weights_sim_binner"):
        print(f"  {k}: {f[k]['together']:.1%} of halves together "
              f"({f[k]['pairs']} pairs, outliers {f[k]['outlier_fraction']:.1%})")
    if "sim_max_drop" in f:
        print(f"  simulation metrics, largest drop after adaptation: {f['sim_max_drop']:+.4f}")
    n2n = f["held_out_real_n2n"]
    b, a = n2n["before"], n2n["after"]
    print(f"  held-out real frames ({n2n['pairs']} pairs of halves), Noise2Noise decoder / "
          f"denoiser loss: before {b['n2n_decoder']:.4f} / {b['n2n_denoiser']:.4f}, after "
          f"{a['n2n_decoder']:.4f} / {a['n2n_denoiser']:.4f}")


if __name__ == "__main__":
    main()
