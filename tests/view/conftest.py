"""Real parts for the view and Queue Server tests, started here and stopped afterwards.

redis_server    Debian ``redis-server`` on a free loopback port (skips when not installed).
tiled_streaming a ``tiled serve catalog`` subprocess with ``--cache redis://...`` (websocket
                streaming) and an API key; ``.uri``, ``.api_key``, ``.client()``.
qserver         ``start-re-manager`` subprocess (simulated motor ``sample_x``, detector
                ``det``; plans ``list_scan``, ``count``) on the same Redis; ``.address``,
                ``.api`` (REManagerAPI).
browser         headless Debian ``chromium`` driven by Playwright (never downloads a browser).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from view_helpers import derived_rows, open_derived, write_suggestions

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start a server with its output in a log file (a never-read pipe fills up and blocks
    the server once it has logged 64 KiB)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    proc.log = log
    return proc


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = Path(proc.log).read_text(errors="replace") if hasattr(proc, "log") else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{out[-3000:]}")
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RedisServer:
    def __init__(self, directory: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed (Debian: apt-get install -y redis-server)")
        self.port = free_port()
        self.proc = _spawn(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory)], directory / "redis.log")
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.port)
        _wait(r.ping, 20, "redis-server", self.proc)

    @property
    def uri(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        _stop(self.proc)


@pytest.fixture
def suggested_run(tmp_path):
    """``suggested_run(client, n) -> (raw_uid, writer)``: a fresh raw run's derived node with
    rows 1 .. n-1 flushed to Tiled, and its three suggestions."""

    def make(client, n: int):
        raw_uid = f"raw-{secrets.token_hex(4)}"
        writer = open_derived(client, raw_uid, tmp_path / "backup")
        writer.append(derived_rows(1, n))
        writer.flush()
        write_suggestions(client, raw_uid)
        return raw_uid, writer

    return make


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


class TiledProcess:
    """``tiled serve config`` in a subprocess: SQLite catalog, writable files + SQLite tables,
    and (``cache_uri``) a streaming cache. A config file rather than ``tiled serve catalog
    --cache``: in tiled 0.2.20 that flag fails unless ``--temp`` is given too."""

    def __init__(self, directory: Path, cache_uri: str | None) -> None:
        import yaml

        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
        self.directory = directory
        self.api_key = secrets.token_hex(8)
        self.port = free_port()
        config = {
            "authentication": {"single_user_api_key": self.api_key},
            "trees": [{"path": "/", "tree": "catalog", "args": {
                "uri": f"sqlite:///{directory / 'catalog.db'}", "init_if_not_exists": True,
                "writable_storage": [str(directory / "data"),
                                     f"sqlite:///{directory / 'tables.sqlite'}"],
                "readable_storage": [str(directory)]}}],
        }
        if cache_uri:
            config["streaming_cache"] = {"uri": cache_uri}
        (directory / "config.yml").write_text(yaml.safe_dump(config))
        cmd = [str(BIN / "tiled"), "serve", "config", str(directory / "config.yml"),
               "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = _spawn(cmd, directory / "tiled.log")
        _wait(lambda: httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200, 60,
              "tiled serve", self.proc)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        return f"{self.base_url}/api/v1"

    def client(self):
        from tiled.client import from_uri

        return from_uri(self.uri, api_key=self.api_key)

    def stop(self) -> None:
        _stop(self.proc)


@pytest.fixture(scope="session")
def tiled_streaming(tmp_path_factory, redis_server):
    server = TiledProcess(tmp_path_factory.mktemp("tiled_stream"), redis_server.uri)
    yield server
    server.stop()


class QueueServer:
    """RE manager in a subprocess with the simulated devices of qserver_startup/."""

    def __init__(self, directory: Path, redis_port: int) -> None:
        startup = directory / "startup"
        shutil.copytree(HERE / "qserver_startup", startup)
        import bluesky_queueserver

        perms = (Path(bluesky_queueserver.__file__).parent / "profile_collection_sim"
                 / "user_group_permissions.yaml")
        # the startup code imports gisaxs_bluesky (the plan): make this checkout importable
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
        subprocess.run([str(BIN / "qserver-list-plans-devices"), "--startup-dir", str(startup),
                        "--file-dir", str(startup)], check=True, capture_output=True,
                       text=True, timeout=120, env=env)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.proc = _spawn(
            [str(BIN / "start-re-manager"), "--startup-dir", str(startup),
             "--existing-plans-devices", str(startup / "existing_plans_and_devices.yaml"),
             "--user-group-permissions", str(perms), "--update-existing-plans-devices",
             "NEVER", "--zmq-control-addr", f"tcp://127.0.0.1:{self.port}",
             "--zmq-info-addr", f"tcp://127.0.0.1:{free_port()}", "--zmq-publish-console",
             "OFF", "--redis-addr", f"127.0.0.1:{redis_port}", "--redis-name-prefix",
             f"gisaxs_test_{secrets.token_hex(4)}", "--quiet"],
            directory / "re-manager.log", env=env)
        from bluesky_queueserver_api.zmq import REManagerAPI

        self.api = REManagerAPI(zmq_control_addr=self.address, timeout_recv=5.0)
        _wait(lambda: self.api.status()["manager_state"] == "idle", 60, "start-re-manager",
              self.proc)

    def queue_items(self) -> list[dict]:
        return self.api.queue_get()["items"]

    def stop(self) -> None:
        try:
            self.api.close()
        except Exception:  # noqa: BLE001
            pass
        _stop(self.proc)


@pytest.fixture(scope="session")
def qserver(tmp_path_factory, redis_server):
    server = QueueServer(tmp_path_factory.mktemp("qserver"), redis_server.port)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright (python package) not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        # a persistent context is how Playwright takes a (fresh) --user-data-dir
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        yield context
        context.close()
