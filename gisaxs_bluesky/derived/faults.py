"""Tiled faults as the derived-data writers see them: which are the server's (re-send later),
which refuse the credentials (keep the rows, say so), and one line for the user."""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["describe_fault", "is_refused", "is_server_fault", "retryable", "tiled_reachable"]


def is_server_fault(exc: BaseException) -> bool:
    """True for faults of the server/connection (transport errors, HTTP 5xx), not of the request."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    if "database is locked" in str(exc):
        # SQLite storage busy with another writer; an in-process app raises it unwrapped
        return True
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def is_refused(exc: BaseException) -> bool:
    """True when Tiled refused the request for its credentials (HTTP 401/403: a key revoked
    or rotated, no write permission): the request itself was fine and can be re-sent later."""
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (401, 403)


def retryable(exc: BaseException) -> bool:
    """Faults after which rows are kept in the local backup and re-sent later."""
    return is_server_fault(exc) or is_refused(exc)


def describe_fault(exc: BaseException) -> str:
    """One line for the user: what Tiled answered (never the API key)."""
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        what = {401: "refused the API key (HTTP 401: missing, revoked or rotated)",
                403: "refused the write (HTTP 403: no write permission)"}.get(code)
        if what is None:
            what = (f"answered with a server error (HTTP {code})" if code >= 500
                    else f"rejected the request (HTTP {code})")
        return f"Tiled {what}"
    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return f"Tiled unreachable ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


def tiled_reachable(client: Any, timeout: float = 2.0) -> bool:
    """A fast request (no client retries) to tell whether the client's Tiled answers at all.

    A transport error is tried once more at once: after a server restart the client's
    pooled keep-alive connection to the old process fails on first use, and the second
    attempt opens a fresh one. A server that is down refuses both in milliseconds.
    """
    ctx = getattr(client, "context", None)
    if ctx is None:
        return True
    in_process = type(ctx.http_client).__name__ == "TestClient"  # no timeouts there
    kwargs = {} if in_process else {"timeout": timeout}
    for attempt in range(2):
        try:
            r = ctx.http_client.get(ctx.api_uri, **kwargs)
        except httpx.TransportError:
            if attempt:
                return False
            continue
        except httpx.HTTPError:
            return False
        return r.status_code < 500
    return False
