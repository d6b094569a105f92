"""`gisaxs-bluesky serve`: bin runs live from bluesky's 0MQ proxy (:mod:`gisaxs_bluesky.serve`,
``--zmq``) or as TiledWriter writes them to Tiled (:mod:`gisaxs_bluesky.tiled_stream`,
``--tiled-stream``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from . import serve
from .frames import geometry_from_args
from .replay import connect, load_model
from .runtime import RuntimeConfig
from .tiled_stream import TiledStreamConsumer

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve``: the 0MQ options of :mod:`gisaxs_bluesky.serve` plus ``--tiled-stream``."""
    serve.add_arguments(parser)
    for action in parser._actions:  # --zmq is required there; here one of the two sources is
        if "--zmq" in action.option_strings:
            action.required = False
    parser.add_argument("--tiled-stream", default=None, metavar="URI",
                        help="bin runs as TiledWriter writes them to this Tiled (instead of "
                             "--zmq); derived data go to the same Tiled unless --tiled-uri")
    parser.add_argument("--mode", choices=["auto", "streaming", "polling"], default="auto",
                        help="with --tiled-stream: websocket streaming or polling")
    parser.add_argument("--existing", action="store_true",
                        help="with --tiled-stream: also bin runs already in Tiled")


def run(args: argparse.Namespace) -> int:
    """``gisaxs-bluesky serve``: 0MQ (``--zmq``) or Tiled streaming (``--tiled-stream``)."""
    if bool(args.zmq) == bool(args.tiled_stream):
        print("error: pass exactly one of --zmq HOST:PORT or --tiled-stream URI",
              file=sys.stderr)
        return 2
    if args.zmq:
        return serve.run(args)
    api_key = args.api_key or os.environ.get("TILED_API_KEY")
    config = RuntimeConfig.from_args(args)
    try:
        geometry, fallback = geometry_from_args(args)
        client = connect(args.tiled_stream, api_key)
        target = connect(args.tiled_uri, api_key) if args.tiled_uri else None
        consumer = TiledStreamConsumer(
            client, load_model(args.model, args.device), derived_client=target,
            root=config.root, stream=args.stream or "primary", image_key=args.image_key,
            batch_size=config.batch_size, backup_dir=config.backup_dir, mode=args.mode,
            existing=args.existing, geometry=geometry, geometry_fallback=fallback)
        consumer.start()
    except Exception as exc:  # noqa: BLE001 - unreachable Tiled, bad key, missing weights
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    print(f"following new runs in {args.tiled_stream.split('?')[0]} ({consumer.mode}: "
          f"{consumer.mode_reason}); derived data -> /{config.root}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    consumer.stop()
    print(f"stopped; runs binned: {consumer.runs_done}", file=sys.stderr)
    return 0
