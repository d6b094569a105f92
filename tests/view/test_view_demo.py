"""``gisaxs-bluesky demo --view --tiled-uri URI``: the demo scans into that Tiled server and
serves the live view on it during and after the scan, until Ctrl-C; plain ``demo`` ends and
prints the view command for its catalog (real subprocesses, the shipped model, a loopback
Tiled server with an API key)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from gisaxs_bluesky.view import serve_catalog

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Lines:
    """The subprocess's output, read on a thread (a never-read pipe would block it)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._t.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, proc: subprocess.Popen, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in the demo's output:\n" + "\n".join(self.lines))


def test_demo_view_scans_into_the_given_tiled_and_serves_the_view(tiled_server, browser):
    port = _free_port()
    workdir = tiled_server.directory / "demo"  # detector files inside Tiled's readable storage
    cmd = [sys.executable, "-m", "gisaxs_bluesky.cli", "demo", "--view",
           "--tiled-uri", tiled_server.uri.split("?")[0], "--api-key", tiled_server.api_key,
           "--points", "3", "--view-port", str(port), "--workdir", str(workdir),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = _Lines(proc)
    try:
        line = out.wait_for("live view: ", proc, 120)
        url = f"http://127.0.0.1:{port}"
        assert url in line
        # served while the scan runs (before the report), not only after it
        assert httpx.get(f"{url}/api/status", timeout=30).status_code == 200
        out.wait_for("live view still serving at", proc, 300)
        assert proc.poll() is None  # the demo keeps serving until Ctrl-C

        # the scan and its derived data went to the given Tiled server
        client = tiled_server.client()
        runs = httpx.get(f"{url}/api/runs", timeout=30).json()["runs"]
        assert len(runs) == 1, runs
        (run,) = runs
        assert run["raw_uid"] in client and run["n_frames"] == 3
        assert run["status"] == "complete"
        raw = client[run["raw_uid"]]
        assert raw["primary"]["pilatus"].shape[0] == 3
        assert raw.metadata["start"]["gisaxs_geometry"]["detector"] == "Pilatus 1M"
        assert run["key"] in client["gisaxs_derived"]

        # the view on it: the bins and a representative frame, denoised, on q axes
        data = httpx.get(f"{url}/api/run/{run['key']}", timeout=60).json()
        assert data["n_frames"] == 3 and data["bins"]
        seq = data["bins"][0]["medoid_seq"]
        frame = httpx.get(f"{url}/api/run/{run['key']}/frame/{seq}", timeout=120).json()
        assert frame["image"] == "denoised" and frame["coords"] == "q", frame.get("notes")
        assert frame["x_title"] == "q_par (nm⁻¹)"
        page = browser.new_page()
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(f"{url}/")
        page.wait_for_selector(".bin-card .caption[data-coords=q]", timeout=60000)
        card = page.locator(".bin-card").first
        assert "q_par (nm⁻¹)" in card.locator(".frame").text_content()
        assert "q_z (nm⁻¹)" in card.locator(".frame").text_content()
        caption = card.locator(".caption").inner_text()
        assert caption.startswith("denoised by gisaxs-dae-small-"), caption
        assert "q axes from the run's documents" in caption
        # no CDN: every script, style and frame comes from the view server itself
        assert requested and all(u.startswith(url + "/") for u in requested), requested
        assert any(u.endswith("/static/plotly.min.js") for u in requested)
        page.close()
        sugg = httpx.get(f"{url}/api/suggestions/{run['raw_uid']}", timeout=30).json()
        assert len(sugg["suggestions"]) >= 1

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_plain_demo_ends_and_prints_the_view_command_for_its_catalog(tmp_path):
    """``make demo``: the demo ends on its own and prints the one command that opens the view
    on its catalog; that catalog, served as the command serves it, shows the run."""
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "gisaxs_bluesky.cli", "demo", "--points", "2", "--workdir",
         str(workdir), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("live view of this catalog:")]
    assert lines == [f"live view of this catalog: gisaxs-bluesky view --catalog "
                     f"{workdir / 'catalog'}"], done.stdout[-2000:]
    served = serve_catalog(workdir / "catalog")
    try:
        runs = httpx.get(f"{served.view_url}api/runs", timeout=60).json()["runs"]
        assert [(r["n_frames"], r["status"]) for r in runs] == [(2, "complete")]
    finally:
        served.stop()
