"""Engine and session factory. SQLite (the embedded default) gets WAL and a busy timeout because the API and the
worker write to the same file from different processes."""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from core.errors import Unavailable
from core.service.settings import get_settings


def make_engine(url: str, pool_size: int = 10, max_overflow: int = 10) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=10)


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
def session_factory() -> sessionmaker[Session]:
    return sessionmaker(engine(), expire_on_commit=False)


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
