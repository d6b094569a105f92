"""Remote live consumer: DAE binning on documents received from a Bluesky 0MQ proxy.

RunEngine side (beamline)::

    from bluesky.callbacks.zmq import Publisher
    RE.subscribe(Publisher("proxy-host:5577"))        # proxy: bluesky-0MQ-proxy 5577 5578

Analysis side (any machine that reaches the proxy and Tiled)::

    gisaxs-bluesky serve --zmq proxy-host:5578 --tiled-uri http://tiled:8000 --api-key ...

A ``bluesky.callbacks.zmq.RemoteDispatcher`` subscribed to the proxy's output feeds the
documents to :class:`~gisaxs_bluesky.callbacks.DAEBinningCallback`, which writes the same
derived node as the in-process callback. Frames come inline in events, from HDF5 files on
shared storage (``stream_resource``/``stream_datum``), or from Tiled when the files are not
visible here.

PUB/SUB drops messages sent before a subscriber is connected; :func:`wait_until_connected`
sends "ping" start documents (``{"gisaxs_ping": n}``, ignored by the consumer) through a
Publisher until the consumer has seen one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from .callbacks import DAEBinningCallback
from .frames import add_geometry_arguments, geometry_from_args
from .models import load_model
from .replay import ReplayError, connect
from .runtime import RuntimeConfig, add_runtime_arguments

__all__ = [
    "PING_KEY",
    "ZmqConsumer",
    "wait_until_connected",
    "make_callback",
    "add_arguments",
    "run",
]

logger = logging.getLogger(__name__)

#: key marking a connection-check start document (never routed to the callback)
PING_KEY = "gisaxs_ping"


class ZmqConsumer:
    """Receive documents from a 0MQ proxy and route them to ``callback`` (in one thread).

    ``start()`` blocks until :meth:`stop` (thread-safe) is called; ``start_in_thread()`` runs
    it in a daemon thread.  A callback exception is logged and counted, never stops the loop.
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        callback: Callable[[str, dict], Any],
        *,
        prefix: bytes = b"",
    ) -> None:
        from bluesky.callbacks.zmq import RemoteDispatcher

        self.address = address
        self.callback = callback
        self.loop = asyncio.new_event_loop()
        self.dispatcher = RemoteDispatcher(address, prefix=prefix, loop=self.loop)
        self.dispatcher.subscribe(self._route)
        self.counts: Counter[str] = Counter()
        self.pings = 0
        self.errors: list[str] = []
        self.connected = threading.Event()  # set on the first message (ping or document)
        self.stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_requested = False

    def _route(self, name: str, doc: dict) -> None:
        self.connected.set()
        if name == "start" and PING_KEY in doc:
            self.pings += 1
            logger.debug("ping %s received", doc[PING_KEY])
            return
        self.counts[name] += 1
        if name == "start":
            logger.info("run %s (scan_id=%s) started", doc.get("uid"), doc.get("scan_id"))
        elif name == "stop":
            logger.info("run %s stopped (%s)", doc.get("run_start"), doc.get("exit_status"))
        try:
            self.callback(name, doc)
        except Exception as exc:  # noqa: BLE001 - the consumer must keep running
            msg = f"{name} document: {type(exc).__name__}: {exc}"
            self.errors.append(msg)
            logger.exception("callback failed on %s", msg)

    def start(self) -> None:
        """Block, dispatching documents, until :meth:`stop`."""
        try:
            if not self._stop_requested:
                self.dispatcher.start()
        except (asyncio.CancelledError, KeyboardInterrupt):
            pass
        except Exception as exc:  # e.g. a bad address: keep it for the caller
            self.errors.append(f"consumer for {self.address!r} failed: "
                               f"{type(exc).__name__}: {exc}")
            logger.error("%s", self.errors[-1])
            raise
        finally:
            self.stopped.set()

    def start_in_thread(self) -> threading.Thread:
        """Run :meth:`start` in a daemon thread; returns the thread."""
        self._thread = threading.Thread(target=self.start, name="gisaxs-zmq-consumer",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        """Stop receiving (thread-safe); waits for the loop thread when there is one."""
        self._stop_requested = True
        deadline = time.monotonic() + timeout
        task = getattr(self.dispatcher, "_task", None)
        while task is None and self._thread is not None and self._thread.is_alive() \
                and time.monotonic() < deadline:  # started, poll task not created yet
            time.sleep(0.01)
            task = getattr(self.dispatcher, "_task", None)
        if task is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # loop already closed
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


def wait_until_connected(
    publisher: Callable[[str, dict], Any],
    consumer: ZmqConsumer | None = None,
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    settle: float = 1.0,
) -> bool:
    """Ping through ``publisher`` until ``consumer`` has received a ping; False on timeout.

    Without a ``consumer`` (remote process) it pings for ``settle`` seconds and returns True.
    """
    deadline = time.monotonic() + (timeout if consumer is not None else settle)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        publisher("start", {PING_KEY: n, "uid": f"ping-{uuid.uuid4()}", "time": time.time()})
        if consumer is not None and consumer.pings > 0:
            return True
        time.sleep(interval)
    return consumer is None


def make_callback(client: Any, *, model: str = "pretrained", device: str = "auto",
                  **kwargs: Any) -> Any:
    """DAEBinningCallback for ``client`` with the model ``model`` (see models.load_model)."""
    return DAEBinningCallback(client, encoder=load_model(model, device), **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gisaxs-bluesky serve``."""
    parser.add_argument("--zmq", required=True, metavar="HOST:PORT",
                        help="the 0MQ proxy's output (subscriber) address")
    parser.add_argument("--tiled-uri", default=None,
                        help="Tiled for derived data (default env GISAXS_TILED_URI)")
    parser.add_argument("--api-key", default=None, help="Tiled API key (default env "
                        "TILED_API_KEY)")
    parser.add_argument("--prefix", default="", help="0MQ publisher prefix to listen to")
    parser.add_argument("--model", default="pretrained",
                        help="'pretrained', a checkpoint .pt, or 'untrained[:seed]'")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-key", default=None)
    parser.add_argument("--stream", default=None, help="stream to bin (default: first with "
                        "an image)")
    parser.add_argument("--binner-state", default=None,
                        help="binner state file (default: per-user cache, persists bins)")
    add_geometry_arguments(parser)
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``gisaxs-bluesky serve``: runs until SIGINT/SIGTERM; 2 on a start-up error."""
    uri = args.tiled_uri or os.environ.get("GISAXS_TILED_URI")
    api_key = args.api_key or os.environ.get("TILED_API_KEY")
    if not uri:
        print("error: no Tiled URI: pass --tiled-uri or set GISAXS_TILED_URI", file=sys.stderr)
        return 2
    try:
        geometry, fallback = geometry_from_args(args)  # a bad value: said before connecting
        client = connect(uri, api_key)
        config = RuntimeConfig.from_args(args)
        kwargs: dict[str, Any] = {"config": config, "geometry": geometry,
                                  "geometry_fallback": fallback}
        for name, value in (("image_key", args.image_key), ("stream_name", args.stream),
                            ("binner_state_path", args.binner_state)):
            if value is not None:
                kwargs[name] = value
        callback = make_callback(client, model=args.model, device=args.device, **kwargs)
        consumer = ZmqConsumer(args.zmq, callback, prefix=args.prefix.encode())
    except (ReplayError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - e.g. zmq address errors, missing weights
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    def _shutdown(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        consumer.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _shutdown)
        signal.signal(signal.SIGTERM, _shutdown)
    print(f"listening on {args.zmq}; derived data -> {uri.split('?')[0]} /{config.root}",
          file=sys.stderr, flush=True)
    try:
        consumer.start()
    finally:
        logger.info("draining the callback queue")
        callback.wait(timeout=60)
        callback.close()
    print(f"stopped; documents received: {dict(consumer.counts)}", file=sys.stderr)
    return 0
