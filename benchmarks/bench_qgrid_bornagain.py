"""The independent-engine check of issue 16: frames simulated by BornAgain, not by this
package's simulator, of the same samples at two set-ups that training never draws.

Eight samples of the four structure classes (dilute spheres and cylinders, spheres in a radial
paracrystal, cylinders on a hexagonal paracrystal; radii 3-7 nm, distances 22-40 nm) are
computed by BornAgain on the P03-like Pilatus 1M and on the Eiger 4M at 1.5 m of
``sim.instruments.HELD_OUT``, with the materials' delta and beta at each wavelength. Each is
measured ``--frames`` times at ``--dose`` counts per pixel (Poisson statistics, module gaps,
the beamstop's shadow). A q-grid model remaps every frame with its set-up's geometry; the
shipped pixel model takes the pixels as they are. Printed as JSON, per model, from
``models.evaluate.cross_setup_figures``:

- one binner fed both set-ups' frames in random order: same-sample cross-set-up pairs that
  share a bin, other-sample pairs that share one (merges), ARI of bins vs sample, how often a
  frame's nearest frame on the other set-up is the same sample;
- per set-up: structure accuracy, radius / distance relative RMS, frames flagged as outliers;
- log block means + PCA + k-means (told the true number of samples) on the same frames, and
  for the q-grid model the model-free q-grid template baseline.

Needs the ``reference`` extra (``pip install bornagain``).

``python benchmarks/bench_qgrid_bornagain.py --model runs/qgrid/dae_q.pt [--frames 4]``
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from bench_proxy_beamtime import bornagain_pattern

from gisaxs_bluesky.models import load_pretrained
from gisaxs_bluesky.models.evaluate import cross_setup_figures
from gisaxs_bluesky.models.qmodel import load_qencoder
from gisaxs_bluesky.sim import Sample
from gisaxs_bluesky.sim.instruments import HELD_OUT
from gisaxs_bluesky.sim.simulate import nominal_mask

SETUPS = ("p03_pilatus1m_2.4m", "eiger4m_1.5m")
SAMPLES = (  # structure, radius nm, distance nm (None: dilute)
    ("spheres_dilute", 5.0, None),
    ("spheres_dilute", 7.0, None),
    ("cylinders_dilute", 4.0, None),
    ("cylinders_dilute", 6.0, None),
    ("spheres_paracrystal", 4.0, 25.0),
    ("spheres_paracrystal", 6.0, 40.0),
    ("cylinders_hexagonal", 3.0, 22.0),
    ("cylinders_hexagonal", 5.0, 30.0),
)


def measure(pattern: np.ndarray, mask: np.ndarray, gaps: np.ndarray, dose: float,
            rng: np.random.Generator) -> np.ndarray:
    """One frame at ``dose`` counts per valid pixel (median): Poisson, gaps -1, and the
    beamstop's shadow (``mask`` without the gaps)."""
    lam = pattern * (dose / np.median(pattern[~mask]))
    lam[mask & ~gaps] *= 1e-4  # the beamstop's shadow
    counts = rng.poisson(lam).astype(np.int32)
    counts[gaps] = -1
    return counts


def frame_set(name: str, n_frames: int, dose: float, seed: int) -> tuple:
    geometry = HELD_OUT[name]
    mask, gaps = nominal_mask(geometry), geometry.detector.gap_mask()  # the set-up's, once
    rng = np.random.default_rng(seed)
    frames, masks, ids, structure, radius, distance = [], [], [], [], [], []
    for i, (kind, r, d) in enumerate(SAMPLES):
        pattern = bornagain_pattern(kind, r, d, geometry)
        index = Sample(kind, radius_nm=r, distance_nm=d or 30.0).structure_index
        for _ in range(n_frames):
            frames.append(measure(pattern, mask, gaps, dose, rng))
            masks.append(mask)
            ids.append(i)
            structure.append(index)
            radius.append(r)
            distance.append(np.nan if d is None else d)
    return (frames, masks, np.array(ids), np.array(structure), np.array(radius),
            np.array(distance), geometry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a q-grid checkpoint (.pt)")
    parser.add_argument("--frames", type=int, default=4, help="frames per sample and set-up")
    parser.add_argument("--dose", type=float, default=3.0, help="counts per pixel (median)")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    t = time.perf_counter()
    sets = [frame_set(name, args.frames, args.dose, args.seed + k)
            for k, name in enumerate(SETUPS)]
    simulated = time.perf_counter() - t
    report = {
        "setups": list(SETUPS),
        "samples": [list(s) for s in SAMPLES],
        "frames_per_sample_and_setup": args.frames,
        "dose_counts": args.dose,
        "bornagain_s": round(simulated, 1),
        "qgrid_model": cross_setup_figures(load_qencoder(args.model, "cpu"), sets,
                                           seed=args.seed),
        "pixel_model": cross_setup_figures(load_pretrained("cpu"), sets, seed=args.seed),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
