"""`flower-superlink` with a SQLite busy timeout that survives a busy machine.

Flower 1.42 opens the SuperLink's file database with `PRAGMA busy_timeout = 5000`
(`flwr.supercore.constant.SQLITE_PRAGMAS`, applied on every new connection by
`flwr.supercore.sql_mixin`).  The SuperLink serves its APIs from a thread pool, one SQLite
connection per thread; when a thread holding the write lock is starved of CPU for more than
5 s (several SuperNodes training on the same 2 cores), the next writer gets
`sqlite3.OperationalError: database is locked`, the Runtime API answers 500, and Flower's
ServerApp gives up on a 500: the whole run fails.  Our CI hit exactly that
(tests/test_deploy_local.py, `/v1/runtime/pull-messages`).

`python -m federation.deploy.superlink ARGS` is `flower-superlink ARGS` with the busy timeout
raised to `MINUSFED_SQLITE_BUSY_TIMEOUT_MS` (default 120 s): a writer waits for the lock
instead of failing.  Every other pragma and argument is Flower's.  If a Flower upgrade moves the
setting, it logs a warning and starts the SuperLink unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from logging import INFO, WARNING

DEFAULT_BUSY_TIMEOUT_MS = 120_000
ENV_BUSY_TIMEOUT = "MINUSFED_SQLITE_BUSY_TIMEOUT_MS"


def busy_timeout_ms(environ: Mapping[str, str] = os.environ) -> int:
    """The busy timeout to use, from the environment; a clear error for a bad value."""
    raw = environ.get(ENV_BUSY_TIMEOUT, "")
    if not raw:
        return DEFAULT_BUSY_TIMEOUT_MS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise SystemExit(f"{ENV_BUSY_TIMEOUT}={raw!r}: expected a whole number of "
                         f"milliseconds >= 0")
    return value


def patch_sqlite_busy_timeout(ms: int) -> bool:
    """Make every SQLite connection Flower opens from now on wait `ms` for a lock."""
    from flwr.common.logger import log
    try:
        from flwr.supercore import sql_mixin
    except ImportError:
        sql_mixin = None
    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not pragmas or not any(name == "busy_timeout" for name, _ in pragmas):
        log(WARNING, "minusfed superlink: flwr.supercore.sql_mixin.SQLITE_PRAGMAS has no "
                     "busy_timeout (Flower internals changed?); keeping Flower's default")
        return False
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(int(ms)) if name == "busy_timeout" else value) for name, value in pragmas)
    log(INFO, "minusfed superlink: SQLite busy_timeout %d ms (Flower's default 5000 ms)", ms)
    return True


def main(argv: list[str] | None = None) -> None:
    """Run Flower's `flower-superlink` command line with the longer busy timeout."""
    patch_sqlite_busy_timeout(busy_timeout_ms())
    from flwr.superlink.cli import flower_superlink
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    flower_superlink()


if __name__ == "__main__":
    main()
