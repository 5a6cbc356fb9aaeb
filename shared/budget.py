"""Budgets that hold while batches run (SPEC §17): admission by reservation.

A query of a tenant with a monthly budget starts only when its estimated cost fits what is left:
``spent + reserved + estimate <= budget``. The worker reserves the estimate when it claims the
query (``Budgets.admit``) and settles it to the actual cost of the query's calls when the query
ends (``Budgets.settle``), so the overshoot is bounded by estimation error, not by how many
queries run at once. A query that does not fit goes back to the queue with a delay (its batch
says why: ``Batch.waiting``) until the budget is raised or the month rolls over.

The counters are Redis hashes, one per tenant and month, changed by one script run at claim and
one at settle (no SUM per query); the database stays the truth: a counter Redis lost is rebuilt
from the ledger's month-to-date sum (``shared.usage.month_to_date_cost``). A reservation carries
the query's lease: one whose worker died without settling is dropped by the next admission after
its lease ran out. The estimate is the tenant's running average of actual query costs (an EWMA
kept in the same hash), or before any query settled, the prices of the council's calls at the
query's input size and ``OUTPUT_GUESS`` tokens out.

Tenants without a budget cost nothing here: they touch no counter. Each process keeps tenants'
budgets for ``REFRESH_S`` seconds, and forgets one at once when the admin API announces a change
on the ``budget-changed`` channel (a listener thread per process): a budget set on a tenant
holds from its next admission, not ``REFRESH_S`` later.

Known approximations: the ledger's in-flight rows of a counter rebuilt mid-query are counted again
when that query settles; calls of a worker killed mid-query reach the ledger (abandoned, with
their estimates) but not the counter. Both err by at most the queries in flight at that moment.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared import keys
from shared.db import write_transaction
from shared.models import ApiKey, Batch, Notice, Tenant
from shared.settings import Settings
from shared.usage import budget_for, key_month_to_date_cost, month_start, month_to_date_cost
from shared.webhooks.events import emit, emit_once

log = logging.getLogger("conclave.budget")

REFRESH_S = 5.0  # how stale a process's view of tenants' budgets may be
OUTPUT_GUESS = 300  # tokens out per call, for a tenant's first estimate
EWMA_WEIGHT = 0.2
WARNING_SHARE = 0.8
COUNTER_KEEP_S = 40 * 86400  # a month's counters outlive the month (late settles)

# Every script covers all of a query's scopes (its tenant's budget, its key's, or both) in one
# EVALSHA. KEYS: per scope, its spend hash, holds (zset: query -> lease end), estimates (hash) and
# waiting batches (set). ARGV: number of scopes, query id, lease end, now, batch id, the first
# estimate (before the first scope's EWMA exists), keep (s), then each scope's budget.
# Returns {state, scope, spent, reserved, estimate, ...}: state -1 = scope's counter missing
# (rebuild it), 0 = refused by scope (then 1 if the batch newly waits there), 1 = admitted (then
# the batches that waited in any scope until now).
_RESERVE = """
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  if redis.call('EXISTS', KEYS[4 * i + 1]) == 0 then return {-1, i} end
end
for i = 0, n - 1 do
  local spend, holds, est = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3]
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', ARGV[4])
  for _, q in ipairs(expired) do
    local e = redis.call('HGET', est, q)
    if e then redis.call('HINCRBYFLOAT', spend, 'reserved', -tonumber(e)) end
    redis.call('HDEL', est, q)
    redis.call('ZREM', holds, q)
  end
  local prev = redis.call('HGET', est, ARGV[2])
  if prev then
    redis.call('HINCRBYFLOAT', spend, 'reserved', -tonumber(prev))
    redis.call('HDEL', est, ARGV[2])
    redis.call('ZREM', holds, ARGV[2])
  end
end
local estimate = tonumber(redis.call('HGET', KEYS[1], 'avg') or ARGV[6])
local first = {}
for i = 0, n - 1 do
  local h = redis.call('HMGET', KEYS[4 * i + 1], 'spent', 'reserved')
  local spent = tonumber(h[1] or '0')
  local reserved = math.max(0, tonumber(h[2] or '0'))
  if spent + reserved + estimate > tonumber(ARGV[8 + i]) then
    local new = redis.call('SADD', KEYS[4 * i + 4], ARGV[5])
    redis.call('EXPIRE', KEYS[4 * i + 4], ARGV[7])
    return {0, i, tostring(spent), tostring(reserved), tostring(estimate), new}
  end
  if i == 0 then first = {tostring(spent), tostring(reserved + estimate)} end
end
local out = {1, 0, first[1], first[2], tostring(estimate)}
for i = 0, n - 1 do
  redis.call('HINCRBYFLOAT', KEYS[4 * i + 1], 'reserved', estimate)
  redis.call('HSET', KEYS[4 * i + 3], ARGV[2], estimate)
  redis.call('ZADD', KEYS[4 * i + 2], ARGV[3], ARGV[2])
  local waiting = KEYS[4 * i + 4]
  if redis.call('SCARD', waiting) > 0 then
    for _, b in ipairs(redis.call('SMEMBERS', waiting)) do out[#out + 1] = b end
    redis.call('DEL', waiting)
  end
end
return out
"""
# KEYS: per scope, spend hash, holds, estimates. ARGV: number of scopes, query id, actual cost.
# Returns per scope {spent before, after} ("" for a scope that held no reservation).
_SETTLE = (
    """
local out = {}
for i = 0, tonumber(ARGV[1]) - 1 do
  local spend, holds, est = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local e = redis.call('HGET', est, ARGV[2])
  local before, after = '', ''
  if e then
    redis.call('HDEL', est, ARGV[2])
    redis.call('ZREM', holds, ARGV[2])
    -- A counter dropped meanwhile is rebuilt from the ledger, which has this query's calls.
    if redis.call('EXISTS', spend) == 1 then
      redis.call('HINCRBYFLOAT', spend, 'reserved', -tonumber(e))
      before = redis.call('HGET', spend, 'spent') or '0'
      after = redis.call('HINCRBYFLOAT', spend, 'spent', ARGV[3])
      local actual = tonumber(ARGV[3])
      if actual > 0 then
        local avg = tonumber(redis.call('HGET', spend, 'avg') or ARGV[3])
        redis.call('HSET', spend, 'avg', avg + (actual - avg) * """
    + str(EWMA_WEIGHT)
    + """)
      end
    end
  end
  out[#out + 1] = before
  out[#out + 1] = after
end
return out
"""
)
# KEYS: spend hash. ARGV: spent (from the ledger), keep (s). Creates the counter if still missing.
_REBUILD = """
if redis.call('HSETNX', KEYS[1], 'spent', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'reserved', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"""


@dataclass(frozen=True)
class Scope:
    """One budget a query is admitted against: its tenant's (``key_id`` None) or its key's."""

    id: str  # the tenant's id or the key's: the counters' names (shared.keys.spend)
    budget: float
    key_id: str | None = None


@dataclass(frozen=True)
class Admission:
    """What admission decided for one query. ``period`` is None for a query with no budget at all
    (nothing reserved, nothing to settle). ``budget``, ``spent``, ``reserved``: the refusing
    scope's when refused, else the first scope's (the tenant's when it has a budget)."""

    admitted: bool
    period: int | None = None  # the month (its start) the reservation is in
    budget: float | None = None
    spent: float = 0.0
    reserved: float = 0.0
    estimate: float = 0.0
    newly_waiting: bool = False  # refused, and its batch was not waiting yet
    resumed_batches: tuple[str, ...] = ()  # admitted, and these batches waited until now
    scopes: tuple[Scope, ...] = ()
    key_id: str | None = None  # refused by this key's budget (None: by the tenant's)


FREE = Admission(admitted=True)


class _Lane:
    """EVALSHA over redis-py connections held by this object and used directly.

    Why not ``Script.__call__``: measured in benchmarks/budget_check.py, a script run through the
    client costs ~50 µs of CPU (pool checkout and release, argument encoding, the observability
    hooks, response callbacks) against ~20 µs on a held connection with the command packed here,
    and admission plus settle are two runs per query. The connections come from the client's pool
    (``make_connection``: same address, database, credentials, TLS) but are kept here, one per
    thread that needs one at the same moment; one that failed is dropped."""

    def __init__(self, client: redis.Redis):
        self._client = client
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._shas: dict[str, bytes] = {}

    def run(self, script: str, keys_: Sequence[str], args: Sequence[str | int | float]) -> Any:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = _text(self._client.script_load(script)).encode()
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._client.connection_pool.make_connection()
        try:
            try:
                reply = self._call(conn, sha, keys_, args)
            except redis.exceptions.NoScriptError:  # Redis restarted or flushed its scripts
                self._client.script_load(script)
                reply = self._call(conn, sha, keys_, args)
        except redis.ResponseError:
            with self._lock:
                self._idle.append(conn)  # the connection is fine; the script failed
            raise
        except BaseException:
            conn.disconnect()
            raise
        with self._lock:
            self._idle.append(conn)
        return reply

    @staticmethod
    def _call(conn: Any, sha: bytes, keys_: Sequence[str], args: Sequence[str | int | float]) -> Any:
        parts = [b"EVALSHA", sha, str(len(keys_)).encode()]
        parts += [k.encode() for k in keys_]
        parts += [a.encode() if isinstance(a, str) else repr(a).encode() for a in args]
        packed = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        conn.send_packed_command([packed], check_health=False)
        return conn.read_response(disable_decoding=True)


class Budgets:
    """One per worker process: the counters' scripts and a short-lived view of tenants' and keys'
    budgets (and of which key created each batch, which never changes)."""

    def __init__(
        self, client: redis.Redis, namespace: str, sessions: sessionmaker[Session], settings: Settings
    ):
        self._client = client
        self._ns = namespace
        self._sessions = sessions
        self._settings = settings
        self._lane = _Lane(client)
        self._budgets: dict[str, tuple[float | None, float]] = {}
        self._key_budgets: dict[str, tuple[float | None, float]] = {}
        self._batch_keys: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._notified: set[tuple[str, str, str]] = set()
        self._closed = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="conclave-budgets", daemon=True)
        self._listener.start()

    def close(self) -> None:
        self._closed.set()

    def _listen(self) -> None:
        """Forget a tenant's (or key's) budget when the admin API says it changed; after a lost
        connection, forget them all (a change may have gone by unheard)."""
        channel = keys.budget_changed(self._ns)
        while not self._closed.is_set():
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
                with self._lock:
                    self._budgets.clear()
                    self._key_budgets.clear()
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        changed = _text(message["data"])
                        with self._lock:
                            self._budgets.pop(changed, None)
                            self._key_budgets.pop(changed, None)
            except redis.RedisError as exc:
                log.warning("budget changes not heard (%s); retrying", type(exc).__name__)
                self._closed.wait(REFRESH_S)

    def budget(self, tenant_id: str, now: float) -> float | None:
        found = self._budgets.get(tenant_id)
        if found is not None and now - found[1] < REFRESH_S:
            return found[0]
        with self._sessions() as session:
            tenant = session.get(Tenant, tenant_id)
            budget = budget_for(tenant, self._settings) if tenant is not None else None
        with self._lock:
            self._budgets[tenant_id] = (budget, now)
        return budget

    def key_budget(self, batch_id: str, now: float) -> tuple[str | None, float | None]:
        """The key that created the batch and that key's own budget (None: none), read once per
        batch and then every ``REFRESH_S`` per key (or at once after a change)."""
        if batch_id in self._batch_keys:
            key_id = self._batch_keys[batch_id]
            if key_id is None:
                return None, None
            found = self._key_budgets.get(key_id)
            if found is not None and now - found[1] < REFRESH_S:
                return key_id, found[0]
        with self._sessions() as session:
            row = session.execute(
                select(col(Batch.key_id), col(ApiKey.monthly_budget_usd))
                .select_from(Batch)
                .outerjoin(ApiKey, col(ApiKey.id) == col(Batch.key_id))
                .where(col(Batch.id) == batch_id)
            ).first()
        key_id, budget = (row[0], row[1]) if row is not None else (None, None)
        with self._lock:
            if len(self._batch_keys) > 100_000:
                self._batch_keys.clear()
            self._batch_keys[batch_id] = key_id
            if key_id is not None:
                self._key_budgets[key_id] = (budget, now)
        return key_id, budget

    def scopes(self, tenant_id: str, batch_id: str, now: float) -> tuple[Scope, ...]:
        tenant_budget = self.budget(tenant_id, now)
        key_id, key_budget = self.key_budget(batch_id, now)
        found = []
        if tenant_budget is not None:
            found.append(Scope(tenant_id, tenant_budget))
        if key_id is not None and key_budget is not None:
            found.append(Scope(key_id, key_budget, key_id))
        return tuple(found)

    def admit(
        self,
        tenant_id: str,
        batch_id: str,
        query_id: str,
        first_estimate: float,
        lease_until: int,
        now: float,
    ) -> Admission:
        scopes = self.scopes(tenant_id, batch_id, now)
        if not scopes:
            return FREE
        period = month_start(int(now))
        names = [name for scope in scopes for name in self._keys(scope.id, period)]
        args: list[str | int | float] = [
            len(scopes),
            query_id,
            lease_until,
            int(now),
            batch_id,
            first_estimate,
            COUNTER_KEEP_S,
            *(scope.budget for scope in scopes),
        ]
        for _ in range(len(scopes) + 1):
            reply = self._lane.run(_RESERVE, names, args)
            if int(reply[0]) >= 0:
                break
            missing = scopes[int(reply[1])]
            with self._sessions() as session:
                if missing.key_id is None:
                    spent = month_to_date_cost(session, tenant_id, int(now))
                else:
                    spent = key_month_to_date_cost(session, missing.key_id, int(now))
            self._lane.run(_REBUILD, self._keys(missing.id, period)[:1], [spent, COUNTER_KEEP_S])
        else:
            raise RuntimeError(f"the spend counters of tenant {tenant_id} could not be rebuilt")
        state, which = int(reply[0]), scopes[int(reply[1])]
        spent, reserved, estimate = float(reply[2]), float(reply[3]), float(reply[4])
        if state == 0:
            return Admission(
                False,
                period,
                which.budget,
                spent,
                reserved,
                estimate,
                newly_waiting=bool(int(reply[5])),
                scopes=scopes,
                key_id=which.key_id,
            )
        resumed = tuple(_text(b) for b in reply[5:])
        return Admission(
            True, period, which.budget, spent, reserved, estimate, resumed_batches=resumed, scopes=scopes
        )

    def settle(
        self, tenant_id: str, query_id: str, admission: Admission, actual: float
    ) -> tuple[float, float] | None:
        """Release the query's reservations and add what it really cost; crossing 80% or 100% of a
        scope's budget sends its event. Returns the first scope's month spend before and after
        (None when it held no reservation, e.g. settled already)."""
        if admission.period is None or not admission.admitted:
            return None
        scopes = admission.scopes
        names = [name for scope in scopes for name in self._keys(scope.id, admission.period)[:3]]
        reply = self._lane.run(_SETTLE, names, [len(scopes), query_id, actual])
        first: tuple[float, float] | None = None
        for i, scope in enumerate(scopes):
            if not reply[2 * i]:
                continue
            before, after = float(reply[2 * i]), float(reply[2 * i + 1])
            if i == 0:
                first = (before, after)
            if after >= WARNING_SHARE * scope.budget:
                self.notify(tenant_id, scope.budget, after, int(time.time()), key_id=scope.key_id)
        return first

    def _keys(self, scope_id: str, period: int) -> list[str]:
        # A key's counters are named like a tenant's, by the key's id (``key_…``, never a tenant's).
        return [
            keys.spend(self._ns, scope_id, period),
            keys.spend_holds(self._ns, scope_id, period),
            keys.spend_estimates(self._ns, scope_id, period),
            keys.budget_waiting(self._ns, scope_id),
        ]

    def notify(
        self,
        tenant_id: str,
        budget: float,
        spent: float,
        now: int,
        *,
        reached: bool = False,
        key_id: str | None = None,
    ) -> None:
        """``cost.budget_warning`` once ``spent`` reaches 80% of ``budget``, ``cost.budget_exceeded``
        once it reaches the budget or a query no longer fits (``reached``): each once per month and
        budget (the tenant's, or the key ``key_id``'s; this process also remembers what it sent)."""
        period = datetime.fromtimestamp(now, UTC).strftime("%Y-%m")
        due = []
        if spent >= WARNING_SHARE * budget:
            due.append("cost.budget_warning")
        if reached or spent >= budget:
            due.append("cost.budget_exceeded")
        for kind in due:
            if (key_id or tenant_id, kind, period) in self._notified:
                continue
            data: dict[str, Any] = {"period": period, "budget_usd": budget, "spent_usd": round(spent, 8)}
            if key_id is None:
                emit_once(self._sessions, tenant_id, kind, period, data, now)
            else:
                emit_key_once(self._sessions, tenant_id, key_id, kind, period, data, now)
            self._notified.add((key_id or tenant_id, kind, period))


def emit_key_once(
    sessions: sessionmaker[Session],
    tenant_id: str,
    key_id: str,
    kind: str,
    period: str,
    data: dict[str, Any],
    now: int,
) -> bool:
    """A key's budget event, to its tenant, once per month: as ``emit_once``, with the ``Notice``
    naming the key where a tenant's names the tenant (a key id is never a tenant id)."""
    project = None
    try:
        with sessions.begin() as session:
            session.add(Notice(tenant_id=key_id, kind=kind, period=period, created_at=now))
            session.flush()
            key = session.get(ApiKey, key_id)
            project = key.project if key is not None else None
            emit(session, tenant_id, kind, {**data, "key_id": key_id, "project": project}, now=now)
    except IntegrityError:
        return False
    log.info("%s sent to tenant %s for key %s, %s", kind, tenant_id, key_id, period)
    return True


def mark_waiting(sessions: sessionmaker[Session], batch_id: str, waiting: dict[str, Any] | None) -> None:
    with write_transaction(sessions) as session:
        session.execute(update(Batch).where(col(Batch.id) == batch_id).values(waiting=waiting))


def clear_waiting(sessions: sessionmaker[Session], batch_ids: Sequence[str]) -> None:
    if batch_ids:
        with write_transaction(sessions) as session:
            session.execute(update(Batch).where(col(Batch.id).in_(sorted(batch_ids))).values(waiting=None))


def budget_changed(
    client: redis.Redis,
    namespace: str,
    sessions: sessionmaker[Session],
    tenant_id: str,
    *,
    rebuild: bool,
    key_id: str | None = None,
) -> None:
    """After an operator changed a tenant's budget: its batches stop saying they wait (the next
    refusal says so again if they still do). ``rebuild`` (the tenant had no budget before, or has
    none now: its counter was not kept meanwhile) drops the month's counter, rebuilt from the
    ledger on the next claim. Otherwise the counter stays: workers pass the budget to it.
    With ``key_id``, the same for that key's own budget and the batches it created."""
    period = month_start(int(time.time()))
    scope = key_id or tenant_id
    names = [keys.budget_waiting(namespace, scope)]
    if rebuild:
        names += [
            keys.spend(namespace, scope, period),
            keys.spend_holds(namespace, scope, period),
            keys.spend_estimates(namespace, scope, period),
        ]
    client.delete(*names)
    client.publish(keys.budget_changed(namespace), scope)
    which = col(Batch.tenant_id) == tenant_id if key_id is None else col(Batch.key_id) == key_id
    with write_transaction(sessions) as session:
        session.execute(update(Batch).where(which, col(Batch.waiting).is_not(None)).values(waiting=None))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
