"""Engine and session factory. SQLite (the embedded default) gets WAL and a busy timeout because the API and the
worker write to the same file from different processes."""

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from core.errors import Unavailable
from core.service.settings import get_settings


def make_engine(url: str, pool_size: int = 10, max_overflow: int = 10) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return _ping_when_idle(create_engine(url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=10))


def make_async_read_engine(url: str, pool_size: int = 10) -> AsyncEngine | None:
    """An asyncio engine for the reads the API repeats most (the key of every request, job polls), so that they
    cost no thread hop: under CPU contention (a compression job on the same host) waking a thread waits for the
    scheduler, which made three hops most of a poll's 10-20 ms. PostgreSQL only (psycopg is async too); None for
    SQLite, whose reads stay on threads. Bound to the event loop that uses it: create it in the app's lifespan.

    No overflow: a read holds its connection for one statement, so waiting for a pooled one is far cheaper than
    opening one (a server process forked per connection), which is what an overflow connection costs each time the
    pool is full: with overflow, 16 concurrent polls opened and closed connections all the time."""
    if not url.startswith("postgresql"):
        return None
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=10,
                                 isolation_level="AUTOCOMMIT")
    _ping_when_idle(engine.sync_engine)
    return engine


def _ping_when_idle(engine: Engine) -> Engine:
    event.listen(engine, "connect", _stamp)
    event.listen(engine, "checkin", _stamp)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


# A connection that was used less than this long ago is handed out without a ping: SQLAlchemy's `pool_pre_ping`
# pinged on every checkout, a round trip per request that made up a fifth of an authenticated read's time under
# load. One left idle longer (a restarted server, a proxy's idle timeout) is pinged and replaced if dead; one that
# dies within the window fails its request once with `Unavailable`, and SQLAlchemy then drops the whole pool.
IDLE_PING_S = 5.0
USED_AT = "mcs_used_at"


def _stamp(_dbapi_connection: Any, record: Any, *_args: Any) -> None:
    record.info[USED_AT] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    if time.monotonic() - record.info.get(USED_AT, 0.0) < IDLE_PING_S:
        return
    try:
        proxy._pool._dialect.do_ping(dbapi_connection)
    except Exception as exc:  # any driver error: the pool replaces the connection and retries the checkout
        raise DisconnectionError(f"idle connection failed its ping: {exc}") from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache
def engine() -> Engine:
    settings = get_settings()
    return make_engine(settings.database_url, settings.db_pool_size, settings.db_max_overflow)


def connect() -> Connection:
    """A connection from the pool; an unreachable database or a pool that stays exhausted becomes `Unavailable`."""
    try:
        return engine().connect()
    except (OperationalError, PoolTimeout) as exc:
        raise Unavailable("the database is unreachable or busy; try again shortly") from exc


@lru_cache
def read_engine() -> Engine:
    """The same pool in autocommit: a read of one statement needs no BEGIN and ROLLBACK round trips."""
    return engine().execution_options(isolation_level="AUTOCOMMIT")


@lru_cache
def session_factory() -> sessionmaker[Session]:
    return sessionmaker(engine(), expire_on_commit=False)


@contextmanager
def read_scope() -> Iterator[Session]:
    """A session for reads only: autocommit, so each statement is its own snapshot (read what one statement can
    return) and nothing is ever rolled back. An unreachable database becomes `Unavailable`."""
    try:
        with Session(read_engine(), expire_on_commit=False) as session:
            yield session
    except (OperationalError, PoolTimeout) as exc:
        raise Unavailable("the database is unreachable; try again shortly") from exc


@asynccontextmanager
async def async_read_scope(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """`read_scope` on the asyncio engine: run repository code with `await session.run_sync(function)`."""
    try:
        async with AsyncSession(engine, expire_on_commit=False) as session:
            yield session
    except (OperationalError, PoolTimeout) as exc:
        raise Unavailable("the database is unreachable; try again shortly") from exc


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on error; an unreachable database becomes `Unavailable`."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except (OperationalError, PoolTimeout) as exc:
        session.rollback()
        raise Unavailable("the database is unreachable; try again shortly") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
