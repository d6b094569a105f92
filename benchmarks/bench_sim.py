"""Simulator throughput: full-size (1043 x 981) noisy Pilatus frames per second.

Prints frames/s for (a) a new sample every frame and (b) new noise on a sample already computed
(how training sets are made: several noisy frames per identity), in 1 and 2 processes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

from gisaxs_bluesky.sim import NoiseSpec, random_noise, random_sample, simulate


def _work(args: tuple[int, int, bool, int]) -> int:
    seed, n, fresh, compute_binning = args
    rng = np.random.default_rng(seed)
    sample = random_sample(rng)
    for _ in range(n):
        if fresh:
            sample = random_sample(rng)
        noise = random_noise(rng)
        noise = NoiseSpec(noise.dose_counts, {**noise.kinds, "poisson": 1.0})
        frame = simulate(sample, noise=noise, seed=rng, compute_binning=compute_binning).counts
        assert frame.shape == (1043, 981)
    return n


def measure(processes: int, n: int, fresh: bool, compute_binning: int) -> float:
    per = n // processes
    t0 = time.perf_counter()
    if processes == 1:
        _work((0, per, fresh, compute_binning))
    else:
        with mp.get_context("fork").Pool(processes) as pool:
            pool.map(_work, [(i, per, fresh, compute_binning) for i in range(processes)])
    return per * processes / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args()
    print(f"cpu cores: {mp.cpu_count()}, frames per measurement: {args.frames}")
    for compute_binning in (4, 6):
        for fresh in (True, False):
            for processes in (1, 2):
                fps = measure(processes, args.frames, fresh, compute_binning)
                what = "new sample each frame " if fresh else "new noise, same sample"
                print(f"compute_binning={compute_binning}  {what}  processes={processes}: "
                      f"{fps:6.1f} frames/s")


if __name__ == "__main__":
    main()
