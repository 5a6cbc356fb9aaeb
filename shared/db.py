"""Database engine, sessions and migrations.

One engine per process, built from the settings' URL. SQLite is tuned for several processes
writing at once (WAL, a busy timeout); PostgreSQL uses a normal pool. Schema changes go
through Alembic (``shared/migrations``); ``upgrade()`` is what ``conclave db upgrade`` runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import orjson
from sqlalchemy import CursorResult, Engine, Select, create_engine, event
from sqlalchemy.orm import Mapped, Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            connect_args={"check_same_thread": False, "timeout": 60},
            pool_size=pool_size,
            max_overflow=pool_size,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers (API) run while a worker writes; NORMAL sync is durable in WAL
            # mode across process crashes, which is the failure we design for.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(
        url,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
        pool_size=pool_size,
        # Bounded: every process of a deployment shares the server's max_connections (100 by
        # default); threads wait for a connection (pool_timeout) rather than open another.
        max_overflow=pool_size,
        pool_timeout=60,
        pool_pre_ping=True,
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


# SQLite allows one writer at a time and makes the others poll: its busy handler sleeps 1, 2,
# 5, 10... ms between tries, so threads of one process racing for the write lock wait far longer
# than the write takes (100-query POSTs from 4 clients: p99 over 100 ms). Threads of one process
# take turns here instead and wake the moment the lock is free; processes still meet SQLite's
# own lock. PostgreSQL needs none of this.
_SQLITE_WRITES = threading.Lock()


@contextmanager
def write_transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """``sessions.begin()`` for a transaction that writes."""
    bind = sessions.kw.get("bind")
    if bind is not None and bind.dialect.name == "sqlite":
        with _SQLITE_WRITES, sessions.begin() as session:
            yield session
    else:
        with sessions.begin() as session:
            yield session


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def affected(result: Any) -> int:
    """Rows changed by an UPDATE/DELETE (``Session.execute`` is typed as returning a plain Result)."""
    return int(cast(CursorResult[Any], result).rowcount)


def id_page(
    session: Session,
    stmt: Select[Any],
    id_column: Mapped[str],
    *,
    limit: int,
    after: str | None,
    newest_first: bool = True,
) -> tuple[list[Any], bool]:
    """A page of ``stmt``'s rows in id order, after the row with id ``after``, and whether more
    follow. Ids are time-ordered (``shared.ids``), so "newest first after X" is simply "id < X"."""
    if after:
        stmt = stmt.where(id_column < after if newest_first else id_column > after)
    key = id_column.desc() if newest_first else id_column.asc()
    rows = list(session.scalars(stmt.order_by(key).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
