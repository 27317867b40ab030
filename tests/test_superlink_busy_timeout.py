"""The SuperLink we start waits for a SQLite lock instead of failing after Flower's 5 s."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from federation.deploy import superlink


@pytest.fixture
def restore_pragmas():
    from flwr.supercore import sql_mixin
    saved = sql_mixin.SQLITE_PRAGMAS
    yield sql_mixin
    sql_mixin.SQLITE_PRAGMAS = saved


def _flower_engine(url: str):
    """An engine configured the way Flower's SqlMixin configures its own (same listener)."""
    from flwr.supercore import sql_mixin
    from sqlalchemy import create_engine, event
    engine = create_engine(url, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", sql_mixin._set_sqlite_pragmas)
    return engine


def test_patch_reaches_connections_flower_opens(tmp_path, restore_pragmas):
    from sqlalchemy import text
    assert dict(restore_pragmas.SQLITE_PRAGMAS)["busy_timeout"] == "5000"     # Flower's default
    assert superlink.patch_sqlite_busy_timeout(42_000)
    with _flower_engine(f"sqlite:///{tmp_path / 's.db'}").connect() as conn:
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 42_000
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"    # others untouched


def test_writer_waits_for_a_lock_held_longer_than_its_busy_timeout(tmp_path, restore_pragmas):
    """A lock held 2.5 s: a 1 s busy timeout fails the writer with Flower's error, our default
    (120 s) waits it out.  (Flower's own 5 s is checked above; 1 s keeps the test short.)"""
    from sqlalchemy import text
    db = tmp_path / "s.db"
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE t (x INTEGER)")

    def write_while_locked() -> tuple[bool, float]:
        holder.execute("BEGIN IMMEDIATE")                          # the write lock
        release = threading.Timer(2.5, lambda: holder.execute("COMMIT"))
        release.start()
        t0 = time.monotonic()
        try:
            with _flower_engine(f"sqlite:///{db}").begin() as conn:
                conn.execute(text("INSERT INTO t VALUES (1)"))
            return True, time.monotonic() - t0
        except Exception as exc:                                     # noqa: BLE001
            assert "database is locked" in str(exc)
            return False, time.monotonic() - t0
        finally:
            release.join()

    superlink.patch_sqlite_busy_timeout(1000)
    ok, waited = write_while_locked()
    assert not ok and waited >= 0.9
    superlink.patch_sqlite_busy_timeout(superlink.DEFAULT_BUSY_TIMEOUT_MS)
    ok, waited = write_while_locked()
    assert ok and waited >= 2.4
    holder.close()


def test_bad_timeout_value_is_a_clear_error():
    assert superlink.busy_timeout_ms({}) == superlink.DEFAULT_BUSY_TIMEOUT_MS
    assert superlink.busy_timeout_ms({superlink.ENV_BUSY_TIMEOUT: "250"}) == 250
    with pytest.raises(SystemExit, match="MINUSFED_SQLITE_BUSY_TIMEOUT_MS='soon'.*milliseconds"):
        superlink.busy_timeout_ms({superlink.ENV_BUSY_TIMEOUT: "soon"})


def test_module_runs_flowers_superlink_cli():
    out = subprocess.run([sys.executable, "-m", "federation.deploy.superlink", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--enable-supernode-auth" in out.stdout and "--database" in out.stdout
