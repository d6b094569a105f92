"""Live view figures: row-in-Tiled -> point-on-page latency (streaming vs polling), and the
page load time of a 10,000-frame run.

Real parts: Debian ``redis-server``, ``tiled serve config`` with a Redis streaming cache (the
same server for both modes; polling is forced with ``mode="polling"``), the view server, and
headless Debian ``chromium`` through Playwright. Rows are written through the real derived
store, one append per frame at a scan's pace; latency = time the page drew the frame's point
(``Date.now()`` in the page) - time the append returned (the row is in Tiled), same clock.

    python benchmarks/bench_view.py [--frames 100] [--period 0.2] [--big 10000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "view")]

from conftest import CHROMIUM, CHROMIUM_ARGS, RedisServer, TiledProcess  # noqa: E402
from view_helpers import derived_rows, open_derived  # noqa: E402

from gisaxs_bluesky.view import BackgroundServer, ViewState, build_view_app  # noqa: E402


def _page(context, url: str):
    page = context.new_page()
    page.goto(url)
    return page


def latency(context, tiled: TiledProcess, mode: str, frames: int, period: float,
            tmp: Path) -> list[float]:
    client = tiled.client()
    writer = open_derived(client, f"raw-latency-{mode}", tmp / f"backup-{mode}")
    writer.append(derived_rows(1, 2))
    state = ViewState(client, mode=mode, poll_interval_s=0.5, tiled_label=tiled.uri)
    server = BackgroundServer(build_view_app(state)).start()
    try:
        page = _page(context, f"{server.url}/?run={writer.key}")
        page.wait_for_function("window.gisaxsView.nFrames === 1", timeout=30000)
        written = {}
        for s in range(2, frames + 2):
            writer.append(derived_rows(s, s + 1))
            written[s] = time.time()
            time.sleep(period)
        last = frames + 1
        page.wait_for_function(f"{last} in window.gisaxsView.seenAt", timeout=60000)
        seen = page.evaluate("window.gisaxsView.seenAt")
        page.close()
        return [seen[str(s)] / 1000 - t for s, t in written.items()]
    finally:
        state.close()
        server.stop()


def page_load(context, tiled: TiledProcess, n: int, tmp: Path) -> dict:
    client = tiled.client()
    writer = open_derived(client, "raw-big", tmp / "backup-big")
    t0 = time.perf_counter()
    for lo in range(1, n + 1, 1000):
        writer.append(derived_rows(lo, min(lo + 1000, n + 1)))
    writer.flush()
    write_s = time.perf_counter() - t0
    state = ViewState(client, tiled_label=tiled.uri)
    server = BackgroundServer(build_view_app(state)).start()
    out = {"write_s": write_s}
    try:
        for label in ("first (server reads the table)", "again (rows cached)"):
            t0 = time.perf_counter()
            page = _page(context, f"{server.url}/?run={writer.key}")
            page.wait_for_function(f"window.gisaxsView.nFrames === {n} && "
                                   "window.gisaxsView.loads >= 1", timeout=120000)
            drawn_s = time.perf_counter() - t0
            info = page.evaluate("({pts: window.gisaxsView.points.seq_num.length, "
                                 "sampling: document.getElementById('sampling').innerText, "
                                 "loadMs: window.gisaxsView.loadMs, "
                                 "serverMs: window.gisaxsView.serverMs})")
            out[label] = {"drawn_s": drawn_s, **info}
            page.close()
    finally:
        state.close()
        server.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--period", type=float, default=0.2, help="s between frames")
    parser.add_argument("--big", type=int, default=10_000, help="frames of the load test")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "redis").mkdir()
        redis = RedisServer(tmp / "redis")
        tiled = TiledProcess(tmp / "tiled", redis.uri)
        try:
            with sync_playwright() as p:
                context = p.chromium.launch_persistent_context(
                    str(tmp / "profile"), executable_path=CHROMIUM, headless=True,
                    args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
                print(f"latency row appended in Tiled -> point drawn on the page, "
                      f"{args.frames} frames, one every {args.period} s:")
                for mode in ("streaming", "polling"):
                    lat = latency(context, tiled, mode, args.frames, args.period, tmp)
                    print(f"  {mode:9s} median {statistics.median(lat) * 1000:6.0f} ms   "
                          f"max {max(lat) * 1000:6.0f} ms   (n={len(lat)})"
                          + ("   [polling every 0.5 s]" if mode == "polling" else ""))
                res = page_load(context, tiled, args.big, tmp)
                print(f"page load, run of {args.big} frames (rows written in "
                      f"{res.pop('write_s'):.1f} s):")
                for label, r in res.items():
                    print(f"  {label}: {r['drawn_s']:.2f} s to drawn (fetch + draw "
                          f"{r['loadMs'] / 1000:.2f} s, of which the server "
                          f"{r['serverMs'] / 1000:.2f} s); {r['sampling']}")
                context.close()
        finally:
            tiled.stop()
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
