"""Engines and sessions, one engine per process (re-created after fork).

No engine exists at import time. :func:`get_engine` builds one lazily for the
current process id, so a forked Celery worker child never reuses the parent's
connection pool.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[tuple[int, str], tuple[Engine, sessionmaker[Session]]] = {}


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy drive transactions; we emit BEGIN IMMEDIATE ourselves so
        # concurrent writers wait on busy_timeout instead of failing on upgrade.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_db_engine(url: str) -> Engine:
    """Create an engine with the settings pacs-ai relies on for this backend."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # No pre-ping: a SQLite file never drops a connection, and the listener
        # checks one out for every instance.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _sqlite_setup(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
    engine = create_engine(
        url,
        pool_size=5,
        max_overflow=10,
        connect_args={"connect_timeout": 5},
    )
    _ping_when_idle(engine)
    return engine


#: a pooled connection back in the pool for longer than this is pinged before use
PING_AFTER_IDLE_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """SQLAlchemy's ``pool_pre_ping``, for connections idle a while only.

    A ping on every checkout is one more round trip for each instance the
    listener stores (one of eight). A connection that waited in the pool over
    :data:`PING_AFTER_IDLE_SECONDS` is pinged, and replaced when the server has
    gone (a restart, a blip, an idle timeout): the next use after a blip
    succeeds. One in constant use that the server drops fails its statement
    instead, and SQLAlchemy then replaces every connection of the pool.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["pacs_ai_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("pacs_ai_idle_since")
        if since is None or time.monotonic() - since <= PING_AFTER_IDLE_SECONDS:
            return  # new, or used a moment ago
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # noqa: BLE001 - any failure: reconnect
            raise DisconnectionError("pooled connection is gone") from exc
        if not alive:
            raise DisconnectionError("pooled connection is gone")


def get_engine(url: str) -> Engine:
    return _get(url)[0]


def _get(url: str) -> tuple[Engine, sessionmaker[Session]]:
    key = (os.getpid(), url)
    with _lock:
        found = _engines.get(key)
        if found is None:
            engine = create_db_engine(url)
            found = (engine, sessionmaker(engine, expire_on_commit=False))
            _engines[key] = found
        return found


def dispose_all() -> None:
    """Forget every engine (call in a forked child before first use)."""
    with _lock:
        for (pid, _url), (engine, _) in list(_engines.items()):
            # close=False: never close the parent's sockets from the child.
            engine.dispose(close=pid == os.getpid())
        _engines.clear()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session in one transaction: commit on success, roll back on error."""
    maker = _get(url)[1]
    session = maker()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
