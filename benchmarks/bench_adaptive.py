"""Adaptive vs uniform: points inside a small defect with a budget of 20 frames.

Per seed: a sample (regions B | C along sample_x 10-30 mm) with a 2 mm defect whose edges sit
between the 11 coarse grid points; the adaptive plan (real RunEngine, simulated HDF5 detector,
DAE encoder + online binner live, suggestions from the core) vs a uniform grid of 20 points.

    python benchmarks/bench_adaptive.py --seeds 5 [--png-dir out/] [--untrained]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--num-coarse", type=int, default=11)
    p.add_argument("--batch-size", type=int, default=3)
    p.add_argument("--width", type=float, default=2.0, help="defect width, mm")
    p.add_argument("--png-dir", type=Path, default=None)
    p.add_argument("--oracle", action="store_true",
                   help="policy check only: ground-truth region labels instead of the DAE")
    p.add_argument("--untrained", action="store_true",
                   help="seeded untrained DAE (pipeline check only, when no weights exist)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.oracle:
        return oracle(args)
    import torch
    from bluesky.run_engine import RunEngine

    from gisaxs_bluesky.adaptive import (
        LiveEncoder,
        SuggestConfig,
        adaptive_scan,
        defect_scene,
        exposure_frame_fn,
        plot_suggestions,
    )
    from gisaxs_bluesky.models import Encoder, GisaxsDAE, load_pretrained
    from gisaxs_bluesky.sim.detector import make_gisaxs_detector, make_motors

    if args.untrained:
        torch.manual_seed(0)
        encoder = Encoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")
    else:
        encoder = load_pretrained("cpu")
    print(f"encoder: {encoder.name}-{encoder.version} sha256={encoder.sha256[:12] or '-'}")
    start, stop = 10.0, 30.0
    cfg = SuggestConfig({"sample_x": (start, stop)}, min_step=0.1)
    uniform = np.linspace(start, stop, args.budget)
    rows = []
    loop = asyncio.new_event_loop()
    RE = RunEngine({}, loop=loop)
    try:
        for seed in range(args.seeds):
            scene = defect_scene(seed, start=start, stop=stop, num_coarse=args.num_coarse,
                                 width=args.width)
            (d,) = scene.defect_regions
            x, exposure = make_motors("sample_x", "exposure", exposure=1.0)
            with tempfile.TemporaryDirectory() as tmp:
                det = make_gisaxs_detector(tmp, exposure_frame_fn(scene), [x, exposure])
                live = LiveEncoder(encoder, motors=["sample_x"])
                token = RE.subscribe(live)
                t0 = time.perf_counter()
                (uid,) = RE(adaptive_scan([det], x, start, stop, args.num_coarse,
                                          suggester=cfg, budget=args.budget, callback=live,
                                          exposure=exposure, batch_size=args.batch_size))
                wall = time.perf_counter() - t0
                RE.unsubscribe(token)
                res = live.results(uid)
                live.close()
            pos = res.positions["sample_x"]
            inside = int(np.sum((pos >= d.x_min_mm) & (pos < d.x_max_mm)))
            uni = int(np.sum((uniform >= d.x_min_mm) & (uniform < d.x_max_mm)))
            coarse = np.linspace(start, stop, args.num_coarse)
            flagged = int(np.sum(res.is_outlier & (pos >= d.x_min_mm) & (pos < d.x_max_mm)))
            rows.append((seed, d.x_min_mm, d.x_max_mm, len(pos), inside, uni, flagged, wall))
            print(f"seed {seed}: defect {d.x_min_mm:6.2f}-{d.x_max_mm:6.2f} mm "
                  f"(coarse inside: {int(np.sum((coarse >= d.x_min_mm) & (coarse < d.x_max_mm)))})"
                  f" | adaptive {inside:2d} in defect of {len(pos)} frames "
                  f"({flagged} flagged outlier) | uniform {uni:2d} of {args.budget} | "
                  f"{wall:5.1f} s", flush=True)
            if args.png_dir is not None:
                args.png_dir.mkdir(parents=True, exist_ok=True)
                plot_suggestions(res, [], path=args.png_dir / f"adaptive_seed{seed}.png",
                                 regions=[(d.x_min_mm, d.x_max_mm, "defect")],
                                 title=f"seed {seed}: {inside} frames in the defect")
    finally:
        if RE.state != "idle":
            RE.halt()
        loop.call_soon_threadsafe(loop.stop)
        RE._th.join()
        loop.close()
    a = np.array([r[4] for r in rows])
    u = np.array([r[5] for r in rows])
    print(f"\nadaptive: mean {a.mean():.1f} points in defect (min {a.min()}, "
          f">=3 in {int(np.sum(a >= 3))}/{len(a)} seeds); uniform: mean {u.mean():.1f} "
          f"(max {u.max()}); adaptive > uniform in {int(np.sum(a > u))}/{len(a)} seeds")
    return 0


def oracle(args: argparse.Namespace) -> int:
    """Suggestion policy with ideal labels (defect = outlier, region = bin); no frames, no DAE."""
    from gisaxs_bluesky.adaptive import ScanResults, SuggestConfig, defect_scene, suggest_points

    start, stop = 10.0, 30.0
    cfg = SuggestConfig({"sample_x": (start, stop)}, min_step=0.1)
    uniform = np.linspace(start, stop, args.budget)
    print("ORACLE labels (policy check, not the DAE pipeline)")
    counts = []
    for seed in range(args.seeds):
        scene = defect_scene(seed, start=start, stop=stop, num_coarse=args.num_coarse,
                             width=args.width)
        (d,) = scene.defect_regions
        names = {r.name: i for i, r in enumerate(scene.regions)}
        xs = list(np.linspace(start, stop, args.num_coarse))
        while len(xs) < args.budget:
            reg = [scene.region_at(x) for x in xs]
            res = ScanResults({"sample_x": np.array(xs)}, np.array([names[r.name] for r in reg]),
                              np.array([5.0 if r.is_defect else 0.2 for r in reg]),
                              np.array([r.is_defect for r in reg]), np.zeros(len(xs)),
                              np.arange(1, len(xs) + 1))
            todo = suggest_points(res, cfg, max_points=min(args.batch_size,
                                                           args.budget - len(xs)))
            if not todo:
                break
            xs += [s.position["sample_x"] for s in todo]
        pos = np.array(xs)
        inside = int(np.sum((pos >= d.x_min_mm) & (pos < d.x_max_mm)))
        uni = int(np.sum((uniform >= d.x_min_mm) & (uniform < d.x_max_mm)))
        counts.append((inside, uni))
        print(f"seed {seed}: defect {d.x_min_mm:6.2f}-{d.x_max_mm:6.2f} mm | adaptive {inside:2d}"
              f" of {len(pos)} | uniform {uni:2d} of {args.budget}")
    a, u = np.array(counts).T
    print(f"\nadaptive: mean {a.mean():.1f} (min {a.min()}); uniform: mean {u.mean():.1f} "
          f"(max {u.max()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
