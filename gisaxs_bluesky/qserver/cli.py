"""`gisaxs-bluesky suggestions {list,accept,reject,auto}`: decide on suggestions from a shell."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..replay import connect
from ..runtime import DEFAULT_ROOT
from ..tiled_client import local_tiled_client
from .bridge import QueueBridge
from .decisions import DecisionError

__all__ = ["add_arguments", "connect_client", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gisaxs-bluesky suggestions {list,accept,reject,auto} RAW_UID [ID ...]``."""
    parser.add_argument("action", choices=["list", "accept", "reject", "auto"])
    parser.add_argument("raw_uid", help="uid of the raw run the suggestions belong to")
    parser.add_argument("ids", nargs="*", help="suggestion ids (accept/reject)")
    parser.add_argument("--tiled-uri", default=None,
                        help="Tiled server (default env GISAXS_TILED_URI)")
    parser.add_argument("--api-key", default=None, help="Tiled API key (default env "
                        "TILED_API_KEY)")
    parser.add_argument("--catalog", type=Path, default=None,
                        help="a local catalog directory (e.g. demo_output/catalog) instead")
    parser.add_argument("--qserver", default=os.environ.get("QSERVER_ZMQ_CONTROL_ADDRESS"),
                        help="RE manager 0MQ control address, e.g. tcp://localhost:60615")
    parser.add_argument("--plan", default="measure_suggestion")
    parser.add_argument("--detectors", default="det", help="comma-separated device names")
    parser.add_argument("--who", default=None, help="who decides (default: login name)")
    parser.add_argument("--note", default="")
    parser.add_argument("--budget", type=int, default=None,
                        help="auto: points accepted without a person for this run")
    parser.add_argument("--root", default=DEFAULT_ROOT)


def connect_client(args: argparse.Namespace) -> Any:
    """Tiled client from --catalog or --tiled-uri/--api-key (ReplayError/ValueError if bad)."""
    if getattr(args, "catalog", None):
        if not (Path(args.catalog) / "catalog.db").is_file():
            raise ValueError(f"--catalog {args.catalog}: no catalog.db there")
        return local_tiled_client(Path(args.catalog))

    uri = args.tiled_uri or os.environ.get("GISAXS_TILED_URI")
    if not uri:
        raise ValueError("no Tiled URI: pass --tiled-uri, --catalog or set GISAXS_TILED_URI")
    return connect(uri, args.api_key or os.environ.get("TILED_API_KEY"))


def run(args: argparse.Namespace) -> int:
    """``gisaxs-bluesky suggestions``: 0 on success, 1 when a decision failed, 2 on setup."""
    try:
        client = connect_client(args)
        bridge = QueueBridge(client, args.qserver, root=args.root, plan=args.plan,
                             detectors=args.detectors.split(","), auto_budget=args.budget)
    except Exception as exc:  # noqa: BLE001 - unreachable Tiled, bad key, bad address
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    try:
        if args.action == "list":
            for s in bridge.suggestions(args.raw_uid):
                d = s["decision"]
                state = "undecided" if d is None else f"{d['decision']} by {d['who']}"
                pos = ", ".join(f"{k}={v:g}" for k, v in s["position"].items())
                print(f"{s['suggestion_id']}  round {s['round']}  {pos:<20}  "
                      f"{s['reason']:<24} priority {s['priority']:.2f}  {state}")
            return 0
        if args.action == "auto":
            if args.budget is None:
                print("error: auto needs --budget N", file=sys.stderr)
                return 2
            for rec in bridge.auto_approve(args.raw_uid):
                print(f"accepted {rec['suggestion_id']} -> queue item {rec['item_uid']}")
            return 0
        if not args.ids:
            print(f"error: {args.action} needs suggestion ids (see `list`)", file=sys.stderr)
            return 2
        for sid in args.ids:
            try:
                rec = bridge.decide(args.raw_uid, sid, accept=args.action == "accept",
                                    who=args.who, note=args.note)
                item = f" -> queue item {rec['item_uid']}" if rec["item_uid"] else ""
                print(f"{rec['decision']} {sid}{item}; decision stored in {rec['stored']}")
            except DecisionError as exc:
                failed += 1
                print(f"error: {exc}", file=sys.stderr)
    except DecisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if failed else 0
