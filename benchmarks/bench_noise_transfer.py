"""Real-noise transfer: simulations carrying the beamtime's fitted noise vs plain Poisson noise.

The two measured frames of ``../shared/data/real`` (GALAXI Pilatus 1M; the PS-PB CCD frame,
converted to photons with its estimated gain) give "repeated frames" as in
``bench_adapt.py``: the window shifted by up to 16 px and thinned to 40-90 % of the photons.
Steps, all on the CPU with the torch threads given:

1. fit the noise model (``fit_noise_model``, the shipped model's noise head) on full-size
   thinned copies of the two frames (no shift: the GALAXI module gaps stay where the
   Pilatus geometry has them); ``--noise-model`` reads one instead;
2. simulate two anchor sets of the same identities: plain Poisson noise (random dose
   0.1-100, no artefacts) and the transferred noise (``DatasetSpec(noise_from=...)``) on
   ``--transfer-fraction`` of the frames, the training's random artefact mix on the others
   (an anchor of transferred noise only moved the simulated distance error by 0.025);
3. simulation-only check (no real frame in the calibration): the shipped weights with a
   binner calibrated on each anchor set, flagged fraction of held-out real variants; and the
   gap between the real frames' noise latent and the simulated frames' (distance of the
   means over the real frames' RMS spread);
4. ``adapt`` on the same real variants with each anchor set (and, with ``--trainable``, more
   trainable choices on the transferred anchor): flagged fraction of held-out real variants,
   and the held-out simulation metrics of the adapted weights (shipped binner) against the
   shipped model's (``evaluate_simulated`` at a reduced size, the simulated frames shared by
   every model): the largest drop.

``python benchmarks/bench_noise_transfer.py [--variants 30] [--held 20] [--threads 2]``
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapt import REAL, Variants, encode, real_figures, real_frames, with_binner_of  # noqa: E402

from gisaxs_bluesky.adaptation import AdaptConfig, ArraySource, adapt, binomial_split, load_adapted  # noqa: E402,E501
from gisaxs_bluesky.adaptation.noise_model import fit_noise_model  # noqa: E402
from gisaxs_bluesky.models import evaluate as evaluate_module  # noqa: E402
from gisaxs_bluesky.models import load_pretrained  # noqa: E402
from gisaxs_bluesky.models.train import TrainingData, calibrate_binner  # noqa: E402
from gisaxs_bluesky.models.dataset import DatasetSpec, generate  # noqa: E402
from gisaxs_bluesky.sim.noise_transfer import load_noise_model, save_noise_model  # noqa: E402

ANCHOR_SEED = 7
EVAL = {"n_identities": 40, "frames_per_dose": 8, "n_clean": 24, "n_psnr": 4}
DROP_KEYS_HIGHER_BETTER = ("noise_macro_f1", "structure_accuracy")
DROP_KEYS_LOWER_BETTER = ("radius_rel_rmse", "distance_rel_rmse")


def fit_model(real: dict, out: Path, encoder, copies: int, seed: int = 300
              ) -> tuple[Path, float]:
    rng = np.random.default_rng(seed)
    sources = []
    for label, (counts, mask, _, _) in real.items():
        frames = [binomial_split(counts, float(rng.uniform(0.4, 0.9)), mask=mask, rng=rng).a
                  for _ in range(copies)]
        sources.append(ArraySource(frames, label=label, mask=mask))
    t0 = time.time()
    model = fit_noise_model(sources, encoder=encoder, progress=False)
    return save_noise_model(model, out), round(time.time() - t0, 1)


def anchor(path: Path, n: int, noise_from: str | None, workers: int, fraction: float = 1.0
           ) -> tuple[TrainingData, float]:
    t0 = time.time()
    if not path.is_file():
        spec = DatasetSpec(n_identities=n, frames_per_identity=2, seed=ANCHOR_SEED,
                           p_kind=0.0 if noise_from is None else DatasetSpec.p_kind,
                           noise_from=noise_from, noise_from_fraction=fraction)
        generate(path, spec, workers=workers, progress=False)
    return TrainingData(path), round(time.time() - t0, 1)


def sim_calibrated_flagged(encoder, data: TrainingData, held_z: dict) -> dict:
    binner = calibrate_binner(encoder.model, data, encoder.device, clean=data)
    out = {}
    for k, (z, err) in held_z.items():
        out[k] = float(binner.assign(z, err).is_outlier.mean())
    out["all"] = float(np.mean(list(out.values())))
    return out


def noise_latent_gap(encoder, data: TrainingData, real_latent: np.ndarray) -> float:
    r = encoder.encode_inputs(data.inputs.float().numpy())
    nz = r.noise_latent
    spread = np.sqrt(((real_latent - real_latent.mean(0)) ** 2).sum(1).mean())
    return float(np.linalg.norm(nz.mean(0) - real_latent.mean(0)) / max(spread, 1e-6))


def sim_metrics(encoder) -> dict:
    m = evaluate_module.evaluate_simulated(encoder, **EVAL)
    keep = (*DROP_KEYS_HIGHER_BETTER, *DROP_KEYS_LOWER_BETTER, "bins_ari_vs_structure",
            "outlier_fraction_clean", "psnr_gain_db_at_1_count")
    return {k: m[k] for k in keep}


def drops(before: dict, after: dict) -> dict:
    d = {k: before[k] - after[k] for k in DROP_KEYS_HIGHER_BETTER}
    d.update({k: after[k] - before[k] for k in DROP_KEYS_LOWER_BETTER})
    d.update({f"ari@{k}": v - after["bins_ari_vs_structure"][k]
              for k, v in before["bins_ari_vs_structure"].items()})
    return d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=30, help="adaptation frames per sample")
    parser.add_argument("--held", type=int, default=20, help="held-out variants per sample")
    parser.add_argument("--fit-copies", type=int, default=4, help="frames per sample for the fit")
    parser.add_argument("--anchor-identities", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--transfer-fraction", type=float, default=0.5,
                        help="share of the transferred anchor's frames with the fitted noise "
                        "(the others: random artefacts, as the training had)")
    parser.add_argument("--trainable", default="decoder+identity",
                        help="comma-separated AdaptConfig.trainable choices for the "
                        "transferred-noise adaptation (the Poisson one uses the first)")
    parser.add_argument("--threshold-holdout", type=float, default=AdaptConfig.threshold_holdout)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default="/tmp/bench_noise_transfer")
    parser.add_argument("--noise-model", help="a fitted noise model to use instead of step 1")
    parser.add_argument("--skip-sim-eval", action="store_true")
    parser.add_argument("--no-head", action="store_true",
                        help="fit the physics estimates only (no noise-head kinds)")
    parser.add_argument("--skip-poisson", action="store_true",
                        help="adapt with the transferred-noise anchor only")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not REAL.is_dir():
        raise SystemExit(f"{REAL} is absent: the real frames are needed")
    torch.set_num_threads(args.threads)
    # every evaluate_simulated call simulates the same frames: simulate them once
    evaluate_module._simulate_frames = functools.lru_cache(maxsize=None)(
        evaluate_module._simulate_frames)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    fig: dict = {"threads": args.threads, "device": args.device, "config": vars(args)}
    real = real_frames()
    base = load_pretrained(args.device)

    if args.noise_model:
        nm_path, fig["fit_seconds"] = Path(args.noise_model), 0.0
    else:
        nm_path, fig["fit_seconds"] = fit_model(
            real, work / ("noise-physics" if args.no_head else "noise"),
            None if args.no_head else base, args.fit_copies)
    nm = load_noise_model(nm_path)
    fig["noise_model"] = {"path": str(nm_path),
                          "instruments": [i.scalars() for i in nm.instruments]}

    held = {k: Variants(c, m, args.held, 100 + i, k, g) for i, (k, (c, m, g, _))
            in enumerate(real.items())}
    results = {k: [base.encode(it.frame, it.mask) for it in s] for k, s in held.items()}
    held_base = {k: (np.concatenate([r.identity_latent for r in rs]),
                     np.concatenate([r.recon_error for r in rs])) for k, rs in results.items()}
    real_noise = np.concatenate([r.noise_latent for rs in results.values() for r in rs])
    data, seconds = {}, {}
    for kind, nf in (("poisson", None), ("transferred", str(nm_path))):
        name = f"anchor-{kind}-{args.anchor_identities}" + (
            f"-{args.transfer_fraction:g}-{Path(nf).stem}" if nf else "")
        data[kind], seconds[kind] = anchor(work / f"{name}.h5", args.anchor_identities, nf,
                                           max(1, args.threads), args.transfer_fraction)
    fig["anchor_seconds"] = seconds
    fig["sim_calibrated_real_flagged"] = {k: sim_calibrated_flagged(base, d, held_base)
                                          for k, d in data.items()}
    fig["noise_latent_gap"] = {k: noise_latent_gap(base, d, real_noise) for k, d in data.items()}
    fig["noise_head_mean"] = {
        "real": dict(zip(base.noise_kinds, np.round(np.mean(
            [r.noise_prob[0] for rs in results.values() for r in rs], 0), 3).tolist(),
            strict=True)),
        **{k: dict(zip(base.noise_kinds, np.round(base.encode_inputs(
            d.inputs.float().numpy()).noise_prob.mean(0), 3).tolist(), strict=True))
           for k, d in data.items()}}

    sources = [Variants(c, m, args.variants, 1 + i, k, g) for i, (k, (c, m, g, _))
               in enumerate(real.items())]
    trainables = args.trainable.split(",")
    runs = ([] if args.skip_poisson else [("poisson", trainables[0])]) + [
        ("transferred", t) for t in trainables]
    fig["real_shipped"] = real_figures(base, held_base, {})
    if not args.skip_sim_eval:
        t0 = time.time()
        fig["sim_shipped"] = sim_metrics(base)
        fig["sim_seconds_first"] = round(time.time() - t0, 1)
    for kind, trainable in runs:
        key = f"{kind}/{trainable}"
        cfg = AdaptConfig(epochs=args.epochs, num_threads=args.threads, trainable=trainable,
                          threshold_holdout=args.threshold_holdout)
        t0 = time.time()
        result = adapt(sources, work / f"adapted-{kind}-{trainable}.pt", config=cfg,
                       anchor=data[kind], device=args.device, progress=False)
        entry = {"adapt_seconds": round(time.time() - t0, 1),
                 "frames": result.card["adaptation"]["frames"],
                 "thresholds_from": result.card["adaptation"]["calibration"]["thresholds_from"]}
        enc = load_adapted(result.path, args.device)
        entry["real_held_out"] = real_figures(enc, {k: encode(enc, s) for k, s in held.items()},
                                              {})
        if not args.skip_sim_eval:
            entry["sim"] = sim_metrics(with_binner_of(enc, base.card))
            entry["sim_drop"] = drops(fig["sim_shipped"], entry["sim"])
            entry["sim_max_drop"] = max(entry["sim_drop"].values())
        fig[key] = entry
        print(f"{key}: adapted in {entry['adapt_seconds']} s", flush=True)
    fig["total_seconds"] = round(time.time() - t_all, 1)
    print(json.dumps(fig, indent=2, default=str))
    _summary(fig, runs)
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2, default=str))


def _summary(fig: dict, runs) -> None:
    print(f"\nsummary ({fig['threads']} threads, {fig['device']}; {fig['total_seconds']} s)")
    for inst in fig["noise_model"]["instruments"]:
        print(f"  noise model {inst['shape']}: {inst['detector']}, dose "
              f"{np.exp(inst['dose_log_mean']):.1f}, background {inst['background_fraction']:.2f}"
              f" x median, hot {inst['hot_pixel_fraction']:.2e}, dead "
              f"{inst['dead_pixel_fraction']:.2e}, inactive {inst['inactive_fraction']:.3f}")
    for k in ("poisson", "transferred"):
        print(f"  sim-calibrated shipped weights, held-out real flagged ({k} sims): "
              f"{fig['sim_calibrated_real_flagged'][k]['all']:.1%}; noise-latent gap "
              f"{fig['noise_latent_gap'][k]:.2f}")
    print(f"  shipped: held-out real flagged {fig['real_shipped']['outlier_fraction']:.1%}")
    for kind, trainable in runs:
        e = fig[f"{kind}/{trainable}"]
        line = (f"  adapted, {kind} anchor, trainable {trainable}: held-out real flagged "
                f"{e['real_held_out']['outlier_fraction']:.1%}, adapt {e['adapt_seconds']} s")
        if "sim_max_drop" in e:
            line += (f", sim largest drop {e['sim_max_drop']:+.4f}, PSNR gain @1 count "
                     f"{fig['sim_shipped']['psnr_gain_db_at_1_count']:.2f} -> "
                     f"{e['sim']['psnr_gain_db_at_1_count']:.2f} dB")
        print(line)


if __name__ == "__main__":
    main()
