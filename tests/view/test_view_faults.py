"""Bad input the other view tests leave out: a Queue Server that does not answer, seen on the
page and from the CLI (nothing queued, nothing recorded, the suggestion still undecided), and
the CLI on a run without suggestions."""

from __future__ import annotations

import secrets
import socket

from view_helpers import write_suggestions

from gisaxs_bluesky import cli
from gisaxs_bluesky.qserver import QueueBridge, read_decisions
from gisaxs_bluesky.view import BackgroundServer, ViewState, build_view_app
from gisaxs_bluesky.view.data import ViewConfig


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_page_says_the_queue_server_did_not_answer(tiled_server, browser, tmp_path,
                                                   suggested_run):
    client = tiled_server.client()
    raw_uid, writer = suggested_run(client, 11)
    dead = _dead_address()
    bridge = QueueBridge(client, dead, timeout_s=0.5, pending_path=tmp_path / "pending.jsonl")
    state = ViewState(client, bridge=bridge, tiled_label="test", mode="polling",
                      config=ViewConfig())
    server = BackgroundServer(build_view_app(state)).start()
    try:
        page = browser.new_page()
        page.goto(f"{server.url}/?run={writer.key}")
        page.wait_for_selector("#suggestions button[data-act=accept]", timeout=30000)
        assert dead in page.inner_text("#qserver")
        page.click("#suggestions button[data-act=accept] >> nth=0")
        page.wait_for_selector("#decision-msg:not([hidden])", timeout=30000)
        msg = page.inner_text("#decision-msg")
        assert "did not answer" in msg and "nothing was queued" in msg, msg
        assert "ok" not in page.get_attribute("#decision-msg", "class").split()
        # still undecided, can be accepted once the Queue Server is back
        page.wait_for_function("document.querySelectorAll('#suggestions button[data-act=accept]')"
                               ".length === 3", timeout=10000)
        assert read_decisions(client, raw_uid).empty
        page.close()
    finally:
        state.close()
        server.stop()


def test_cli_queue_server_down_and_run_without_suggestions(tiled_server, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    client = tiled_server.client()
    raw_uid = f"raw-{secrets.token_hex(4)}"
    write_suggestions(client, raw_uid)
    sid = QueueBridge(client, None).suggestions(raw_uid)[0]["suggestion_id"]
    tiled = ["--tiled-uri", f"{tiled_server.base_url}/api/v1", "--api-key", tiled_server.api_key]
    assert cli.main(["suggestions", "accept", raw_uid, sid, *tiled, "--qserver",
                     _dead_address()]) == 1
    err = capsys.readouterr().err
    assert "did not answer" in err and "nothing was queued" in err, err
    assert read_decisions(client, raw_uid).empty

    assert cli.main(["suggestions", "list", "raw-never-binned", *tiled]) == 1
    err = capsys.readouterr().err
    assert "raw run 'raw-never-binned' has no suggestions in Tiled" in err, err
