"""Reciprocal-space remap (+ encoder) throughput on full Pilatus 1M frames, batch 1 / 16 / 64.

Prints frames/s of: building the remap table of one geometry (once per geometry; a theta scan
builds one per incidence angle); the numba gather alone; gather + q-grid input + encoder on
CPU; the same with the gather in torch on CUDA when a GPU is present; and pyFAI's
grazing-incidence ``FiberIntegrator.integrate2d_grazing_incidence`` onto the same grid, the
alternative this project measured against its gather. Uses a randomly initialised DAE of the
shipped architecture (the cost of a trained one is the same).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gisaxs_bluesky.geometry import QGrid, remap, remap_table, remap_torch
from gisaxs_bluesky.geometry.reciprocal import _LAB_CACHE, _TABLE_CACHE
from gisaxs_bluesky.models import Encoder, GisaxsDAE
from gisaxs_bluesky.models.preprocess import q_inputs
from gisaxs_bluesky.models.qmodel import QEncoder
from gisaxs_bluesky.sim import Geometry, NoiseSpec, Sample, simulate


def _rate(n: int, fn, sync: bool = False) -> float:
    t0 = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--pyfai-frames", type=int, default=8)
    args = parser.parse_args()
    geometry = Geometry()
    instrument = geometry.instrument()
    grid = QGrid()
    noise = NoiseSpec(5.0, {"poisson": 1.0, "gaps": 1.0})
    distinct = np.stack([simulate(Sample(radius_nm=4 + i), noise=noise, seed=i, compute_binning=8)
                         .counts for i in range(8)])
    frames = distinct[np.arange(args.frames) % len(distinct)]
    print(f"frames: {frames.shape} {frames.dtype}, grid {grid.shape}, torch threads: "
          f"{torch.get_num_threads()}")

    _LAB_CACHE.clear()
    _TABLE_CACHE.clear()
    t0 = time.perf_counter()
    table = remap_table(instrument, grid)
    t_first = time.perf_counter() - t0
    _TABLE_CACHE.clear()
    t0 = time.perf_counter()
    remap_table(instrument.with_incidence(0.3), grid)
    t_next = time.perf_counter() - t0
    print(f"remap table: {t_first:.2f} s for a new detector position, {t_next:.2f} s for a new "
          f"incidence angle ({table.indices.size} entries)")

    remap(table, frames[:2])  # compile
    for batch in (1, 16, 64):
        fps = _rate(len(frames), lambda b=batch: [remap(table, frames[s : s + b])
                                                  for s in range(0, len(frames), b)])
        print(f"gather (numba, cpu)       batch={batch:3d}: {fps:8.1f} frames/s")

    model = GisaxsDAE()
    card = {"name": "untrained-qgrid", "version": "0", "input": "qgrid", "qgrid": grid.to_dict()}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        encoder = QEncoder(Encoder(model, card, device))
        encoder.encode(frames[:4], instrument)  # warm-up
        for batch in (1, 16, 64):
            fps = _rate(len(frames), lambda b=batch: encoder.encode(frames, instrument,
                                                                    batch_size=b),
                        sync=device == "cuda")
            print(f"remap + encoder ({device:4s})    batch={batch:3d}: {fps:8.1f} frames/s")
        if device == "cuda":
            t = torch.as_tensor(frames[:64]).cuda()
            remap_torch(table, t)
            torch.cuda.synchronize()
            fps = _rate(64, lambda: q_inputs(remap_torch(table, t), table), sync=True)
            print(f"gather + input (torch, cuda) batch= 64: {fps:8.1f} frames/s")

    try:
        from pyFAI.integrator.fiber import FiberIntegrator  # noqa: F401
    except ImportError:
        print("pyFAI FiberIntegrator not available")
        return
    fi = instrument.pyfai_geometry()
    mask = (frames[0] < 0).astype(np.int8)
    kwargs = dict(npt_ip=grid.n_q_par, npt_oop=grid.n_q_z, unit_ip="qip_nm^-1",
                  unit_oop="qoop_nm^-1", ip_range=(0.0, grid.q_par_max_nm),
                  oop_range=(grid.q_z_min_nm, grid.q_z_max_nm), sample_orientation=4,
                  incident_angle=np.deg2rad(instrument.incidence_deg), tilt_angle=0.0,
                  mask=mask, method=("no", "csr", "cython"))
    t0 = time.perf_counter()
    fi.integrate2d_grazing_incidence(frames[0], **kwargs)
    print(f"pyFAI FiberIntegrator first call (builds its own map): "
          f"{time.perf_counter() - t0:.2f} s")
    n = args.pyfai_frames
    fps = _rate(n, lambda: [fi.integrate2d_grazing_incidence(f, **kwargs) for f in frames[:n]])
    print(f"pyFAI FiberIntegrator csr (cpu)  batch=  1: {fps:8.1f} frames/s")


if __name__ == "__main__":
    main()
