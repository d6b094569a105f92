"""The live view's web app (FastAPI): JSON endpoints, server-sent events, the page itself.

The page (``static/index.html`` + ``view.js``) draws with plotly.js, served from the plotly
Python wheel's own ``package_data/plotly.min.js`` (no CDN; the network may be closed).
Updates reach the page as server-sent events (``/api/events``) that the :class:`Watcher`
produces from Tiled streaming or polling. :func:`mount_view` mounts the app inside an
existing Tiled server app (``/gisaxs/``), so a beamline serves it where it serves data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

from ..qserver import DecisionError, QueueBridge
from ..runtime import DEFAULT_ROOT
from .data import ViewConfig, umap_available
from .medoid import MedoidFrames
from .watch import Watcher

__all__ = ["ViewState", "build_view_app", "mount_view", "plotly_js_path", "STATIC_DIR"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


def plotly_js_path() -> Path:
    """plotly.min.js as shipped in the plotly wheel (``plotly/package_data``)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found at {path}; reinstall plotly")
    return path


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class ViewState:
    """What one view serves: a Tiled client, its Watcher, the Queue Server bridge."""

    def __init__(self, client: Any, *, bridge: Any = None, root: str = DEFAULT_ROOT,
                 mode: str = "auto", poll_interval_s: float = 0.5,
                 config: ViewConfig | None = None, tiled_label: str = "",
                 model: Any = None) -> None:
        self.client = client
        self.root = root
        self.bridge = bridge if bridge is not None else QueueBridge(client, None, root=root)
        self.tiled_label = tiled_label
        self.watcher = Watcher(client, root=root, mode=mode, poll_interval_s=poll_interval_s,
                               config=config)
        # a bin's representative frame: the medoid denoised by the run's model, on q axes
        self.frames = MedoidFrames(client, model=model,
                                   max_pixels=self.watcher.config.preview_pixels)
        self.clients: set[asyncio.Queue] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._auto_lock = threading.Lock()
        self.watcher.listeners.append(self.publish)
        self.watcher.listeners.append(self._auto_approve)
        self.watcher.start()

    def close(self) -> None:
        self.watcher.stop()

    def publish(self, event: str, payload: dict) -> None:
        """Send an event to every connected page (callable from any thread)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        data = json.dumps(_clean(payload), separators=(",", ":"))
        for q in list(self.clients):
            try:
                loop.call_soon_threadsafe(q.put_nowait, (event, data))
            except RuntimeError:  # loop closed
                return

    def _auto_approve(self, event: str, payload: dict) -> None:
        if event != "suggestions" or self.bridge.auto_budget is None:
            return
        raw_uid = payload.get("raw_uid")
        if not raw_uid:
            return

        def work() -> None:
            with self._auto_lock:
                done = self.bridge.auto_approve(raw_uid)
            if done:
                self.publish("suggestions", {"raw_uid": raw_uid,
                                             "auto_accepted": [d["suggestion_id"] for d in done]})

        threading.Thread(target=work, daemon=True, name="gisaxs-auto-approve").start()

    def status(self) -> dict:
        b = self.bridge
        return {**self.watcher.status(), "tiled": self.tiled_label, "root": self.root,
                "qserver": b.qserver_address if b.api is not None else None,
                "auto_budget": b.auto_budget, "plan": b.plan, "detectors": b.detectors,
                "umap": umap_available()}

    def resolve(self, key: str) -> str:
        """A derived node key from a node key or a raw uid; KeyError with a clear message."""
        root = self.client[self.root] if self.root in self.client else {}
        if key in root:
            return key
        from tiled.queries import Eq

        if self.root in self.client:
            for k, node in self.client[self.root].search(Eq("raw_uid", key)).items():
                if not k.endswith("-suggestions") and "model_id" in node.metadata:
                    return k
        if key in self.client:
            raise KeyError(f"raw run {key!r} has no derived data in /{self.root} (it was not "
                           f"binned): bin it with `gisaxs-bluesky replay --uid {key}` or run "
                           "the scan with the DAE binning callback subscribed")
        raise KeyError(f"no run {key!r} in Tiled (neither a derived node in /{self.root} nor "
                       "a raw run)")


def build_view_app(state: ViewState | None = None) -> Any:
    """The FastAPI app; ``app.state.view`` may be set later (503 until then)."""
    app = FastAPI(title="gisaxs-bluesky live view", docs_url=None, redoc_url=None)
    app.state.view = state

    def view() -> ViewState:
        s = app.state.view
        if s is None:
            raise HTTPException(503, "the view is starting (Tiled client not connected yet)")
        return s

    def ok(obj: Any) -> JSONResponse:
        return JSONResponse(_clean(obj))

    def fail(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> Any:
        return HTMLResponse((STATIC_DIR / "index.html").read_text())

    @app.get("/static/plotly.min.js")
    async def plotly_js() -> Any:
        return FileResponse(plotly_js_path(), media_type="text/javascript")

    @app.get("/static/{name}")
    async def static(name: str) -> Any:
        path = STATIC_DIR / name
        if name not in {"view.js", "view.css"} or not path.is_file():
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(path)

    @app.get("/api/status")
    async def status() -> Any:
        return ok(view().status())

    @app.get("/api/runs")
    def runs() -> Any:
        s = view()
        try:
            return ok({"runs": s.watcher.runs(refresh=True), **s.status()})
        except Exception as exc:  # noqa: BLE001 - Tiled down, wrong key
            return fail(503, f"cannot list runs in Tiled ({s.tiled_label}): "
                             f"{type(exc).__name__}: {exc}")

    @app.get("/api/run/{key}")
    def run(key: str, embedding: str = "pca") -> Any:
        s = view()
        try:
            key = s.resolve(key)
            rows = s.watcher.follow(key)
        except KeyError as exc:
            return fail(404, str(exc.args[0]) if exc.args else f"no run {key!r}")
        except Exception as exc:  # noqa: BLE001
            return fail(503, f"cannot read run {key!r} from Tiled: {type(exc).__name__}: {exc}")
        if s.bridge.auto_budget is not None:  # undecided suggestions from before the view
            s._auto_approve("suggestions", {"raw_uid": rows.metadata.get("raw_uid")})
        t0 = time.perf_counter()
        payload = rows.full(embedding=embedding)
        payload["server_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        if not rows.n_frames:
            payload["notice"] = (f"run {key} has no derived rows yet (status "
                                 f"{rows.metadata.get('status')}); they appear as they land")
        return ok(payload)

    @app.get("/api/run/{key}/frame/{seq_num}")
    def frame(key: str, seq_num: int) -> Any:
        s = view()
        try:
            rows = s.watcher.follow(s.resolve(key))
            preview = s.frames.render(rows.metadata, int(seq_num))
        except Exception as exc:  # noqa: BLE001 - raw run gone, no image, Tiled down
            return fail(404, f"no raw frame seq_num={seq_num} for {key}: "
                             f"{type(exc).__name__}: {exc}")
        return ok(preview)

    @app.get("/api/suggestions/{raw_uid}")
    def suggestions(raw_uid: str) -> Any:
        s = view()
        try:
            return ok({"raw_uid": raw_uid, "suggestions": s.bridge.suggestions(raw_uid)})
        except DecisionError as exc:
            return ok({"raw_uid": raw_uid, "suggestions": [], "notice": str(exc)})
        except Exception as exc:  # noqa: BLE001
            return fail(503, f"cannot read suggestions: {type(exc).__name__}: {exc}")

    @app.post("/api/decide")
    async def decide(request: Request) -> Any:
        s = view()
        body = await request.json()
        try:
            raw_uid, sid = str(body["raw_uid"]), str(body["suggestion_id"])
            decision = str(body["decision"])
        except (KeyError, TypeError):
            return fail(400, "need raw_uid, suggestion_id and decision (accept/reject)")
        if decision not in ("accept", "reject"):
            return fail(400, f"decision={decision!r} must be accept or reject")
        who = str(body.get("who") or "").strip() or "anonymous (view)"
        try:
            rec = await asyncio.to_thread(s.bridge.decide, raw_uid, sid,
                                          accept=decision == "accept", who=who,
                                          note=str(body.get("note") or ""))
        except DecisionError as exc:
            s.publish("suggestions", {"raw_uid": raw_uid})
            return fail(409, str(exc))
        s.publish("suggestions", {"raw_uid": raw_uid})
        return ok(rec)

    @app.get("/api/events")
    async def events(request: Request) -> Any:
        s = view()
        s.loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        s.clients.add(q)

        async def stream() -> Any:
            try:
                yield f"event: status\ndata: {json.dumps(_clean(s.status()))}\n\n"
                while True:
                    try:
                        event, data = await asyncio.wait_for(q.get(), timeout=10)
                    except TimeoutError:
                        if await request.is_disconnected():
                            break
                        yield ": keep-alive\n\n"
                        continue
                    yield f"event: {event}\ndata: {data}\n\n"
            finally:
                s.clients.discard(q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def mount_view(tiled_app: Any, state: ViewState | None = None, prefix: str = "/gisaxs") -> Any:
    """Mount the view inside a Tiled server's FastAPI app at ``prefix`` (page at prefix/)."""
    view_app = build_view_app(state)
    tiled_app.mount(prefix, view_app)
    return view_app
