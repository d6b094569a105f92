"""Shared fixtures: real in-process Tiled (SQLite catalog + writable storage), a stoppable
loopback Tiled server, and a real RunEngine.

Fixtures
--------
tiled_catalog   writable Tiled catalog adapter; attributes ``.test_dir`` (tmp dir, readable by
                Tiled, put detector files under it) set on the adapter.
tiled_app       FastAPI app for ``tiled_catalog`` with ``json_seq_exporter`` registered for
                the ``BlueskyRun`` spec (so ``run.documents()`` works).
tiled_client    ``tiled.client`` root container talking to ``tiled_app`` in-process.
module_tiled_client  same, one per test module (for read-only tests sharing data).
tiled_server    ``LoopbackTiledServer`` on 127.0.0.1:<free port> with an API key;
                ``.client()``, ``.stop()``, ``.start()`` (same port, same data), ``.uri``.
detector_dir    directory (inside Tiled's readable storage) for simulated detector files.
RE              a real ``RunEngine`` whose loop thread is halted and joined afterwards.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import quote_plus

import httpx
import pytest
import uvicorn
from bluesky.run_engine import RunEngine, TransitionError
from bluesky_tiled_plugins.exporters import json_seq_exporter
from tiled.catalog import from_uri
from tiled.client import Context, from_context, from_uri as client_from_uri
from tiled.config import Authentication
from tiled.media_type_registration import default_serialization_registry
from tiled.server.app import build_app

__all__ = ["LoopbackTiledServer", "make_catalog", "make_app"]


def _serialization_registry():
    """Default Tiled serializers plus ``json_seq_exporter`` for ``BlueskyRun`` nodes."""
    registry = copy.deepcopy(default_serialization_registry)
    registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    return registry


@pytest.fixture(scope="session")
def _catalog_template(tmp_path_factory) -> Path:
    """An initialised (alembic-stamped) empty SQLite catalog, created once per session."""
    path = tmp_path_factory.mktemp("tiled_template") / "catalog.db"
    from_uri(f"sqlite:///{path}", init_if_not_exists=True)  # runs `tiled catalog init`
    return path


def make_catalog(directory: Path, template: Path):
    """Writable catalog in ``directory``: catalog.db, data/ (files), tables.sqlite (tables)."""
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "catalog.db"
    if not db.exists():
        shutil.copy(template, db)
    (directory / "data").mkdir(exist_ok=True)
    return from_uri(
        f"sqlite:///{db}",
        writable_storage={
            "filesystem": str(directory / "data"),
            "sql": f"sqlite:///{directory / 'tables.sqlite'}",
        },
        readable_storage=[str(directory)],
    )


def make_app(catalog, api_key: str | None = None):
    """Tiled app for ``catalog`` with the BlueskyRun json-seq exporter (and optional API key)."""
    kwargs = {}
    if api_key is not None:
        kwargs["authentication"] = Authentication(single_user_api_key=api_key)
    return build_app(catalog, serialization_registry=_serialization_registry(), **kwargs)


@pytest.fixture
def tiled_catalog(tmp_path, _catalog_template):
    """Writable SQLite-backed catalog in tmp_path (filesystem dir + SQLite table store)."""
    catalog = make_catalog(tmp_path / "tiled", _catalog_template)
    catalog.test_dir = tmp_path
    return catalog


@pytest.fixture
def detector_dir(tmp_path) -> Path:
    """Directory for simulated detector HDF5 files, inside Tiled's readable storage."""
    path = tmp_path / "tiled" / "detector"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def tiled_app(tiled_catalog):
    """In-process Tiled app serving ``tiled_catalog``."""
    return make_app(tiled_catalog)


@pytest.fixture
def tiled_client(tiled_app):
    """Root container client of ``tiled_app`` (no network)."""
    with Context.from_app(tiled_app) as context:
        yield from_context(context)


@pytest.fixture(scope="module")
def module_tiled_client(tmp_path_factory, _catalog_template):
    """Like ``tiled_client`` but shared by all tests of a module (for read-only tests)."""
    catalog = make_catalog(tmp_path_factory.mktemp("tiled_module"), _catalog_template)
    with Context.from_app(make_app(catalog)) as context:
        yield from_context(context)


class _ThreadedUvicorn(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # not in the main thread
        pass


class LoopbackTiledServer:
    """Tiled over HTTP on 127.0.0.1 in a thread; can be stopped and restarted on the same port."""

    def __init__(self, directory: Path, template: Path) -> None:
        self.directory = directory
        self.template = template
        self.api_key = secrets.token_hex(8)
        self.port = 0
        self._server: _ThreadedUvicorn | None = None
        self._thread: threading.Thread | None = None
        self._catalog = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        return f"{self.base_url}/api/v1?api_key={quote_plus(self.api_key)}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 20.0) -> None:
        """Start serving (same port and data as before, if restarted)."""
        if self.running:
            return
        self._catalog = make_catalog(self.directory, self.template)
        app = make_app(self._catalog, api_key=self.api_key)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, loop="asyncio", log_level="warning",
            lifespan="on",
        )
        self._server = _ThreadedUvicorn(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"Tiled test server failed to start on port {self.port}")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(trust_env=False) as http:
            while True:
                try:
                    if http.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("Tiled test server did not become ready")
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop serving (connections are refused until ``start``)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def client(self, **kwargs):
        """A fresh ``tiled.client`` for this server."""
        return client_from_uri(self.uri, **kwargs)


@pytest.fixture
def tiled_server(tmp_path, _catalog_template):
    """Running ``LoopbackTiledServer`` with its own SQLite catalog; stopped afterwards."""
    server = LoopbackTiledServer(tmp_path / "tiled_server", _catalog_template)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def RE():
    """Real RunEngine on its own loop; halted, loop stopped and thread joined afterwards."""
    loop = asyncio.new_event_loop()
    engine = RunEngine({}, loop=loop)
    yield engine
    if engine.state not in ("idle", "panicked"):
        try:
            engine.halt()
        except TransitionError:
            pass
    loop.call_soon_threadsafe(loop.stop)
    engine._th.join()
    loop.close()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Callbacks set torch's process-wide thread count (torch_threads="auto"): undo it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
