"""`gisaxs-bluesky demo`: a simulated GISAXS scan binned live into Tiled, then a report.

Without ``--tiled-uri`` a local Tiled catalog is made in ``WORKDIR/catalog`` (SQLite catalog,
writable file + SQLite table storage) and served in-process (``Context.from_app``). A real
RunEngine scans the simulated Pilatus 1M over ``sample_x`` (0-40 mm: regions A-D and a
defect at 24.5-26 mm) with ``TiledWriter(batch_size=1)`` and ``DAEBinningCallback``
subscribed, prints bins and outliers, the query that finds them, and writes
``WORKDIR/report.html`` with PNGs. The start document carries the simulated instrument's
geometry (``gisaxs_geometry``), as a beamline's would.
"""

from __future__ import annotations

import argparse
import html
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import query
from .adaptive import ScanResults, SuggestConfig, SuggestionWriter, plot_suggestions, suggest_points
from .callbacks import DAEBinningCallback, serialized
from .models import CheckpointError, Encoder, GisaxsDAE, load_pretrained, make_binner
from .sim.detector import PILATUS_SHAPE, make_gisaxs_detector, make_motors
from .sim.scene import default_scene
from .tiled_client import local_tiled_client
from .view import BackgroundServer, ViewState, build_view_app, serve_catalog
from .view.server import _wait_for_ctrl_c

__all__ = ["add_arguments", "run", "make_report"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the demo sub-command."""
    parser.add_argument("--workdir", type=Path, default=Path("gisaxs-demo"),
                        help="where the catalog, detector files and report go")
    parser.add_argument("--tiled-uri", default=None,
                        help="existing Tiled server (default: a local in-process catalog)")
    parser.add_argument("--api-key", default=None, help="API key for --tiled-uri")
    parser.add_argument("--points", type=int, default=60, help="scan points over 0-40 mm")
    parser.add_argument("--dose", type=float, default=10.0, help="counts per pixel scale")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--device", default="auto", help="torch device (auto, cpu, cuda)")
    parser.add_argument("--view", action="store_true",
                        help="serve the live view during and after the scan (until Ctrl-C)")
    parser.add_argument("--view-port", type=int, default=8765, help="port of the live view")


def _encoder(device: str) -> tuple[Any, bool]:
    try:
        return load_pretrained(device), True
    except CheckpointError as exc:
        import torch

        logger.warning("%s\n*** using an UNTRAINED model: bins are not meaningful ***", exc)
        torch.manual_seed(0)
        return Encoder(GisaxsDAE(), {"name": "untrained", "version": "0"}, device), False


def run(args: argparse.Namespace) -> int:
    """Run the scan, wait for the binning, print tables, write the report; 0 on success."""
    import bluesky.plans as bp
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.points < 2:
        raise SystemExit(f"--points={args.points}: need at least 2")
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    view = None
    if args.tiled_uri:
        from tiled.client import from_uri

        client = from_uri(args.tiled_uri, api_key=args.api_key)
        if args.view:
            view = _start_view(client, args)
    elif args.view:
        # the catalog served over HTTP (streaming cache in memory), the view mounted in it
        from tiled.catalog import from_uri as catalog_from_uri

        (workdir / "catalog").mkdir(parents=True, exist_ok=True)
        catalog_from_uri(f"sqlite:///{workdir / 'catalog' / 'catalog.db'}",
                         init_if_not_exists=True)
        view = serve_catalog(workdir / "catalog", port=args.view_port, cache_uri="memory")
        client = view.client()
        print(f"live view: {view.view_url}  (open it now to watch the scan)", flush=True)
    else:
        client = local_tiled_client(workdir / "catalog")
    encoder, trained = _encoder(args.device)
    if view is not None:
        view.state.frames.model = encoder  # denoises the view's representative frames
    scene = default_scene(seed=args.seed, dose_counts=args.dose)
    (sample_x,) = make_motors(scene.motor)
    detector = make_gisaxs_detector(workdir / "catalog" / "detector", scene, [sample_x],
                                    shape=PILATUS_SHAPE, dtype=np.int32)
    lo, hi = scene.extent_mm
    step = (hi - lo) / args.points
    positions = lo + step / 2 + step * np.arange(args.points)

    lock = threading.Lock()  # SQLite table storage: one writer at a time
    callback = DAEBinningCallback(
        client,
        encoder=encoder,
        binner=make_binner(encoder),  # fresh bins for a reproducible demo
        backup_dir=workdir / "backup",
        spill_dir=workdir / "spill",
        write_lock=lock,
    )
    RE = RunEngine({})
    RE.subscribe(serialized(TiledWriter(client, batch_size=1), lock))
    RE.subscribe(callback)
    print(f"model: {encoder.info()}  device: {encoder.device}  trained: {trained}")
    print(f"scanning {args.points} points of {scene.motor} over {lo:g}-{hi:g} mm ...")
    t_scan = time.perf_counter()
    # the simulated instrument's geometry travels with the run (what a beamline would put in
    # its start documents; a q-grid model reads it, the pixel model records it, the view
    # draws the bins' frames on q axes with it)
    md = {"gisaxs_geometry": scene.geometry.instrument().to_dict()}
    (uid,) = RE(bp.list_scan([detector], sample_x, positions.tolist(), md=md))
    scan_s = time.perf_counter() - t_scan
    if not callback.wait(300):
        print("binning did not finish within 300 s")
        return 1
    wait_s = time.perf_counter() - t_scan - scan_s

    derived = query.derived_for_run(client, uid)
    model_id = f"{encoder.name}-{encoder.version}"
    ds = derived[model_id]
    bins, outliers = _tables(ds, scene)
    print(f"\nscan {uid} done in {scan_s:.1f} s (+{wait_s:.1f} s to drain the binning queue); "
          f"derived node status: {ds.attrs['status']}, errors: {len(ds.attrs['errors'])}")
    print("\nbins:")
    print(_format(bins, ["bin_id", "count", "x_min_mm", "x_max_mm", "structure", "regions"]))
    print("\noutliers:")
    print(_format(outliers, ["seq_num", "sample_x", "outlier_score", "region"])
          if outliers else "  (none)")
    code = _query_code(uid, model_id, bins[0]["bin_id"] if bins else 0)
    print("\nfind them again with:\n" + code)
    suggestions = _suggest(client, uid, ds, scene, workdir, lock)
    report = make_report(workdir, client, uid, ds, scene, bins, outliers, code, trained,
                         identity_dim=encoder.identity_dim, suggestions=suggestions)
    print(f"\nreport: {report}  (total {time.perf_counter() - t0:.1f} s)")
    if view is None:
        where = (f"--tiled-uri {args.tiled_uri}" + (" --api-key KEY" if args.api_key else "")
                 if args.tiled_uri else f"--catalog {workdir / 'catalog'}")
        print(f"\nlive view of this catalog: gisaxs-bluesky view {where}")
        return 0

    url = getattr(view, "view_url", None) or view.url
    print(f"\nlive view still serving at {url}  (Ctrl-C stops)", flush=True)
    _wait_for_ctrl_c(threading.Event())
    view.stop()
    return 0


def _start_view(client: Any, args: argparse.Namespace) -> Any:
    """The view beside a remote Tiled (``--tiled-uri``), for ``--view``."""
    state = ViewState(client, tiled_label=args.tiled_uri.split("?")[0])
    server = BackgroundServer(build_view_app(state), "127.0.0.1", args.view_port).start()
    original_stop = server.stop

    def stop() -> None:
        state.close()
        original_stop()

    server.stop = stop
    server.state = state
    print(f"live view: {server.url}/  (open it now to watch the scan)", flush=True)
    return server


def _suggest(client: Any, uid: str, ds: Any, scene: Any, workdir: Path,
             lock: threading.Lock) -> list[dict]:
    """Where to measure next (from outliers and bin changes): printed, stored in Tiled, plotted."""
    results = ScanResults.from_dataset(ds, motors=[scene.motor])
    suggestions = suggest_points(
        results, SuggestConfig(limits={scene.motor: scene.extent_mm}), max_points=12
    )
    with lock:
        writer = SuggestionWriter(client, uid, [scene.motor])
        writer.append(0, suggestions)
        writer.finish("complete")
    regions = [(r.x_min_mm, r.x_max_mm, r.name) for r in scene.regions if r.is_defect]
    plot_suggestions(results, suggestions, motor=scene.motor, path=workdir / "suggestions.png",
                     regions=regions, title="suggested next points")
    rows = [{"sample_x": round(float(sg.position[scene.motor]), 3), "reason": sg.reason,
             "priority": round(float(sg.priority), 2),
             "from_seq_nums": ",".join(map(str, sg.source_seq_nums))} for sg in suggestions]
    print(f"\nsuggested next points ({len(rows)}, stored in Tiled beside the derived data):")
    print(_format(rows, ["sample_x", "reason", "priority", "from_seq_nums"]) if rows else "  (none)")
    return rows


# ---------------------------------------------------------------------------- tables
def _tables(ds: Any, scene: Any) -> tuple[list[dict], list[dict]]:
    x = ds["sample_x"].values
    bin_id = ds["bin_id"].values
    structure = ds["structure"].values
    regions = np.array([scene.region_at(min(max(v, 0.0), 39.999)).name for v in x])
    bins = []
    for b in sorted(set(bin_id.tolist())):
        sel = bin_id == b
        s_vals, s_counts = np.unique(structure[sel].astype(str), return_counts=True)
        r_vals, r_counts = np.unique(regions[sel], return_counts=True)
        bins.append({
            "bin_id": int(b),
            "count": int(sel.sum()),
            "x_min_mm": float(x[sel].min()),
            "x_max_mm": float(x[sel].max()),
            "structure": str(s_vals[s_counts.argmax()]),
            "regions": ",".join(f"{r}:{c}" for r, c in zip(r_vals, r_counts, strict=True)),
        })
    outliers = [
        {"seq_num": int(s), "sample_x": float(xx), "outlier_score": float(sc), "region": r}
        for s, xx, sc, r, o in zip(ds["seq_num"].values, x, ds["outlier_score"].values,
                                   regions, ds["is_outlier"].values, strict=True)
        if o
    ]
    return bins, outliers


def _format(rows: list[dict], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    table = [cols] + [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True))
                     for row in table)


def _query_code(uid: str, model_id: str, bin_id: int) -> str:
    return (
        "    from gisaxs_bluesky import query\n"
        "    client = ...  # the same Tiled client\n"
        f"    query.outlier_frames(client, model={model_id!r})\n"
        f"    query.frames_in_bin(client, {bin_id}, model={model_id!r})\n"
        f"    query.runs_with_bin(client, {bin_id}, model={model_id!r})\n"
        f"    query.derived_for_run(client, {uid!r})[{model_id!r}]"
    )


# ---------------------------------------------------------------------------- report
def _raw_frames(client: Any, uid: str, seq_nums: list[int]) -> np.ndarray:
    arr = client[uid]["primary"]["pilatus"]
    return np.stack([np.asarray(arr[s - 1]) for s in seq_nums]).astype(np.float64)


def _show(ax: Any, frame: np.ndarray, title: str) -> None:
    img = np.log10(np.clip(frame, 0, None) + 1)
    ax.imshow(img, origin="upper", cmap="magma")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def make_report(
    workdir: Path, client: Any, uid: str, ds: Any, scene: Any, bins: list[dict],
    outliers: list[dict], code: str, trained: bool, *, identity_dim: int = 16,
    suggestions: list[dict] | None = None,
) -> Path:
    """Write latent_map.png, bin_gallery.png, outliers.png, bins_vs_x.png and report.html."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latent = ds["latent"].values[:, :identity_dim]
    bin_id = ds["bin_id"].values
    x = ds["sample_x"].values
    seq = ds["seq_num"].values
    out = ds["is_outlier"].values
    pngs: list[str] = []

    def save(fig: Any, name: str, dpi: int = 100) -> None:
        fig.tight_layout()
        fig.savefig(workdir / name, dpi=dpi)
        plt.close(fig)
        pngs.append(name)

    ok = np.isfinite(latent).all(axis=1)
    z = latent[ok] - latent[ok].mean(axis=0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    pc = z @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sc = ax.scatter(pc[:, 0], pc[:, 1], c=bin_id[ok], cmap="tab10", s=30)
    ax.scatter(pc[out[ok], 0], pc[out[ok], 1], facecolors="none", edgecolors="red", s=90,
               label="outlier")
    fig.colorbar(sc, label="bin id")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("identity latent (PCA), coloured by bin")
    ax.legend(loc="best", fontsize=8)
    save(fig, "latent_map.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.scatter(x, bin_id, c=bin_id, cmap="tab10", s=25)
    ax.scatter(x[out], bin_id[out], facecolors="none", edgecolors="red", s=80, label="outlier")
    for region in scene.regions:
        ax.axvspan(region.x_min_mm, region.x_max_mm, alpha=0.25 if region.is_defect else 0.06,
                   color="red" if region.is_defect else "grey")
        ax.text((region.x_min_mm + region.x_max_mm) / 2, ax.get_ylim()[1], region.name,
                ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("sample_x (mm)")
    ax.set_ylabel("bin id")
    ax.legend(loc="best", fontsize=8)
    save(fig, "bins_vs_x.png")

    shown = [b for b in bins if b["bin_id"] >= 0][:12]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(2.2 * len(shown), 2.6), squeeze=False)
        for ax, b in zip(axes[0], shown, strict=True):
            members = seq[bin_id == b["bin_id"]].tolist()[:8]
            mean = _raw_frames(client, uid, members).mean(axis=0)
            _show(ax, mean, f"bin {b['bin_id']} (n={b['count']})\n{b['structure']}")
        save(fig, "bin_gallery.png", dpi=80)
    if outliers:
        shown_o = outliers[:6]
        fig, axes = plt.subplots(1, len(shown_o), figsize=(2.2 * len(shown_o), 2.6),
                                 squeeze=False)
        frames = _raw_frames(client, uid, [o["seq_num"] for o in shown_o])
        for ax, o, f in zip(axes[0], shown_o, frames, strict=True):
            _show(ax, f, f"seq {o['seq_num']} x={o['sample_x']:.1f}\nscore {o['outlier_score']:.2f}")
        save(fig, "outliers.png", dpi=80)
    if (workdir / "suggestions.png").is_file():
        pngs.append("suggestions.png")

    def table(rows: list[dict]) -> str:
        if not rows:
            return "<p>(none)</p>"
        head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(f'{v:.2f}' if isinstance(v, float) else str(v))}"
                             "</td>" for v in r.values()) + "</tr>" for r in rows)
        return f"<table border=1 cellpadding=3><tr>{head}</tr>{body}</table>"

    warn = "" if trained else "<p><b>Untrained model: bins are not meaningful.</b></p>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>GISAXS demo</title></head>
<body><h1>GISAXS live DAE binning demo</h1>{warn}
<p>raw run <code>{html.escape(uid)}</code>, model <code>{html.escape(str(ds.attrs['model']))}</code>,
status <b>{html.escape(str(ds.attrs['status']))}</b>, {len(seq)} frames,
{int(out.sum())} outliers, errors: {html.escape(str(ds.attrs.get('errors')))}</p>
<h2>Bins</h2>{table(bins)}<h2>Outliers</h2>{table(outliers)}
<h2>Suggested next points</h2>{table(suggestions or [])}
<h2>Query</h2><pre>{html.escape(code)}</pre>
{''.join(f'<h2>{p[:-4]}</h2><img src="{p}">' for p in pngs)}
</body></html>"""
    path = workdir / "report.html"
    path.write_text(page)
    return path
