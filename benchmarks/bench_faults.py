"""How long DAEBinningCallback holds the RunEngine thread when the callback falls behind.

A real RunEngine scans an inline detector (``--frames`` frames, ``--exposure`` s each) with
the callback subscribed; its derived rows go to a Tiled server on loopback whose every write
request (POST/PUT/PATCH) is delayed by ``--write-delay`` s (a slow or busy server), and whose
model pass takes ``--model-delay`` s longer per batch, so the queue of ``--max-queue`` frames
fills and frames are spilled to disk. Prints, per ``put_timeout``: the callback's worst and
total time on the RunEngine thread, the scan's wall time against the same scan without the
callback, and frames spilled / rows stored (= frames sent).

    python benchmarks/bench_faults.py [--frames 70] [--exposure 0.05] [--max-queue 8]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


class _SlowWrites:
    """ASGI middleware: every write request waits ``delay`` s before it is served."""

    def __init__(self, app, delay: float) -> None:
        self.app, self.delay = app, delay

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            await asyncio.sleep(self.delay)
        await self.app(scope, receive, send)


def serve(directory: Path, delay: float):
    """A Tiled server (SQLite catalog + tables) on 127.0.0.1 in a thread; returns (uri, stop)."""
    import uvicorn
    from tiled.catalog import from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    catalog = from_uri(f"sqlite:///{directory / 'catalog.db'}", init_if_not_exists=True,
                       writable_storage={"filesystem": str(directory / "data"),
                                         "sql": f"sqlite:///{directory / 'tables.sqlite'}"})
    key = secrets.token_hex(8)
    app = _SlowWrites(build_app(catalog, authentication=Authentication(single_user_api_key=key)),
                      delay)

    class Server(uvicorn.Server):
        def install_signal_handlers(self) -> None:
            pass

    server = Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}/api/v1?api_key={key}", stop


class InlineDetector:
    """Readable whose image goes inline into the event, after ``exposure`` s."""

    def __init__(self, frames: np.ndarray, exposure: float) -> None:
        self.name, self.parent = "cam", None
        self.frames, self.exposure, self.i = frames, exposure, 0

    def describe(self):
        return {"cam_image": {"source": "sim", "dtype": "array",
                              "shape": list(self.frames.shape[1:]), "dtype_numpy": "<i4"}}

    def read(self):
        time.sleep(self.exposure)
        frame = self.frames[self.i % len(self.frames)]
        self.i += 1
        return {"cam_image": {"value": frame, "timestamp": time.time()}}

    def read_configuration(self):
        return {}

    def describe_configuration(self):
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=70)
    parser.add_argument("--exposure", type=float, default=0.05, help="s per frame")
    parser.add_argument("--shape", type=int, nargs=2, default=[512, 512])
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--write-delay", type=float, default=0.5, help="s per Tiled write")
    parser.add_argument("--model-delay", type=float, default=0.3, help="extra s per batch")
    parser.add_argument("--put-timeouts", type=float, nargs="+", default=[0.0, 0.2],
                        help="0 is the default; 0.2 was the default before issue 12")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import bluesky.plans as bp
    import torch
    from bluesky import RunEngine
    from tiled.client import from_uri

    from gisaxs_bluesky.callbacks import DAEBinningCallback
    from gisaxs_bluesky.models import Encoder, GisaxsDAE, make_binner
    from gisaxs_bluesky.sim.detector import blob_frame_fn, make_motors
    from gisaxs_bluesky.store import DerivedStore

    class SlowEncoder(Encoder):
        def encode_inputs(self, x, **kwargs):
            time.sleep(args.model_delay)
            return super().encode_inputs(x, **kwargs)

    fn = blob_frame_fn(tuple(args.shape), width_motor="x", seed=0)
    frames = np.stack([fn({"x": 0.5 * i}) for i in range(16)]).astype(np.int32)
    (x,) = make_motors("x")
    RE = RunEngine({})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uri, stop = serve(tmp / "tiled", args.write_delay)
        try:
            client = from_uri(uri)
            t = time.perf_counter()
            RE(bp.scan([InlineDetector(frames, args.exposure)], x, 0, 1, args.frames))
            bare = time.perf_counter() - t
            print(f"{args.frames} frames {tuple(args.shape)}, exposure {args.exposure} s, "
                  f"max_queue {args.max_queue}, Tiled writes +{args.write_delay} s, model "
                  f"+{args.model_delay} s/batch; scan without the callback: {bare:.2f} s")
            print(f"{'put_timeout':>11} {'worst ms':>9} {'total s':>8} {'scan s':>7} "
                  f"{'spilled':>8} {'stored/sent':>12} {'drain s':>8}")
            for put_timeout in args.put_timeouts:
                torch.manual_seed(0)
                enc = SlowEncoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, "cpu")
                root = f"bench{int(put_timeout * 1000)}"
                cb = DAEBinningCallback(client, encoder=enc, binner=make_binner(enc), root=root,
                                        backup_dir=tmp / "backup", spill_dir=tmp / "spill",
                                        max_queue=args.max_queue, put_timeout=put_timeout,
                                        batch_size=8)
                waits: list[float] = []

                def timed(name, doc, cb=cb, waits=waits):
                    t0 = time.perf_counter()
                    cb(name, doc)
                    waits.append(time.perf_counter() - t0)

                token = RE.subscribe(timed)
                t = time.perf_counter()
                (uid,) = RE(bp.scan([InlineDetector(frames, args.exposure)], x, 0, 1,
                                    args.frames))
                scan_s = time.perf_counter() - t
                RE.unsubscribe(token)
                t = time.perf_counter()
                cb.wait(600)
                drain = time.perf_counter() - t
                node = client[root][DerivedStore.node_key(uid, enc.info())]
                stored = len(node["frames"].read(columns=["seq_num"]))
                print(f"{put_timeout:11.2f} {max(waits) * 1e3:9.1f} {sum(waits):8.2f} "
                      f"{scan_s:7.2f} {node.metadata['n_spilled']:8d} "
                      f"{stored:>5d}/{args.frames:<6d} {drain:8.2f}")
                cb.close()
        finally:
            stop()


if __name__ == "__main__":
    main()
