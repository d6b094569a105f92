"""Serving the view: beside a remote Tiled (``--tiled-uri``) or inside a local catalog's Tiled.

``gisaxs-bluesky view --tiled-uri http://tiled:8000 --api-key KEY`` serves the page on its own
port and reads from that Tiled. ``gisaxs-bluesky view --catalog DIR`` serves DIR's SQLite
catalog through a Tiled app on loopback with the view mounted at ``/gisaxs/`` (one server,
one port); ``--redis redis://...`` gives that Tiled a streaming cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from ..qserver import QueueBridge
from ..replay import connect
from ..runtime import DEFAULT_ROOT
from .app import ViewState, build_view_app, mount_view
from .data import ViewConfig

__all__ = ["BackgroundServer", "catalog_app", "serve_catalog", "ServedCatalog",
           "add_arguments", "run"]

logger = logging.getLogger(__name__)


class _ThreadedUvicorn(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # not in the main thread
        pass


class BackgroundServer:
    """uvicorn serving ``app`` on host:port in a daemon thread (port 0: a free one)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        config = uvicorn.Config(app, host=host, port=port, loop="asyncio", log_level="warning",
                                lifespan="on", ws="websockets-sansio")
        self._server = _ThreadedUvicorn(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True,
                                        name=f"uvicorn-{host}:{port}")
        self.port = port

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.host}:{self.port} failed to start "
                                   "(port in use?)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def catalog_app(directory: Path, *, api_key: str, cache_uri: str | None = None) -> Any:
    """Tiled app over the demo-layout catalog in ``directory`` (catalog.db, data/, tables)."""
    from tiled.catalog import from_uri
    from tiled.config import Authentication, StreamingCacheConfig
    from tiled.server.app import build_app

    directory = Path(directory)
    if not (directory / "catalog.db").is_file():
        raise FileNotFoundError(f"{directory}: no catalog.db (expected a catalog made by "
                                "`gisaxs-bluesky demo`, e.g. demo_output/catalog)")
    (directory / "data").mkdir(exist_ok=True)
    cache_config = (StreamingCacheConfig(uri=cache_uri).model_dump() if cache_uri else None)
    catalog = from_uri(
        f"sqlite:///{directory / 'catalog.db'}",
        writable_storage={"filesystem": str(directory / "data"),
                          "sql": f"sqlite:///{directory / 'tables.sqlite'}"},
        readable_storage=[str(directory.parent)],
        cache_config=cache_config,
    )
    return build_app(catalog, authentication=Authentication(single_user_api_key=api_key))


class ServedCatalog:
    """A local catalog served over HTTP with the view mounted; ``client()`` talks to it."""

    def __init__(self, directory: Path, *, host: str = "127.0.0.1", port: int = 0,
                 cache_uri: str | None = None, view_kwargs: dict | None = None,
                 bridge_kwargs: dict | None = None) -> None:
        self.api_key = secrets.token_hex(12)
        self.cache_uri = cache_uri
        app = catalog_app(directory, api_key=self.api_key, cache_uri=cache_uri)
        self.view_app = mount_view(app)
        self.server = BackgroundServer(app, host, port)
        self.view_kwargs = dict(view_kwargs or {})
        self.bridge_kwargs = dict(bridge_kwargs or {})
        self.state: ViewState | None = None

    @property
    def tiled_uri(self) -> str:
        return f"{self.server.url}/api/v1"

    @property
    def view_url(self) -> str:
        return f"{self.server.url}/gisaxs/"

    def client(self) -> Any:
        from tiled.client import from_uri

        return from_uri(self.tiled_uri, api_key=self.api_key)

    def start(self) -> ServedCatalog:
        self.server.start()
        client = self.client()
        bridge = QueueBridge(client, **self.bridge_kwargs)
        self.state = ViewState(client, bridge=bridge, tiled_label=self.tiled_uri,
                               **self.view_kwargs)
        self.view_app.state.view = self.state
        return self

    def stop(self) -> None:
        if self.state is not None:
            self.state.close()
        self.server.stop()


def serve_catalog(directory: Path, **kwargs: Any) -> ServedCatalog:
    """Start :class:`ServedCatalog` (see there)."""
    return ServedCatalog(directory, **kwargs).start()


# ----------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gisaxs-bluesky view``."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--tiled-uri", default=None,
                     help="Tiled server holding the runs (default env GISAXS_TILED_URI)")
    src.add_argument("--catalog", type=Path, default=None,
                     help="serve a local catalog directory (e.g. demo_output/catalog)")
    parser.add_argument("--api-key", default=None, help="Tiled API key (default env "
                        "TILED_API_KEY)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--root", default=DEFAULT_ROOT)
    parser.add_argument("--mode", choices=["auto", "streaming", "polling"], default="auto",
                        help="how updates are followed (auto: streaming when Tiled offers it)")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds (polling)")
    parser.add_argument("--redis", default=None,
                        help="with --catalog: streaming cache for the served Tiled")
    parser.add_argument("--max-points", type=int, default=ViewConfig.max_points)
    parser.add_argument("--model", default=None,
                        help="model that denoises a bin's representative frame when the run's "
                             "own model is not found by name (a checkpoint path or an adapted "
                             "model's name); used only if it is the model that binned the run")
    parser.add_argument("--qserver", default=os.environ.get("QSERVER_ZMQ_CONTROL_ADDRESS"),
                        help="RE manager 0MQ control address for accepted suggestions, "
                             "e.g. tcp://localhost:60615")
    parser.add_argument("--plan", default="measure_suggestion",
                        help="plan queued per accepted point")
    parser.add_argument("--detectors", default="det", help="comma-separated device names")
    parser.add_argument("--auto-approve", type=int, default=None, metavar="POINTS",
                        help="accept up to POINTS suggestions per run without a person "
                             "(default: off, every plan needs an approval)")


def _bridge_kwargs(args: argparse.Namespace) -> dict:
    return {"qserver": args.qserver, "root": args.root, "plan": args.plan,
            "detectors": args.detectors.split(","), "auto_budget": args.auto_approve}


def _wait_for_ctrl_c(stop: threading.Event) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass


def run(args: argparse.Namespace) -> int:
    """``gisaxs-bluesky view``: serve until Ctrl-C; 2 on a start-up error."""
    config = ViewConfig(max_points=args.max_points)
    view_kwargs = {"root": args.root, "mode": args.mode, "poll_interval_s": args.poll_interval,
                   "config": config, "model": args.model}
    try:
        if args.catalog is not None:
            served = ServedCatalog(args.catalog, host=args.host, port=args.port,
                                   cache_uri=args.redis, view_kwargs=view_kwargs,
                                   bridge_kwargs=_bridge_kwargs(args)).start()
            url, stop_fn, state = served.view_url, served.stop, served.state
        else:
            uri = args.tiled_uri or os.environ.get("GISAXS_TILED_URI")
            if not uri:
                print("error: pass --tiled-uri URI or --catalog DIR (or set GISAXS_TILED_URI)",
                      file=sys.stderr)
                return 2
            client = connect(uri, args.api_key or os.environ.get("TILED_API_KEY"))
            state = ViewState(client, bridge=QueueBridge(client, **_bridge_kwargs(args)),
                              tiled_label=uri.split("?")[0], **view_kwargs)
            server = BackgroundServer(build_view_app(state), args.host, args.port).start()

            def stop_fn() -> None:
                state.close()
                server.stop()

            url = server.url + "/"
    except Exception as exc:  # noqa: BLE001 - unreachable Tiled, bad key, port in use
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"view: {url}  (updates: {state.watcher.mode}: {state.watcher.mode_reason}); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    _wait_for_ctrl_c(threading.Event())
    stop_fn()
    return 0
