"""Replay of many runs in this process, and the connection to Tiled."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
from tiled.client import from_uri

from ..models import load_model
from ..store import DerivedStore, describe_fault, tiled_reachable
from .one_run import _replay_run_callback, replay_run
from .options import ReplayError, ReplayOptions, RunSummary

logger = logging.getLogger(__name__)

def _server_of(client: Any) -> str:
    try:
        return str(client.context.api_uri).split("?")[0]
    except Exception:  # noqa: BLE001
        return "?"


def replay_runs(
    catalog: Any,
    uids: Sequence[str],
    *,
    encoder: Any = None,
    target: Any = None,
    options: ReplayOptions | None = None,
    show_progress: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[RunSummary]:
    """Replay ``uids`` of ``catalog`` serially; derived nodes go to ``target`` (default: catalog).

    Returns one RunSummary per uid.  Ctrl-C stops the batch after storing what was done: the
    current run is marked "interrupted", the rest are not started (not listed).
    """
    from tqdm.auto import tqdm


    options = options or ReplayOptions()
    encoder = load_model(encoder if encoder is not None else options.model, options.device)
    target = catalog if target is None else target
    store = DerivedStore(target, root=options.root, backup_dir=options.backup_dir)
    summaries: list[RunSummary] = []
    bar = tqdm(total=None, unit="frame", desc="replay", disable=not show_progress,
               leave=False)

    def tick(n: int) -> None:
        bar.update(n)
        if progress is not None:
            progress(n)

    try:
        for uid in uids:
            bar.set_postfix_str(uid[:8])
            down = [c for c in ([catalog] if target is catalog else [catalog, target])
                    if not tiled_reachable(c)]
            if down:  # fail fast instead of the client's long retry loop
                summaries.append(RunSummary(uid=uid, status="failed", errors=[
                    f"run {uid}: Tiled unreachable at {_server_of(down[0])} (run not started)"
                ]))
                continue
            if options.method == "callback":
                summaries.append(_replay_run_callback(catalog, uid, encoder=encoder,
                                                      target=target, options=options))
                continue
            summary = RunSummary(uid=uid)
            try:
                replay_run(catalog, uid, encoder=encoder, store=store, options=options,
                           progress=tick, summary=summary)
            except KeyboardInterrupt:
                summaries.append(summary)
                logger.warning("replay interrupted during run %s; rows so far are stored", uid)
                break
            summaries.append(summary)
    finally:
        bar.close()
    return summaries


# ------------------------------------------------------------------------------ distributed
_CLIENTS: dict[tuple[str, str | None], Any] = {}


def _redact(text: str, secrets: Sequence[str | None] = ()) -> str:
    """``text`` without API keys: ``api_key=...`` query values and the given secrets."""
    text = re.sub(r"(api_key=)[^&\s'\"]+", r"\1***", str(text))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def connect(uri: str, api_key: str | None = None) -> Any:
    """Tiled client for ``uri``; ReplayError naming the server (never the API key) and what
    went wrong: unreachable, key refused (401/403), or a server error (5xx)."""

    key = (uri, api_key)
    if key in _CLIENTS:
        return _CLIENTS[key]
    where = uri.split("?")[0]
    uri_key = dict(p.split("=", 1) for p in urlparse(uri).query.split("&") if "=" in p)
    secrets = [api_key, unquote(uri_key.get("api_key", "")) or None, uri_key.get("api_key")]
    try:  # one quick probe first: the client itself retries for a long time
        httpx.get(uri, timeout=5.0, headers={"Authorization": f"Apikey {api_key}"}
                  if api_key else None)
    except httpx.HTTPError as exc:
        raise ReplayError(f"cannot reach Tiled at {where!r}: {type(exc).__name__}: "
                          f"{_redact(str(exc), secrets)}") from exc
    try:
        client = from_uri(uri, api_key=api_key) if api_key else from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - turn into a clear message
        if isinstance(exc, httpx.HTTPStatusError):
            raise ReplayError(f"{describe_fault(exc)} at {where!r}") from None
        raise ReplayError(f"cannot connect to Tiled at {where!r}: {type(exc).__name__}: "
                          f"{_redact(str(exc), secrets)}") from None
    _CLIENTS[key] = client
    return client
