"""Suggestions -> Queue Server: a real RE manager (subprocess, simulated motor and detector) and
real Tiled servers; faults provoked for real (servers down, wrong key, decided twice)."""

from __future__ import annotations

import secrets
import time

import pytest
from conftest import free_port
from view_helpers import write_suggestions

from gisaxs_bluesky import cli
from gisaxs_bluesky.qserver import (
    DecisionError,
    QueueBridge,
    read_decisions,
    read_suggestions_with_ids,
    suggestion_id,
)


def _raw_uid() -> str:
    return f"raw-{secrets.token_hex(4)}"


def test_suggestion_ids_are_stable_and_distinct(tiled_client):
    raw_uid = _raw_uid()
    write_suggestions(tiled_client, raw_uid)
    a = read_suggestions_with_ids(tiled_client, raw_uid)
    b = read_suggestions_with_ids(tiled_client, raw_uid)
    assert a["suggestion_id"].tolist() == b["suggestion_id"].tolist()
    assert a["suggestion_id"].nunique() == 3
    assert a["suggestion_id"][0] == suggestion_id(0, "refine_outlier", {"sample_x": 3.1})


def test_accept_queues_once_and_the_plan_runs(tiled_server, qserver, tmp_path):
    client = tiled_server.client()
    raw_uid = _raw_uid()
    write_suggestions(client, raw_uid)
    bridge = QueueBridge(client, qserver.address, pending_path=tmp_path / "pending.jsonl")
    first, second, third = (s["suggestion_id"] for s in bridge.suggestions(raw_uid))
    rec = bridge.accept(raw_uid, first, who="alice")
    assert rec["decision"] == "accepted" and rec["stored"] == "tiled" and rec["item_uid"]
    with pytest.raises(DecisionError, match="already accepted by alice"):
        bridge.accept(raw_uid, first, who="bob")
    rej = bridge.reject(raw_uid, second, who="bob", note="beam time")
    assert rej["decision"] == "rejected" and rej["item_uid"] == ""
    with pytest.raises(DecisionError, match="already rejected by bob"):
        bridge.accept(raw_uid, second, who="alice")
    with pytest.raises(DecisionError, match="no suggestion 'nope'"):
        bridge.accept(raw_uid, "nope")
    items = qserver.queue_items()
    assert [i["kwargs"]["md"]["gisaxs_suggestion_id"] for i in items] == [first]
    dec = read_decisions(client, raw_uid)
    assert dec[["suggestion_id", "decision", "who", "note"]].values.tolist() == [
        [first, "accepted", "alice", ""], [second, "rejected", "bob", "beam time"]]

    # a decision lost on the way to Tiled (queued, then the process died): the queue tells
    fresh = QueueBridge(client, qserver.address, pending_path=tmp_path / "other.jsonl")
    item = fresh.plan_item(raw_uid, {**next(s for s in fresh.suggestions(raw_uid)
                                             if s["suggestion_id"] == third)})
    qserver.api.item_add(item, user="lost decision")
    with pytest.raises(DecisionError, match="already in the Queue Server"):
        fresh.accept(raw_uid, third, who="carol")
    assert len(qserver.queue_items()) == 2  # not queued twice
    assert read_decisions(client, raw_uid)["suggestion_id"].tolist()[-1] == third

    # the queued plan runs on the simulated devices, tagged with the suggestion
    qserver.api.queue_clear()
    qserver.api.item_add(bridge.plan_item(raw_uid, bridge.suggestions(raw_uid)[0]))
    qserver.api.environment_open()
    qserver.api.wait_for_idle(timeout=120)
    qserver.api.queue_start()
    qserver.api.wait_for_idle(timeout=120)
    done = qserver.api.history_get()["items"][-1]
    assert done["result"]["exit_status"] == "completed", done["result"]
    assert done["kwargs"]["md"]["gisaxs_suggestion_id"] == first
    assert len(done["result"]["run_uids"]) == 1
    qserver.api.environment_close()
    qserver.api.wait_for_idle(timeout=60)
    qserver.api.history_clear()


def test_queue_server_unreachable_queues_and_records_nothing(tiled_client, tmp_path):
    raw_uid = _raw_uid()
    write_suggestions(tiled_client, raw_uid)
    bridge = QueueBridge(tiled_client, f"tcp://127.0.0.1:{free_port()}", timeout_s=0.5,
                         pending_path=tmp_path / "pending.jsonl")
    sid = bridge.suggestions(raw_uid)[0]["suggestion_id"]
    t0 = time.monotonic()
    with pytest.raises(DecisionError, match="did not answer.*nothing was queued"):
        bridge.accept(raw_uid, sid)
    assert time.monotonic() - t0 < 30
    assert read_decisions(tiled_client, raw_uid).empty
    # without any Queue Server, accepting says how to configure one; rejecting works
    none = QueueBridge(tiled_client, None, pending_path=tmp_path / "pending.jsonl")
    with pytest.raises(DecisionError, match="no Queue Server configured"):
        none.accept(raw_uid, sid)
    assert none.reject(raw_uid, sid, who="dave")["decision"] == "rejected"


def test_decision_kept_locally_while_tiled_is_down(tiled_server, tmp_path):
    client = tiled_server.client()
    raw_uid = _raw_uid()
    write_suggestions(client, raw_uid)
    pending = tmp_path / "pending.jsonl"
    bridge = QueueBridge(client, None, pending_path=pending)
    sid = bridge.suggestions(raw_uid)[0]["suggestion_id"]
    record = {"raw_uid": raw_uid, "suggestion_id": sid, "decision": "accepted", "who": "eve",
              "time": time.time(), "reason": "refine_outlier", "position": "{}",
              "item_uid": "item-1", "note": ""}
    tiled_server.stop()
    where = bridge._store(record)  # Tiled went down between queueing and recording
    assert where.startswith("local file") and pending.read_text().count(sid) == 1
    tiled_server.start()
    client = tiled_server.client()
    bridge = QueueBridge(client, None, pending_path=pending)
    # the kept decision counts before it is re-sent, and is re-sent exactly once
    with pytest.raises(DecisionError, match="already accepted by eve"):
        bridge.reject(raw_uid, sid)
    assert bridge.resend_pending() == 0 and pending.read_text() == ""
    assert read_decisions(client, raw_uid)["suggestion_id"].tolist() == [sid]


def test_auto_approval_stays_within_the_budget(tiled_server, qserver, tmp_path):
    client = tiled_server.client()
    raw_uid = _raw_uid()
    write_suggestions(client, raw_uid)
    off = QueueBridge(client, qserver.address, pending_path=tmp_path / "p.jsonl")
    assert off.auto_approve(raw_uid) == []  # off by default: nothing queued
    auto = QueueBridge(client, qserver.address, auto_budget=2, pending_path=tmp_path / "p.jsonl")
    done = auto.auto_approve(raw_uid)
    assert len(done) == 2 and all(d["who"] == "auto-approval (budget 2)" for d in done)
    assert auto.auto_approve(raw_uid) == []  # budget used up
    assert len(qserver.queue_items()) == 2
    qserver.api.queue_clear()


def test_cli_list_accept_reject_and_errors(tiled_server, qserver, tmp_path, capsys,
                                           monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    client = tiled_server.client()
    raw_uid = _raw_uid()
    write_suggestions(client, raw_uid)
    base = ["suggestions", "--tiled-uri", f"{tiled_server.base_url}/api/v1", "--api-key",
            tiled_server.api_key, "--qserver", qserver.address]
    assert cli.main([*base[:1], "list", raw_uid, *base[1:]]) == 0
    ids = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(ids) == 3
    assert cli.main(["suggestions", "accept", raw_uid, ids[0], *base[1:], "--who", "cli"]) == 0
    assert "queue item" in capsys.readouterr().out
    assert cli.main(["suggestions", "accept", raw_uid, ids[0], *base[1:]]) == 1
    assert "already accepted by cli" in capsys.readouterr().err
    assert cli.main(["suggestions", "reject", raw_uid, ids[1], *base[1:]]) == 0
    assert len(qserver.queue_items()) == 1
    qserver.api.queue_clear()
    # wrong API key, unreachable Tiled: exit 2 with the reason
    bad = ["suggestions", "list", raw_uid, "--tiled-uri", f"{tiled_server.base_url}/api/v1",
           "--api-key", "wrong"]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("401" in err or "nauthor" in err), err
    assert cli.main(["suggestions", "list", raw_uid, "--tiled-uri",
                     f"http://127.0.0.1:{free_port()}/api/v1"]) == 2
    assert "cannot reach Tiled" in capsys.readouterr().err


def test_view_cli_reports_bad_tiled(tiled_server, capsys):
    assert cli.main(["view", "--tiled-uri", f"http://127.0.0.1:{free_port()}/api/v1"]) == 2
    assert "cannot reach Tiled" in capsys.readouterr().err
    assert cli.main(["view", "--tiled-uri", f"{tiled_server.base_url}/api/v1", "--api-key",
                     "wrong", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("401" in err or "nauthor" in err), err
