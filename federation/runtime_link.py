"""Keep a deployed ServerApp running when the SuperLink drops one TLS connection.

In Flower 1.42 `flwr-serverapp` talks to the SuperLink's Runtime API over HTTPS (httpx client,
uvicorn server), and every call goes through the grid's retry invoker.  Its give-up rule
(`flwr.supercore.retry.http_retry._should_giveup`) stops at once on any error whose text
contains "ssl", to fail fast on certificate problems.  A connection that the server closes
during the TLS handshake also reads that way: httpx raises `ConnectError("[SSL:
UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol")`, which is the same
transient drop Flower retries without limit on a plain-text link ("Server disconnected").
Our CI hit it once (tests/test_faults.py, 4 SuperNodes training on a loaded 2-core machine):
the ServerApp failed the whole run 35 s in.  What made the SuperLink drop that handshake is not
known; the retry makes the run survive it.

`harden_runtime_link(grid)`, called first in the ServerApp, wraps that rule for an HTTP grid
only: a TLS EOF is retried (with Flower's own backoff) up to `MAX_TLS_EOF_RETRIES` times in a
row, so a server that really drops every TLS connection still fails the run instead of hanging.
Certificate and other handshake errors are still given up on at once, by Flower's rule.

It reaches into Flower internals (`grid._retry_invoker`), so it checks what it patches exists
and logs a warning, changing nothing, if a Flower upgrade moved it.  Simulation grids are left
alone.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from logging import INFO, WARNING

import httpx
from flwr.common.logger import log

MAX_TLS_EOF_RETRIES = 5
_TLS_EOF_MARKERS = ("UNEXPECTED_EOF_WHILE_READING", "EOF occurred in violation of protocol")


def is_tls_eof(exc: BaseException) -> bool:
    """True for a TLS connection the peer closed mid-protocol (no certificate or version error)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLEOFError):
            return True
        if isinstance(cur, (httpx.TransportError, OSError)) and \
                any(m in str(cur) for m in _TLS_EOF_MARKERS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _retry_tls_eof(invoker, limit: int) -> None:
    """Wrap the invoker's give-up rule: a TLS EOF is transient up to `limit` times in a row."""
    original: Callable[[Exception], bool] | None = invoker.should_giveup
    original_success = invoker.on_success
    lock = threading.Lock()
    streak = [0]

    def should_giveup(exc: Exception) -> bool:
        if is_tls_eof(exc):
            with lock:
                streak[0] += 1
                if streak[0] <= limit:
                    log(WARNING, "SuperLink dropped the TLS connection (%s); retry %d of %d",
                        exc, streak[0], limit)
                    return False
        return bool(original(exc)) if original is not None else False

    def on_success(state) -> None:
        with lock:
            streak[0] = 0
        if original_success is not None:
            original_success(state)

    invoker.should_giveup = should_giveup
    invoker.on_success = on_success


def harden_runtime_link(grid: object,
                        max_tls_eof_retries: int = MAX_TLS_EOF_RETRIES) -> bool:
    """Retry a dropped TLS handshake on a deployed ServerApp's grid; False (no change) otherwise."""
    if not hasattr(type(grid), "_runtime_client"):
        return False                                   # in-memory (simulation) grid
    invoker = getattr(grid, "_retry_invoker", None)
    if invoker is None or not (hasattr(invoker, "should_giveup")
                               and hasattr(invoker, "on_success")):
        log(WARNING, "runtime link: no retry invoker on %s (Flower internals changed?); a "
                     "dropped TLS connection will fail the run", type(grid).__name__)
        return False
    _retry_tls_eof(invoker, max_tls_eof_retries)
    log(INFO, "runtime link: a dropped TLS connection is retried up to %d times",
        max_tls_eof_retries)
    return True


__all__ = ["MAX_TLS_EOF_RETRIES", "harden_runtime_link", "is_tls_eof"]
