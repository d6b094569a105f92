"""`gisaxs-bluesky replay`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..frames import add_geometry_arguments, geometry_from_args
from ..runtime import DEFAULT_ROOT
from .batch import connect, replay_runs
from .distributed import replay_distributed
from .options import ReplayError, ReplayOptions, RunSummary
from .selection import build_queries, select_runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gisaxs-bluesky replay``."""
    src = parser.add_argument_group("source")
    src.add_argument("--tiled-uri", help="Tiled server with the raw runs (TiledWriter or "
                     "databroker/Mongo); default env GISAXS_TILED_URI")
    src.add_argument("--api-key", default=None, help="Tiled API key (default env TILED_API_KEY)")
    src.add_argument("--target-uri", default=None,
                     help="write derived nodes to this Tiled instead (e.g. for a read-only "
                     "Mongo catalog)")
    sel = parser.add_argument_group("run selection")
    sel.add_argument("uids", nargs="*", help="run uids (added to query results)")
    sel.add_argument("--uid-file", help="file with one uid per line")
    sel.add_argument("--scan-ids", metavar="LO:HI", help="inclusive scan_id range, e.g. 10:20")
    sel.add_argument("--plan-name")
    sel.add_argument("--since", help="start time >= (unix seconds or ISO-8601)")
    sel.add_argument("--until", help="start time <= (unix seconds or ISO-8601)")
    sel.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                     help="start-document metadata, e.g. sample=S1 (JSON values accepted)")
    sel.add_argument("--limit", type=int)
    opt = parser.add_argument_group("replay")
    opt.add_argument("--model", default="pretrained",
                     help="'pretrained', a checkpoint .pt, or 'untrained[:seed]'")
    opt.add_argument("--device", default="cpu")
    opt.add_argument("--method", default="auto",
                     choices=["auto", "arrays", "documents", "callback"])
    opt.add_argument("--stream", default="primary")
    opt.add_argument("--image-key", default=None)
    opt.add_argument("--root", default=DEFAULT_ROOT)
    opt.add_argument("--chunk-size", type=int, default=16)
    opt.add_argument("--binner-state", default=None, help="initial binner state (JSON)")
    opt.add_argument("--max-frames", type=int, default=None)
    opt.add_argument("--backup-dir", default=None)
    add_geometry_arguments(parser)
    dist = parser.add_argument_group("distributed")
    dist.add_argument("--dask", action="store_true", help="fan runs out over Dask workers")
    dist.add_argument("--scheduler", default=None, help="tcp://host:port of a Dask scheduler "
                      "(implies --dask; default: a LocalCluster)")
    dist.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print summaries as JSON")
    parser.add_argument("--no-progress", action="store_true")


def parse_where(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ReplayError(f"--where {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def parse_range(text: str | None) -> tuple[int | None, int | None] | None:
    if not text:
        return None
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            return int(lo), int(lo)
        return (int(lo) if lo else None, int(hi) if hi else None)
    except ValueError as exc:
        raise ReplayError(f"--scan-ids {text!r}: expected LO:HI integers") from exc


def _print_summaries(summaries: Sequence[RunSummary], as_json: bool) -> None:
    if as_json:
        print(json.dumps([s.to_dict() for s in summaries], indent=2, default=str))
        return
    print(f"{'uid':10} {'scan':>5} {'status':12} {'written':>8} {'skipped':>8} {'failed':>7}")
    for s in summaries:
        print(f"{s.uid[:10]:10} {s.scan_id if s.scan_id is not None else '-':>5} "
              f"{s.status:12} {s.frames_written:8d} {s.frames_skipped:8d} {s.frames_failed:7d}")
        for e in s.errors[:5]:
            print(f"    ! {e}")


def run(args: argparse.Namespace) -> int:
    """``gisaxs-bluesky replay``: 0 when every run is complete/up-to-date, 1 if any is not,
    2 on a usage or connection error, 130 when interrupted."""
    uri = args.tiled_uri or os.environ.get("GISAXS_TILED_URI")
    api_key = args.api_key or os.environ.get("TILED_API_KEY")
    try:
        if not uri:
            raise ReplayError("no Tiled URI: pass --tiled-uri or set GISAXS_TILED_URI")
        geometry, fallback = geometry_from_args(args)
        options = ReplayOptions(
            model=args.model, device=args.device, root=args.root,
            backup_dir=args.backup_dir, method=args.method, stream=args.stream,
            image_key=args.image_key, chunk_size=args.chunk_size,
            binner_state=args.binner_state, max_frames=args.max_frames,
            geometry=geometry, geometry_fallback=fallback,
        )
        uids = list(args.uids)
        if args.uid_file:
            uids += [ln.strip() for ln in Path(args.uid_file).read_text().splitlines()
                     if ln.strip() and not ln.startswith("#")]
        queries = build_queries(
            scan_ids=parse_range(args.scan_ids), plan_name=args.plan_name,
            since=args.since, until=args.until, metadata=parse_where(args.where),
        )
        catalog = connect(uri, api_key)
        selected = select_runs(catalog, *queries, uids=uids, root=args.root, limit=args.limit)
        if not selected:
            print("no runs match the selection", file=sys.stderr)
            return 1
        print(f"replaying {len(selected)} run(s) with model {args.model!r}", file=sys.stderr)
        if args.dask or args.scheduler:
            summaries = replay_distributed(
                uri, selected, api_key=api_key, options=options, scheduler=args.scheduler,
                n_workers=args.workers, target_uri=args.target_uri,
                show_progress=not args.no_progress,
            )
        else:
            target = connect(args.target_uri, api_key) if args.target_uri else None
            summaries = replay_runs(catalog, selected, target=target, options=options,
                                    show_progress=not args.no_progress)
    except (ReplayError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    _print_summaries(summaries, args.json)
    if any(s.status == "interrupted" for s in summaries):
        return 130
    return 0 if summaries and all(s.ok for s in summaries) else 1
