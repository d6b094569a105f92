"""Benchmark DAEBinningCallback on Pilatus 1M frames (1043 x 981) through a real RunEngine.

Prints:

* pipeline-only throughput (frames/s: encode + bin, frames already in memory);
* end-to-end throughput: frames / (scan start -> last derived row in Tiled), with frames read
  live from the detector's HDF5 file by the callback's worker;
* scan wall time with TiledWriter only vs TiledWriter + callback, and the overhead %;
* the callback's capacity: the recorded documents of a finished scan fed to a fresh callback
  as fast as it takes them (frame read from HDF5 -> encode -> bin -> rows in Tiled), which is
  the frame rate it sustains when the scan itself is not the bottleneck.

Frames are simulated once with ``default_scene`` and cached as .npy (``--cache``), so the
simulated detector only copies frames; simulation time does not count. ``--exposure`` gives
the detector an integration time per frame (a real scan's pace; 0 = as fast as the RunEngine
and TiledWriter go). ``--server`` runs Tiled as its own process on loopback (``tiled serve
catalog``), as at a beamline, instead of in-process; ``--postgres`` keeps its catalog and
tables in PostgreSQL, as production Tiled servers do (SQLite tables allow one writer at a
time, so without it TiledWriter and the callback share a write lock, and the RunEngine waits
whenever the callback is writing: the figure is printed).

    python benchmarks/bench_callback.py --frames 64 [--exposure 0.1] [--server [--postgres]]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from gisaxs_bluesky.sim.detector import PILATUS_SHAPE
from gisaxs_bluesky.sim.geometry import Geometry

#: the instrument of default_scene's frames (its Geometry()), for a q-grid model's remap
SCENE_INSTRUMENT = Geometry().instrument()


def cached_frames(cache: Path, n_distinct: int, seed: int) -> np.ndarray:
    """(n_distinct, 1043, 981) int32 frames along 0-40 mm, simulated once then read from cache."""
    path = cache / f"pilatus-scene-{seed}-{n_distinct}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    from gisaxs_bluesky.sim.scene import default_scene

    scene = default_scene(seed=seed)
    xs = np.linspace(0.5, 39.5, n_distinct)
    t = time.perf_counter()
    frames = np.stack([scene({"sample_x": float(x)}) for x in xs]).astype(np.int32)
    print(f"simulated {n_distinct} frames in {time.perf_counter() - t:.1f} s -> {path}")
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, frames)
    return frames


def make_encoder(device: str, untrained: bool, qgrid: str | None = None):
    from gisaxs_bluesky.models import CheckpointError, Encoder, GisaxsDAE, load_pretrained

    if qgrid is not None:  # a q-grid model: each frame remapped with the run's geometry
        from gisaxs_bluesky.geometry import QGrid
        from gisaxs_bluesky.models.qmodel import QEncoder, load_qencoder

        if qgrid:
            return load_qencoder(qgrid, device)
        import torch

        torch.manual_seed(0)
        card = {"name": "untrained-qgrid", "version": "0", "input": "qgrid",
                "qgrid": QGrid().to_dict()}
        return QEncoder(Encoder(GisaxsDAE(), card, device))
    if not untrained:
        try:
            return load_pretrained(device)
        except CheckpointError as exc:
            print(f"{exc}\n-> using random weights (same compute cost)")
    import torch

    torch.manual_seed(0)
    return Encoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, device)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """A throw-away PostgreSQL cluster on a free loopback port (``initdb`` + ``pg_ctl`` on PATH;
    run as the ``postgres`` user when this process is root), with two databases: the Tiled
    catalog and its table storage, as a beamline's production Tiled has them."""

    def __init__(self) -> None:
        import os
        import shutil
        import subprocess

        for exe in ("initdb", "pg_ctl", "psql"):
            if shutil.which(exe) is None:
                raise SystemExit(f"--postgres needs PostgreSQL's {exe} on PATH")
        self.port = free_port()
        # its own folder in the system temp dir: the postgres user must be able to reach it
        self.dir = directory = Path(tempfile.mkdtemp(prefix="gisaxs-bench-pg-"))
        as_user = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(directory, "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        self._as_user = as_user
        run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True,  # noqa: E731
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run("initdb", "-D", str(directory / "pg"), "-A", "trust", "-U", "postgres")
        run("pg_ctl", "-D", str(directory / "pg"), "-w", "-l", str(directory / "pg.log"), "-o",
            f"-p {self.port} -k {directory} -c listen_addresses=127.0.0.1", "start")
        for db in ("catalog", "tables"):
            run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q",
                "-c", f"CREATE DATABASE {db}")

    def uri(self, db: str, driver: str = "") -> str:
        return f"postgresql{driver}://postgres@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        import shutil
        import subprocess

        subprocess.run([*self._as_user, "pg_ctl", "-D", str(self.dir / "pg"), "-m", "fast",
                        "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


class TiledProcess:
    """``tiled serve catalog`` on a free loopback port: SQLite catalog + files + SQLite tables
    in ``directory``, or the catalog and tables in PostgreSQL (``postgres``)."""

    def __init__(self, directory: Path, postgres: PostgresCluster | None = None) -> None:
        import secrets
        import subprocess
        import sys

        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
        self.port = free_port()
        self.api_key = secrets.token_hex(8)
        if postgres is None:
            catalog, tables = directory / "catalog.db", f"sqlite:///{directory / 'tables.sqlite'}"
        else:
            catalog, tables = postgres.uri("catalog", "+asyncpg"), postgres.uri("tables")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tiled", "serve", "catalog", "--init", str(catalog),
             "-w", str(directory / "data"), "-w", tables,
             "-r", str(directory), "--api-key", self.api_key, "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self, timeout: float = 60.0):
        from tiled.client import from_uri

        deadline = time.monotonic() + timeout
        while True:
            try:
                return from_uri(f"http://127.0.0.1:{self.port}", api_key=self.api_key)
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class ZmqConsumerProcess:
    """The callback in its own process: a 0MQ proxy process and ``gisaxs-bluesky serve``
    (``DAEBinningCallback`` behind a ``RemoteDispatcher``); the RunEngine only publishes.

    Called like a callback (a bluesky ``Publisher``); :meth:`wait` polls Tiled until the
    derived node of the last published run reports it finished."""

    def __init__(self, server: TiledProcess, workdir: Path, device: str,
                 batch_size: int) -> None:
        import subprocess
        import sys

        from bluesky.callbacks.zmq import Publisher

        from gisaxs_bluesky.serve import wait_until_connected

        ports = [free_port(), free_port()]
        self.procs = [subprocess.Popen(
            [sys.executable, "-c", "from bluesky.callbacks.zmq import Proxy; "
             f"Proxy({ports[0]}, {ports[1]}).start()"])]
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "gisaxs_bluesky.cli", "serve",
             "--zmq", f"127.0.0.1:{ports[1]}", "--tiled-uri", f"http://127.0.0.1:{server.port}",
             "--api-key", server.api_key, "--device", device, "--batch-size", str(batch_size),
             "--backup-dir", str(workdir / "backup-zmq"),
             "--binner-state", str(workdir / "binner-zmq.json")],
            stderr=subprocess.DEVNULL))
        self.client = server.client()
        self.publisher = Publisher(f"127.0.0.1:{ports[0]}")
        time.sleep(3.0)  # the consumer loads its model
        wait_until_connected(self.publisher, settle=2.0)
        self.uid: str | None = None

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            self.uid = doc["uid"]
        self.publisher(name, doc)

    def wait(self, timeout: float = 300.0) -> None:
        root = "gisaxs_derived"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                for key in self.client[root]:
                    if key.startswith(self.uid) and self.client[root][key].metadata.get(
                            "status") in ("complete", "failed"):
                        return
            except KeyError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"no finished derived node for run {self.uid}")

    def close(self) -> None:
        pass

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)


class WaitClock:
    """The write lock as TiledWriter takes it, timing how long the RunEngine thread waits."""

    def __init__(self, lock) -> None:
        self.lock, self.waited = lock, 0.0

    def __enter__(self):
        t = time.perf_counter()
        self.lock.__enter__()
        self.waited += time.perf_counter() - t

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def scan_once(client, workdir: Path, frames: np.ndarray, n: int, callback=None, lock=None,
              exposure_s: float = 0.0, record: list | None = None, md: dict | None = None):
    """One list_scan of n points; returns (uid, scan wall s, results-ready s, s the RunEngine
    waited for the write lock)."""
    import bluesky.plans as bp
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from gisaxs_bluesky.callbacks import serialized
    from gisaxs_bluesky.sim.detector import make_gisaxs_detector, make_motors

    (sx,) = make_motors("sample_x")
    k = len(frames)

    def frame_fn(pos):
        i = int(round(pos["sample_x"])) % k
        return np.asarray(frames[i])

    det = make_gisaxs_detector(workdir / "catalog" / "detector", frame_fn, [sx],
                               shape=PILATUS_SHAPE, dtype=np.int32, exposure_s=exposure_s)
    RE = RunEngine({})
    clock = WaitClock(lock)
    RE.subscribe(serialized(TiledWriter(client, batch_size=1), clock))
    if callback is not None:
        RE.subscribe(callback)
    if record is not None:
        RE.subscribe(lambda name, doc: record.append((name, doc)))
    t0 = time.perf_counter()
    (uid,) = RE(bp.list_scan([det], sx, [float(i % k) for i in range(n)], md=md or {}))
    scan_s = time.perf_counter() - t0
    if callback is not None:
        callback.wait()
    ready_s = time.perf_counter() - t0
    return uid, scan_s, ready_s, clock.waited


def check_rows(table, n: int) -> None:
    """Every frame has its row and was encoded (no frame refused, e.g. for want of geometry)."""
    assert len(table) == n, f"expected {n} rows, found {len(table)}"
    if "flag" in table:
        refused = [f for f in table["flag"] if str(f).startswith("geometry")]
        assert not refused, f"{len(refused)} frames not encoded: {refused[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64, help="frames per scan")
    parser.add_argument("--distinct", type=int, default=16, help="distinct cached frames")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=None,
                        help="the callback's batch_timeout, s (default: the callback's)")
    parser.add_argument("--untrained", action="store_true", help="random weights")
    parser.add_argument("--qgrid", nargs="?", const="", default=None, metavar="CHECKPOINT",
                        help="a q-grid model (a checkpoint, or random weights of the shipped "
                        "architecture with a q-grid card): every frame is remapped onto the "
                        "q grid with the geometry the scan's start document carries")
    parser.add_argument("--repeats", type=int, default=2, help="scans per configuration")
    parser.add_argument("--exposure", type=float, default=0.0,
                        help="detector integration time per frame, s (0: no wait)")
    parser.add_argument("--server", action="store_true",
                        help="Tiled as a separate process on loopback (default: in-process)")
    parser.add_argument("--postgres", action="store_true",
                        help="with --server: catalog and tables in a throw-away PostgreSQL "
                        "cluster (initdb/pg_ctl on PATH), as in production; raw and derived "
                        "writes then need no shared lock")
    parser.add_argument("--zmq", action="store_true",
                        help="with --server: the callback in its own process (0MQ proxy + "
                        "`gisaxs-bluesky serve`); the RunEngine only publishes documents")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "gisaxs-bench-cache")
    args = parser.parse_args()
    if args.zmq and not args.postgres:
        parser.error("--zmq needs --postgres: SQLite tables take one writer, and a lock "
                     "cannot be shared with another process")
    logging.basicConfig(level=logging.WARNING)

    from gisaxs_bluesky.callbacks import DAEBinningCallback
    from gisaxs_bluesky.models import make_binner
    from gisaxs_bluesky.pipeline import BinningPipeline
    from gisaxs_bluesky.store import DerivedStore
    from gisaxs_bluesky.tiled_client import local_tiled_client

    frames = np.asarray(cached_frames(args.cache, args.distinct, seed=0))
    encoder = make_encoder(args.device, args.untrained, args.qgrid)
    print(f"model {encoder.info()} on {encoder.device}; {args.frames} frames/scan "
          f"of {PILATUS_SHAPE}, batch {args.batch_size}")

    # pipeline only (no Bluesky, no Tiled)
    pipe = BinningPipeline(encoder, make_binner(encoder), batch_size=args.batch_size)
    # the simulated scene's instrument, as its start document says (a q-grid model uses it)
    md = {"gisaxs_geometry": SCENE_INSTRUMENT.to_dict()} if args.qgrid is not None else None
    per_frame = (lambda m: {"geometries": [SCENE_INSTRUMENT] * m}) if args.qgrid is not None \
        else (lambda m: {})
    pipe.process(frames[:2], [0, 1], [0.0, 0.0], **per_frame(2))  # warm up
    t = time.perf_counter()
    done = 0
    while done < args.frames:
        m = min(args.batch_size, args.frames - done)
        batch = frames[np.arange(done, done + m) % len(frames)]
        pipe.process(batch, np.arange(done, done + m), np.zeros(m), **per_frame(m))
        done += m
    pipe_s = time.perf_counter() - t
    print(f"pipeline only (encode + bin): {args.frames / pipe_s:6.1f} frames/s")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pg = PostgresCluster() if args.postgres else None
        server = (TiledProcess(workdir / "catalog", pg) if args.server or pg or args.zmq
                  else None)
        client = server.client() if server else local_tiled_client(workdir / "catalog")
        print(f"Tiled {'server process on loopback' if server else 'in-process'}"
              f"{', PostgreSQL catalog + tables' if pg else ', SQLite catalog + tables'}; "
              f"detector exposure {args.exposure:g} s")
        # SQLite tables take one writer at a time: TiledWriter and the callback share a lock
        lock = contextlib.nullcontext() if pg else threading.Lock()
        scan_once(client, workdir, frames, 4, lock=lock)  # warm up Tiled + RunEngine
        base, withcb, ready, capacity, waited = [], [], [], [], []

        remote = ZmqConsumerProcess(server, workdir, args.device, args.batch_size) \
            if args.zmq else None
        if remote:
            print("callback in its own process (0MQ proxy + gisaxs-bluesky serve)")

        def callback():
            if remote:
                return remote
            return DAEBinningCallback(
                client, encoder=encoder, binner=make_binner(encoder),
                write_lock=None if pg else lock,
                batch_size=args.batch_size, backup_dir=workdir / "backup",
                **({} if args.batch_timeout is None else {"batch_timeout": args.batch_timeout}),
                spill_dir=workdir / "spill",
            )

        for _ in range(args.repeats):
            docs: list = []
            _, s, _, _ = scan_once(client, workdir, frames, args.frames, lock=lock,
                                   exposure_s=args.exposure, record=docs, md=md)
            base.append(s)
            cb = callback()
            uid, s, rd, wait_s = scan_once(client, workdir, frames, args.frames, cb, lock,
                                           exposure_s=args.exposure, md=md)
            withcb.append(s)
            ready.append(rd)
            waited.append(wait_s)
            key = DerivedStore.node_key(uid, encoder.info())
            check_rows(client["gisaxs_derived"][key]["frames"].read(), args.frames)
            cb.close()
            # capacity: the baseline scan's documents, replayed into a fresh callback at once
            cb = callback()
            t = time.perf_counter()
            for name, doc in docs:
                cb(name, doc)
            cb.wait()
            capacity.append(time.perf_counter() - t)
            key = DerivedStore.node_key(docs[0][1]["uid"], encoder.info())
            check_rows(client["gisaxs_derived"][key]["frames"].read(), args.frames)
            cb.close()
        b, w, rd = float(np.median(base)), float(np.median(withcb)), float(np.median(ready))
        cap = float(np.median(capacity))
        print(f"scan wall, TiledWriter only:        {b:6.2f} s ({args.frames / b:6.1f} frames/s)")
        pairs = [100 * (y - x) / x for x, y in zip(base, withcb, strict=True)]
        q1, med, q3 = np.percentile(pairs, [25, 50, 75])
        print(f"scan wall, + DAEBinningCallback:    {w:6.2f} s  overhead {med:+.1f} % (median "
              f"of {len(pairs)} scan pairs, quartiles {q1:+.1f} / {q3:+.1f} %)")
        print(f"  pairs: {', '.join(f'{p:+.1f}' for p in pairs)}")
        if not pg:
            print(f"  of which the RunEngine waited for the shared write lock: "
                  f"{float(np.median(waited)):.2f} s ({100 * float(np.median(waited)) / b:.1f} %)")
        print(f"end-to-end (scan start -> last row in Tiled): {rd:6.2f} s "
              f"= {args.frames / rd:6.1f} frames/s "
              f"(results lag the scan end by {rd - w:.2f} s)")
        print(f"callback capacity (HDF5 frame read -> rows in Tiled, recorded scan): "
              f"{args.frames / cap:6.1f} frames/s")
        if remote:
            remote.stop()
        if server:
            server.stop()
        if pg:
            pg.stop()

if __name__ == "__main__":
    main()
