"""The README's screenshot of the live view: ``gisaxs-bluesky demo --view`` (60 points, the
shipped model) in a subprocess, the page captured by headless Debian chromium through
Playwright (the browser the tests use), then Ctrl-C to the demo.

    python benchmarks/screenshot_view.py [--out docs/view.png] [--points 60]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "view")]

from conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "view.png")
    ap.add_argument("--points", type=int, default=60)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gisaxs_bluesky.cli", "demo", "--view", "--points",
               str(args.points), "--view-port", str(port), "--workdir", tmp, "--device", "cpu"]
        log = open(Path(tmp) / "demo.log", "w+")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            deadline = time.monotonic() + 900
            while "live view still serving" not in Path(log.name).read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(Path(log.name).read_text())
                    return 1
                time.sleep(1)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                            args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/gisaxs/")
                page.wait_for_function("window.gisaxsView.nFrames > 0", timeout=60000)
                n_bins = page.evaluate("window.gisaxsView.bins.length")
                page.wait_for_function(f"document.querySelectorAll('.bin-card .caption[data-"
                                       f"image]').length === {n_bins}", timeout=300000)
                page.wait_for_timeout(1000)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                print(f"{args.out}: {n_bins} bins; captions:",
                      page.locator(".bin-card .caption").first.inner_text())
                browser.close()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
