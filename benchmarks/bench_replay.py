"""Replay throughput (frames/s) for a 1000-frame run: serial, and over 2 Dask workers.

Set-up (not timed): a loopback Tiled server (SQLite catalog), a few distinct simulated frames
tiled with fresh Poisson noise into one HDF5 file, registered by TiledWriter from documents
shaped like the simulated detector's (stream_resource/stream_datum). The 2-worker case splits
the same frames over 2 runs (replay parallelises over runs).

    python benchmarks/bench_replay.py [--frames 1000] [--shape 261x246] [--model untrained]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from bluesky_tiled_plugins import TiledWriter  # noqa: E402
from conftest import LoopbackTiledServer  # noqa: E402  (tests/conftest.py)
from tiled.catalog import from_uri  # noqa: E402

from gisaxs_bluesky import replay  # noqa: E402
from gisaxs_bluesky.sim.scene import default_scene  # noqa: E402


def make_frames(n: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``n`` frames: 4 simulated structures (binned down to ``shape``), Poisson-resampled."""
    scene = default_scene()
    base = []
    for x in (5.0, 15.0, 25.0, 35.0):
        f = scene.frame({"sample_x": x}).astype(np.float64)
        fy, fx = f.shape[0] // shape[0], f.shape[1] // shape[1]
        f = np.clip(f[: shape[0] * fy, : shape[1] * fx], 0, None)
        base.append(f.reshape(shape[0], fy, shape[1], fx).sum(axis=(1, 3)))
    rng = np.random.default_rng(seed)
    return np.stack([rng.poisson(base[i % 4]) for i in range(n)]).astype(np.int32)


def write_run(client, directory: Path, frames: np.ndarray, scan_id: int) -> str:
    """HDF5 file + documents (as the simulated detector emits) -> TiledWriter; returns uid."""
    n, h, w = frames.shape
    path = directory / f"pilatus_{uuid.uuid4()}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=frames, chunks=(1, h, w))
    uri = f"file://localhost{path}"
    uid, desc, sres = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    t0 = time.time()
    x = np.linspace(0.0, 40.0, n, endpoint=False)
    docs = [
        ("start", {"uid": uid, "time": t0, "scan_id": scan_id, "plan_name": "bench",
                   "motors": ["x"], "detectors": ["pilatus"], "num_points": n}),
        ("descriptor", {
            "uid": desc, "time": t0, "run_start": uid, "name": "primary",
            "data_keys": {
                "pilatus": {"source": uri, "shape": [h, w], "dtype": "array",
                            "dtype_numpy": "<i4", "external": "STREAM:",
                            "object_name": "pilatus"},
                "x": {"source": "sim://x", "shape": [], "dtype": "number",
                      "dtype_numpy": "<f8", "object_name": "x"},
            },
            "configuration": {}, "hints": {}, "object_keys": {"pilatus": ["pilatus"],
                                                                "x": ["x"]},
        }),
        ("stream_resource", {"uid": sres, "data_key": "pilatus", "run_start": uid,
                             "mimetype": "application/x-hdf5", "uri": uri,
                             "parameters": {"dataset": "/entry/data/data",
                                            "chunk_shape": [1, h, w]}}),
        ("stream_datum", {"uid": f"{sres}/0", "stream_resource": sres, "descriptor": desc,
                          "seq_nums": {"start": 1, "stop": n + 1},
                          "indices": {"start": 0, "stop": n}}),
        ("event_page", {"uid": [str(uuid.uuid4()) for _ in range(n)],
                        "time": (t0 + np.arange(n) * 0.01).tolist(),
                        "seq_num": list(range(1, n + 1)), "descriptor": desc,
                        "data": {"x": x.tolist()}, "timestamps": {"x": [t0] * n},
                        "filled": {}}),
        ("stop", {"uid": str(uuid.uuid4()), "time": t0 + n * 0.01, "run_start": uid,
                  "exit_status": "success", "reason": "", "num_events": {"primary": n}}),
    ]
    writer = TiledWriter(client, batch_size=1000)
    for name, doc in docs:
        writer(name, doc)
    return uid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--shape", default="261x246", help="frame HxW (Pilatus: 1043x981)")
    parser.add_argument("--model", default="untrained", help="pretrained | path | untrained")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.lower().split("x"))

    tmp = Path(tempfile.mkdtemp(prefix="bench_replay_"))
    template = tmp / "template.db"
    from_uri(f"sqlite:///{template}", init_if_not_exists=True)
    server = LoopbackTiledServer(tmp / "tiled", template)
    server.start()
    results: dict[str, object] = {"frames": args.frames, "shape": list(shape),
                                  "model": args.model}
    try:
        client = server.client()
        det = tmp / "tiled" / "det"
        det.mkdir(parents=True)
        t = time.perf_counter()
        frames = make_frames(args.frames, shape)
        half = args.frames // 2
        uid_all = write_run(client, det, frames, 1)
        uids_split = [write_run(client, det, frames[:half], 2),
                      write_run(client, det, frames[half:], 3)]
        results["setup_s"] = round(time.perf_counter() - t, 1)

        opts = replay.ReplayOptions(model=args.model, chunk_size=args.chunk_size,
                                    backup_dir=str(tmp / "backup"), root="bench_serial")
        replay.load_model(args.model, "cpu")  # model load not timed
        t = time.perf_counter()
        (s,) = replay.replay_runs(client, [uid_all], options=opts, show_progress=False)
        dt = time.perf_counter() - t
        assert s.status == "complete" and s.frames_written == args.frames, s
        results["serial_s"] = round(dt, 2)
        results["serial_frames_per_s"] = round(args.frames / dt, 1)

        t = time.perf_counter()
        (s2,) = replay.replay_runs(client, [uid_all], options=opts, show_progress=False)
        results["rerun_up_to_date_s"] = round(time.perf_counter() - t, 2)
        assert s2.status == "up-to-date", s2

        if not args.skip_dask:
            opts.root = "bench_dask"
            t = time.perf_counter()
            out = replay.replay_distributed(server.uri, uids_split, options=opts,
                                            n_workers=args.workers, show_progress=False)
            dt = time.perf_counter() - t
            assert all(s.status == "complete" for s in out), out
            n = sum(s.frames_written for s in out)
            work = max(s.seconds for s in out)
            results[f"dask{args.workers}_wall_s"] = round(dt, 2)
            results[f"dask{args.workers}_frames_per_s_wall"] = round(n / dt, 1)
            results[f"dask{args.workers}_frames_per_s_excl_startup"] = round(n / work, 1)
    finally:
        server.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
