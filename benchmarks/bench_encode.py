"""Encoder throughput on full Pilatus 1M frames (preprocessing included), batch 1 / 16 / 64,
and of the same with the 256 x 256 denoised frame (``return_denoised=True``), batch 16.

Runs on CPU, and on CUDA too when a GPU is present. Uses the shipped weights when they exist,
else a randomly initialised model of the same architecture (same cost).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gisaxs_bluesky.models import Encoder, GisaxsDAE, load_pretrained
from gisaxs_bluesky.models.checkpoint import CheckpointError
from gisaxs_bluesky.sim import NoiseSpec, Sample, simulate


def make_encoder(device: str) -> Encoder:
    try:
        return load_pretrained(device)
    except CheckpointError:
        return Encoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=128)
    args = parser.parse_args()
    noise = NoiseSpec(5.0, {"poisson": 1.0, "gaps": 1.0})
    distinct = np.stack([simulate(Sample(radius_nm=4 + i), noise=noise, seed=i, compute_binning=8)
                         .counts for i in range(8)])
    frames = distinct[np.arange(args.frames) % len(distinct)]
    print(f"frames: {frames.shape} {frames.dtype}, torch threads: {torch.get_num_threads()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        encoder = make_encoder(device)
        encoder.encode(frames[:4])  # warm-up
        for batch in (1, 16, 64):
            t0 = time.perf_counter()
            encoder.encode(frames, batch_size=batch)
            if device == "cuda":
                torch.cuda.synchronize()
            fps = len(frames) / (time.perf_counter() - t0)
            print(f"device={device:5s} batch={batch:3d}: {fps:8.1f} frames/s "
                  f"(model {encoder.name} {encoder.version})")
        t0 = time.perf_counter()
        encoder.encode(frames, batch_size=16, return_denoised=True)
        if device == "cuda":
            torch.cuda.synchronize()
        fps = len(frames) / (time.perf_counter() - t0)
        print(f"device={device:5s} batch= 16: {fps:8.1f} frames/s with the denoised frame")


if __name__ == "__main__":
    main()
