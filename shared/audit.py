"""The audit log (SPEC §17): one append-only row per state-changing request that reached a route —
time, tenant, key, role, action, target, client IP, request id, outcome — written in the same
transaction as the change it records.

This module owns the table (``audit_events``), the request being audited (a context variable set
by ``api.audit``'s middleware, which knows HTTP; this module does not) and the SQLAlchemy
listeners that put the row into that request's first transaction which writes.

Why listeners rather than a call in each route: routes and services open their own transactions
(``sessions.begin()``, ``write_transaction``) in dozens of places, a route may write in several
transactions (a batch deletion pages its rows) or in none (a cache clear is one Redis command),
and a route added later would have to remember the call. Every write of the API goes through a
``Session`` of ``shared.db``, so: ``after_begin`` remembers a transaction's connection, a
``before_cursor_execute`` listener marks that connection when an INSERT/UPDATE/DELETE runs on it
(Core, ORM flush or ``exec_driver_sql`` alike), and ``before_commit`` inserts the row into the
first marked transaction of the request. The row then commits or rolls back with the change.

Outcome, append-only: the row is never updated, so it cannot carry a status the response only has
later. A row written inside the change's transaction says ``outcome = "ok"`` and ``status = null``
(the change committed: the row commits only with it). A request that committed no write — refused
(4xx), failed (5xx), or one whose effect is outside the database (a cache clear, a feed import
queued) — gets its row from the middleware after the response, in a transaction of its own, with
the status and ``outcome`` ``ok`` (< 400), ``refused`` (4xx) or ``error`` (5xx). A route that
commits and then fails (an intake whose enqueue fails removes its rows in a second transaction)
keeps its ``ok`` row: the change did commit once.

Not audited: requests with no authenticated caller (401: no or unknown key, no dashboard session)
and those refused by a rate limiter before the route ran. There is no tenant to show them to, and
a row for each would let anyone grow an append-only table; failed authentications are throttled
per address and counted in ``rate_limit_rejections`` instead.

Never stored: request bodies, headers or keys. The target is the route's path parameters (ids).

Append-only is enforced below the code: migration 0011 adds triggers (SQLite and PostgreSQL) that
refuse UPDATE and DELETE on the table (and TRUNCATE on PostgreSQL).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from sqlalchemy import JSON, Column, Engine, Index, Table, event, insert, select
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlmodel import Field, SQLModel, col

from shared.db import id_page, write_transaction
from shared.ids import new_id


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_events"
    # A tenant's rows, newest first: ``GET /v1/audit`` pages on it.
    __table_args__ = (Index("ix_audit_events_tenant", "tenant_id", "id"),)

    id: str = Field(primary_key=True, max_length=40)
    created_at: int
    tenant_id: str = Field(max_length=40)
    key_id: str = Field(max_length=40)
    role: str = Field(max_length=16)
    # The route's method and path template, e.g. "POST /v1/batches/{batch_id}/cancel".
    action: str = Field(max_length=200)
    # The route's path parameters ({"batch_id": "batch_…"}), None when it has none.
    target: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    client_ip: str | None = Field(default=None, max_length=64)
    request_id: str = Field(max_length=64)
    outcome: str = Field(max_length=16)  # ok | refused | error
    status: int | None = None  # the HTTP status; None when written in the change's transaction


AUDIT: Table = AuditEvent.__table__  # type: ignore[attr-defined]
# Built once, the row as parameters: 26 µs an insert on SQLite, against 135 µs for a new
# ``insert(AUDIT).values(row)`` per request (its cache key is rebuilt from every value).
_INSERT = insert(AUDIT)

# What ``describe`` returns: the columns a request fixes (tenant_id, key_id, role, action, target,
# client_ip, request_id), or None when the request is not audited (no caller, no route).
Fields = dict[str, Any]


class AuditContext:
    """One request being audited: how to describe it, and whether its row exists yet.

    A route's transactions may run on several threads (the thread pool copies the context, so
    each sees this same object): a transaction claims the row before inserting it, gives the
    claim back if it rolls back, and confirms it once committed."""

    __slots__ = ("_claimed", "_describe", "_fields", "_lock", "closed", "written")

    def __init__(self, describe: Callable[[], Fields | None]):
        self._describe = describe
        self._fields: Fields | None = None
        self._lock = threading.Lock()
        self._claimed = False
        self.written = False
        self.closed = False

    def fields(self) -> Fields | None:
        if self._fields is None:
            self._fields = self._describe()
        return self._fields

    def claim(self) -> bool:
        with self._lock:
            if self._claimed or self.written or self.closed:
                return False
            self._claimed = True
            return True

    def release(self) -> None:
        with self._lock:
            self._claimed = False

    def confirm(self) -> None:
        with self._lock:
            self.written = True

    def close(self) -> bool:
        """No transaction may write the row after this; True when none did (nor is about to)."""
        with self._lock:
            self.closed = True
            return not (self.written or self._claimed)


CURRENT: ContextVar[AuditContext | None] = ContextVar("conclave_audit", default=None)

_CONNECTION = "conclave.audit.connection"  # Session.info: the transaction's connection
_PENDING = "conclave.audit.pending"  # Session.info: the context whose row this transaction holds
_WROTE = "conclave.audit.wrote"  # Connection.info: a write ran in the current transaction
_WRITES = ("INSERT", "UPDATE", "DELETE")


def outcome_of(status: int) -> str:
    return "ok" if status < 400 else "refused" if status < 500 else "error"


def _row(fields: Fields, outcome: str, status: int | None) -> dict[str, Any]:
    return {
        "id": new_id("audit"),
        "created_at": int(time.time()),
        **fields,
        "outcome": outcome,
        "status": status,
    }


# ---------------------------------------------------------------- listeners


def _after_begin(session: Session, _transaction: SessionTransaction, connection: Any) -> None:
    if CURRENT.get() is None:
        return
    session.info[_CONNECTION] = connection
    connection.info[_WROTE] = False


def _before_cursor_execute(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
    if CURRENT.get() is not None and statement.lstrip()[:6].upper() in _WRITES:
        conn.info[_WROTE] = True


def _before_commit(session: Session) -> None:
    ctx = CURRENT.get()
    if ctx is None or ctx.written or ctx.closed:
        return
    # The commit would flush pending ORM changes after this event: flush them now, so that they
    # count as this transaction's writes.
    session.flush()
    connection = session.info.get(_CONNECTION)
    if connection is None or not connection.info.get(_WROTE):
        return
    fields = ctx.fields()
    if fields is None or not ctx.claim():
        return
    session.info[_PENDING] = ctx
    session.execute(_INSERT, _row(fields, "ok", None))


def _after_commit(session: Session) -> None:
    ctx = session.info.pop(_PENDING, None)
    if ctx is not None:
        ctx.confirm()


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:
        return
    session.info.pop(_CONNECTION, None)
    ctx = session.info.pop(_PENDING, None)
    if ctx is not None:  # claimed, then rolled back instead of committed
        ctx.release()


_installed = threading.Lock()
_listening = False


def install() -> None:
    """Listen on every Session and Engine of the process (idempotent). Only the API calls it: a
    process that never audits pays nothing, and one that does pays a context-variable read per
    statement and per commit of a request that is not audited."""
    global _listening
    with _installed:
        if _listening:
            return
        event.listen(Session, "after_begin", _after_begin)
        event.listen(Session, "before_commit", _before_commit)
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_end", _after_transaction_end)
        event.listen(Engine, "before_cursor_execute", _before_cursor_execute)
        _listening = True


# ---------------------------------------------------------------- writing and reading


def record(sessions: sessionmaker[Session], fields: Fields, status: int) -> None:
    """The row of a request that committed no write, in its own transaction (after the response)."""
    with write_transaction(sessions) as session:
        session.execute(_INSERT, _row(fields, outcome_of(status), status))


def list_events(
    session: Session, tenant_id: str, *, limit: int, after: str | None, action: str | None
) -> tuple[list[AuditEvent], bool]:
    stmt = select(AuditEvent).where(AUDIT.c.tenant_id == tenant_id)
    if action is not None:
        stmt = stmt.where(AUDIT.c.action == action)
    return id_page(session, stmt, col(AuditEvent.id), limit=limit, after=after)


def event_object(row: AuditEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "audit_event",
        "created_at": row.created_at,
        "tenant_id": row.tenant_id,
        "key_id": row.key_id,
        "role": row.role,
        "action": row.action,
        "target": row.target,
        "client_ip": row.client_ip,
        "request_id": row.request_id,
        "outcome": row.outcome,
        "status": row.status,
    }
