"""QueueBridge: decisions on suggestions -> Queue Server plans (checked against the queue, its
history and the decisions made) and rows of the decisions table; decisions that cannot reach
Tiled are kept locally and re-sent."""

from __future__ import annotations

import getpass
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..runtime import DEFAULT_ROOT
from ..store import tiled_reachable
from .decisions import (
    DECISION_SCHEMA,
    DECISIONS_TABLE,
    DecisionError,
    read_decisions,
    read_suggestions_with_ids,
    suggestions_node,
)

__all__ = ["QueueBridge"]

logger = logging.getLogger(__name__)

MD_ID, MD_RAW_UID, MD_REASON = "gisaxs_suggestion_id", "gisaxs_raw_uid", "gisaxs_reason"


def _default_pending_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gisaxs_bluesky" / "decisions_pending.jsonl"


class QueueBridge:
    """Turns decisions on suggestions into Queue Server plans and Tiled rows.

    Parameters
    ----------
    client: Tiled client (root container) holding the suggestions.
    qserver: a ``bluesky_queueserver_api`` REManagerAPI, or the RE manager's 0MQ control
        address (``tcp://host:60615``); None when only rejections are recorded.
    plan: plan name added to the queue, called as ``plan(detectors, motors, positions, md=...)``
        (:func:`gisaxs_bluesky.qserver_plans.measure_suggestion` by default).
    detectors: device names passed as the plan's first argument.
    auto_budget: points per raw run accepted without a person (None: never).
    """

    def __init__(
        self,
        client: Any,
        qserver: Any = None,
        *,
        root: str = DEFAULT_ROOT,
        plan: str = "measure_suggestion",
        detectors: Sequence[str] = ("det",),
        auto_budget: int | None = None,
        pending_path: str | Path | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        if auto_budget is not None and int(auto_budget) < 0:
            raise ValueError(f"auto_budget={auto_budget} must be >= 0 or None")
        self.client = client
        self.root = root
        self.plan = plan
        self.detectors = [str(d) for d in detectors]
        self.auto_budget = None if auto_budget is None else int(auto_budget)
        self.pending_path = Path(pending_path) if pending_path else _default_pending_path()
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        if isinstance(qserver, str):
            from bluesky_queueserver_api.zmq import REManagerAPI

            self.qserver_address = qserver
            qserver = REManagerAPI(zmq_control_addr=qserver, timeout_recv=self.timeout_s,
                                   timeout_send=self.timeout_s)
        else:
            self.qserver_address = getattr(qserver, "_zmq_control_addr", None) or (
                "(none)" if qserver is None else repr(qserver))
        self.api = qserver

    # -- reading ------------------------------------------------------------------------
    def suggestions(self, raw_uid: str) -> list[dict[str, Any]]:
        """Suggestions of a raw run with their decision (None when undecided)."""
        self.resend_pending()
        df = read_suggestions_with_ids(self.client, raw_uid, root=self.root)
        decided = self._decided(raw_uid)
        out = []
        for _, r in df.iterrows():
            d = decided.get(r["suggestion_id"])
            out.append({
                "suggestion_id": r["suggestion_id"], "round": int(r["round"]),
                "reason": str(r["reason"]), "priority": round(float(r["priority"]), 3),
                "position": {k: round(v, 4) for k, v in r["position"].items()},
                "measured_seq_num": int(r["seq_num"]),
                "decision": None if d is None else {
                    k: d[k] for k in ("decision", "who", "time", "item_uid", "note")},
            })
        return out

    def _decided(self, raw_uid: str) -> dict[str, dict[str, Any]]:
        """suggestion_id -> first decision, from Tiled and the local pending file."""
        out: dict[str, dict[str, Any]] = {}
        for rec in [*read_decisions(self.client, raw_uid, root=self.root)
                    .to_dict("records"), *self._pending(raw_uid)]:
            out.setdefault(str(rec["suggestion_id"]), rec)
        return out

    def _pending(self, raw_uid: str | None = None) -> list[dict[str, Any]]:
        if not self.pending_path.exists():
            return []
        recs = [json.loads(line) for line in self.pending_path.read_text().splitlines()
                if line.strip()]
        return [r for r in recs if raw_uid is None or r["raw_uid"] == raw_uid]

    def tiled_reachable(self) -> bool:
        """One quick request (the Tiled client itself retries a dead server for long)."""
        return tiled_reachable(self.client)

    # -- queue ---------------------------------------------------------------------------
    def _require_api(self) -> Any:
        if self.api is None:
            raise DecisionError("no Queue Server configured: pass --qserver tcp://HOST:60615 "
                                "(the RE manager's 0MQ control address)")
        return self.api

    def _queued_item(self, sid: str) -> dict[str, Any] | None:
        """The queue/running/history item carrying suggestion ``sid``, if any."""
        api = self._require_api()
        try:
            q = api.queue_get()
            h = api.history_get()
        except Exception as exc:  # noqa: BLE001 - timeouts, refused connections
            raise DecisionError(f"Queue Server at {self.qserver_address} did not answer "
                                f"({type(exc).__name__}: {exc}); nothing was queued") from exc
        items = [*q.get("items", []), *([q["running_item"]] if q.get("running_item") else []),
                 *h.get("items", [])]
        for item in items:
            md = (item.get("kwargs") or {}).get("md") or {}
            if md.get(MD_ID) == sid:
                return item
        return None

    def plan_item(self, raw_uid: str, suggestion: Mapping[str, Any]) -> Any:
        """The BPlan for a suggestion: ``plan(detectors, motors, positions, md=tags)``."""
        from bluesky_queueserver_api import BPlan

        motors = list(suggestion["position"])
        args = [list(self.detectors), motors, [float(suggestion["position"][m]) for m in motors]]
        md = {MD_ID: suggestion["suggestion_id"], MD_RAW_UID: raw_uid,
              MD_REASON: suggestion["reason"], "gisaxs_priority": suggestion["priority"]}
        return BPlan(self.plan, *args, md=md)

    # -- deciding ------------------------------------------------------------------------
    def accept(self, raw_uid: str, sid: str, *, who: str | None = None,
               note: str = "") -> dict[str, Any]:
        """Queue the suggestion's plan and record the decision; DecisionError if impossible."""
        return self.decide(raw_uid, sid, accept=True, who=who, note=note)

    def reject(self, raw_uid: str, sid: str, *, who: str | None = None,
               note: str = "") -> dict[str, Any]:
        """Record a rejection (nothing is queued)."""
        return self.decide(raw_uid, sid, accept=False, who=who, note=note)

    def decide(self, raw_uid: str, sid: str, *, accept: bool, who: str | None = None,
               note: str = "") -> dict[str, Any]:
        """One decision on suggestion ``sid`` of ``raw_uid``; returns the stored record."""
        who = who or _default_user()
        with self._lock:
            if not self.tiled_reachable():
                raise DecisionError(f"Tiled at {self.client.context.api_uri} is unreachable; "
                                    "nothing was queued")
            self.resend_pending()
            try:
                table = {s["suggestion_id"]: s for s in self.suggestions(raw_uid)}
            except DecisionError:
                raise
            except Exception as exc:  # noqa: BLE001 - Tiled down, wrong key
                raise DecisionError(f"cannot read the suggestions of {raw_uid!r} from Tiled "
                                    f"({type(exc).__name__}: {exc}); nothing was queued") from exc
            if sid not in table:
                raise DecisionError(f"no suggestion {sid!r} for raw run {raw_uid!r} "
                                    f"(known: {', '.join(list(table)[:8]) or 'none'})")
            sug = table[sid]
            if sug["decision"] is not None:
                d = sug["decision"]
                raise DecisionError(
                    f"suggestion {sid} was already {d['decision']} by {d['who']} at "
                    f"{_when(d['time'])}" + (f" (queue item {d['item_uid']})"
                                             if d.get("item_uid") else "")
                    + "; nothing was queued")
            record = {"raw_uid": raw_uid, "suggestion_id": sid, "who": str(who),
                      "time": time.time(), "reason": sug["reason"],
                      "position": json.dumps(sug["position"]), "item_uid": "", "note": note}
            if accept:
                existing = self._queued_item(sid)
                if existing is not None:  # queued before, its decision never reached Tiled
                    record.update(decision="accepted", item_uid=existing.get("item_uid", ""),
                                  who=existing.get("user", who),
                                  note="recovered from the Queue Server")
                    self._store(record)
                    raise DecisionError(
                        f"suggestion {sid} is already in the Queue Server as item "
                        f"{existing.get('item_uid')}; its decision is now recorded; "
                        "nothing was queued twice")
                item = self.plan_item(raw_uid, sug)
                try:
                    resp = self.api.item_add(item, user=str(who))
                except Exception as exc:  # noqa: BLE001 - refused plan, timeouts
                    raise DecisionError(f"Queue Server at {self.qserver_address} refused or "
                                        f"did not answer ({type(exc).__name__}: {exc}); "
                                        "nothing was queued") from exc
                record.update(decision="accepted",
                              item_uid=str((resp.get("item") or {}).get("item_uid", "")))
            else:
                record["decision"] = "rejected"
            record["stored"] = self._store(record)
            return record

    def _store(self, record: Mapping[str, Any]) -> str:
        """Append a decision to Tiled; kept locally (and re-sent later) if Tiled fails."""
        try:
            if not self.tiled_reachable():
                raise ConnectionError("Tiled unreachable")
            self._append(record)
            return "tiled"
        except Exception as exc:  # noqa: BLE001 - keep it, never lose a decision
            self.pending_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.pending_path, "a") as f:
                f.write(json.dumps(dict(record)) + "\n")
            logger.warning("decision on %s kept in %s (Tiled: %s)", record["suggestion_id"],
                           self.pending_path, exc)
            return f"local file {self.pending_path} (Tiled: {type(exc).__name__}: {exc})"

    def _append(self, record: Mapping[str, Any]) -> None:
        node = suggestions_node(self.client, str(record["raw_uid"]), self.root)
        table = (node[DECISIONS_TABLE] if DECISIONS_TABLE in node
                 else node.create_appendable_table(DECISION_SCHEMA, key=DECISIONS_TABLE))
        cols = {name: [record.get(name, "")] for name in DECISION_SCHEMA.names}
        cols["time"] = [float(record["time"])]
        table.append_partition(0, pa.Table.from_pydict(cols, schema=DECISION_SCHEMA))
        # a metadata change is what Tiled streams to the parent's subscribers (open views)
        try:
            node.update_metadata(metadata={"decisions_updated": float(record["time"])})
        except Exception as exc:  # noqa: BLE001 - the decision itself is stored
            logger.warning("decision on %s stored; metadata bump failed: %s",
                           record["suggestion_id"], exc)

    def resend_pending(self) -> int:
        """Send decisions kept locally to Tiled; returns how many went."""
        recs = self._pending()
        if not recs or not self.tiled_reachable():
            return 0
        left, sent = [], 0
        for rec in recs:
            try:
                node = suggestions_node(self.client, rec["raw_uid"], self.root)
                done = (DECISIONS_TABLE in node and rec["suggestion_id"] in set(
                    node[DECISIONS_TABLE].read(columns=["suggestion_id"])["suggestion_id"]))
                if not done:
                    self._append(rec)
                sent += 1
            except Exception:  # noqa: BLE001 - still unreachable: keep it
                left.append(rec)
        tmp = self.pending_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in left))
        os.replace(tmp, self.pending_path)
        return sent

    def auto_approve(self, raw_uid: str) -> list[dict[str, Any]]:
        """Accept undecided suggestions (highest priority first) within the point budget."""
        if self.auto_budget is None:
            return []
        sugs = self.suggestions(raw_uid)
        used = sum(1 for s in sugs if s["decision"] and s["decision"]["decision"] == "accepted"
                   and str(s["decision"]["who"]).startswith("auto-approval"))
        todo = sorted((s for s in sugs if s["decision"] is None and s["measured_seq_num"] < 0),
                      key=lambda s: -s["priority"])[: max(self.auto_budget - used, 0)]
        out = []
        for s in todo:
            try:
                out.append(self.accept(raw_uid, s["suggestion_id"],
                                       who=f"auto-approval (budget {self.auto_budget})"))
            except DecisionError as exc:
                logger.warning("auto-approval of %s: %s", s["suggestion_id"], exc)
        return out


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"


def _when(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
    except (TypeError, ValueError):
        return str(t)


