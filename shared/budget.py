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
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared import keys
from shared.db import write_transaction
from shared.models import Batch, Tenant
from shared.settings import Settings
from shared.usage import budget_for, month_start, month_to_date_cost
from shared.webhooks.events import emit_once

log = logging.getLogger("conclave.budget")

REFRESH_S = 5.0  # how stale a process's view of tenants' budgets may be
OUTPUT_GUESS = 300  # tokens out per call, for a tenant's first estimate
EWMA_WEIGHT = 0.2
WARNING_SHARE = 0.8
COUNTER_KEEP_S = 40 * 86400  # a month's counters outlive the month (late settles)

# KEYS: spend hash, holds (zset: query -> lease end), estimates (hash), waiting batches (set).
# ARGV: budget, (unused), query id, lease end, now, batch id, the first estimate (before the
# tenant's EWMA exists), keep (s). Returns {state, spent, reserved, estimate, cleared batches...}:
# state -1 = counter missing (rebuild it), 0 = refused (and 1 more if the batch newly waits), 1 = admitted.
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
for _, q in ipairs(expired) do
  local e = redis.call('HGET', KEYS[3], q)
  if e then redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', -tonumber(e)) end
  redis.call('HDEL', KEYS[3], q)
  redis.call('ZREM', KEYS[2], q)
end
local prev = redis.call('HGET', KEYS[3], ARGV[3])
if prev then
  redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', -tonumber(prev))
  redis.call('HDEL', KEYS[3], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[3])
end
local h = redis.call('HMGET', KEYS[1], 'spent', 'reserved', 'avg')
local spent = tonumber(h[1] or '0')
local reserved = math.max(0, tonumber(h[2] or '0'))
local estimate = tonumber(h[3] or ARGV[7])
if spent + reserved + estimate > tonumber(ARGV[1]) then
  local new = redis.call('SADD', KEYS[4], ARGV[6])
  redis.call('EXPIRE', KEYS[4], ARGV[8])
  return {0, tostring(spent), tostring(reserved), tostring(estimate), new}
end
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', estimate)
redis.call('HSET', KEYS[3], ARGV[3], estimate)
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
local cleared = {}
if redis.call('SCARD', KEYS[4]) > 0 then
  cleared = redis.call('SMEMBERS', KEYS[4])
  redis.call('DEL', KEYS[4])
end
local out = {1, tostring(spent), tostring(reserved + estimate), tostring(estimate)}
for _, b in ipairs(cleared) do out[#out + 1] = b end
return out
"""
# KEYS: spend hash, holds, estimates. ARGV: query id, actual cost. Returns {spent before, after}.
_SETTLE = (
    """
local e = redis.call('HGET', KEYS[3], ARGV[1])
if not e then return {} end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
-- A counter dropped meanwhile is rebuilt from the ledger, which has this query's calls.
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', -tonumber(e))
local before = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local after = redis.call('HINCRBYFLOAT', KEYS[1], 'spent', ARGV[2])
local actual = tonumber(ARGV[2])
if actual > 0 then
  local avg = tonumber(redis.call('HGET', KEYS[1], 'avg') or ARGV[2])
  redis.call('HSET', KEYS[1], 'avg', avg + (actual - avg) * """
    + str(EWMA_WEIGHT)
    + """)
end
return {tostring(before), after}
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
class Admission:
    """What admission decided for one query. ``period`` is None for a tenant without a budget
    (nothing reserved, nothing to settle)."""

    admitted: bool
    period: int | None = None  # the month (its start) the reservation is in
    budget: float | None = None
    spent: float = 0.0
    reserved: float = 0.0
    estimate: float = 0.0
    newly_waiting: bool = False  # refused, and its batch was not waiting yet
    resumed_batches: tuple[str, ...] = ()  # admitted, and these batches waited until now


FREE = Admission(admitted=True)


class Budgets:
    """One per worker process: the counters' scripts and a short-lived view of tenants' budgets."""

    def __init__(
        self, client: redis.Redis, namespace: str, sessions: sessionmaker[Session], settings: Settings
    ):
        self._client = client
        self._ns = namespace
        self._sessions = sessions
        self._settings = settings
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._rebuild = client.register_script(_REBUILD)
        self._budgets: dict[str, tuple[float | None, float]] = {}
        self._lock = threading.Lock()
        self._notified: set[tuple[str, str, str]] = set()
        self._closed = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="conclave-budgets", daemon=True)
        self._listener.start()

    def close(self) -> None:
        self._closed.set()

    def _listen(self) -> None:
        """Forget a tenant's budget when the admin API says it changed; after a lost connection,
        forget them all (a change may have gone by unheard)."""
        channel = keys.budget_changed(self._ns)
        while not self._closed.is_set():
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
                with self._lock:
                    self._budgets.clear()
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        with self._lock:
                            self._budgets.pop(_text(message["data"]), None)
            except redis.RedisError as exc:
                log.warning("budget changes not heard (%s); retrying", type(exc).__name__)
                self._closed.wait(REFRESH_S)

    def budget(self, tenant_id: str, now: float) -> float | None:
        with self._lock:
            found = self._budgets.get(tenant_id)
        if found is not None and now - found[1] < REFRESH_S:
            return found[0]
        with self._sessions() as session:
            tenant = session.get(Tenant, tenant_id)
            budget = budget_for(tenant, self._settings) if tenant is not None else None
        with self._lock:
            self._budgets[tenant_id] = (budget, now)
        return budget

    def admit(
        self,
        tenant_id: str,
        batch_id: str,
        query_id: str,
        first_estimate: float,
        lease_until: int,
        now: float,
    ) -> Admission:
        budget = self.budget(tenant_id, now)
        if budget is None:
            return FREE
        period = month_start(int(now))
        names = self._keys(tenant_id, period)
        args: list[str | int | float] = [
            budget,
            "",
            query_id,
            lease_until,
            int(now),
            batch_id,
            first_estimate,
            COUNTER_KEEP_S,
        ]
        for _ in range(2):
            reply = self._reserve(keys=names, args=args)
            if int(reply[0]) >= 0:
                break
            with self._sessions() as session:
                spent = month_to_date_cost(session, tenant_id, int(now))
            self._rebuild(keys=names[:1], args=[spent, COUNTER_KEEP_S])
        else:
            raise RuntimeError(f"the spend counter of tenant {tenant_id} could not be rebuilt")
        state, spent, reserved, estimate = int(reply[0]), float(reply[1]), float(reply[2]), float(reply[3])
        if state == 0:
            return Admission(
                False, period, budget, spent, reserved, estimate, newly_waiting=bool(int(reply[4]))
            )
        resumed = tuple(_text(b) for b in reply[4:])
        return Admission(True, period, budget, spent, reserved, estimate, resumed_batches=resumed)

    def settle(
        self, tenant_id: str, query_id: str, admission: Admission, actual: float
    ) -> tuple[float, float] | None:
        """Release the query's reservation and add what it really cost; returns the month's spend
        before and after (None when it held no reservation, e.g. settled already)."""
        if admission.period is None or not admission.admitted:
            return None
        reply = self._settle(keys=self._keys(tenant_id, admission.period)[:3], args=[query_id, actual])
        if not reply:
            return None
        return float(reply[0]), float(reply[1])

    def _keys(self, tenant_id: str, period: int) -> list[str]:
        return [
            keys.spend(self._ns, tenant_id, period),
            keys.spend_holds(self._ns, tenant_id, period),
            keys.spend_estimates(self._ns, tenant_id, period),
            keys.budget_waiting(self._ns, tenant_id),
        ]

    def notify(self, tenant_id: str, budget: float, spent: float, now: int, *, reached: bool = False) -> None:
        """``cost.budget_warning`` once ``spent`` reaches 80% of ``budget``, ``cost.budget_exceeded``
        once it reaches the budget or a query no longer fits (``reached``): each once per month
        (``emit_once``; this process also remembers what it sent)."""
        period = datetime.fromtimestamp(now, UTC).strftime("%Y-%m")
        due = []
        if spent >= WARNING_SHARE * budget:
            due.append("cost.budget_warning")
        if reached or spent >= budget:
            due.append("cost.budget_exceeded")
        for kind in due:
            if (tenant_id, kind, period) in self._notified:
                continue
            data = {"period": period, "budget_usd": budget, "spent_usd": round(spent, 8)}
            emit_once(self._sessions, tenant_id, kind, period, data, now)
            self._notified.add((tenant_id, kind, period))


def mark_waiting(sessions: sessionmaker[Session], batch_id: str, waiting: dict[str, Any] | None) -> None:
    with write_transaction(sessions) as session:
        session.execute(update(Batch).where(col(Batch.id) == batch_id).values(waiting=waiting))


def clear_waiting(sessions: sessionmaker[Session], batch_ids: Sequence[str]) -> None:
    if batch_ids:
        with write_transaction(sessions) as session:
            session.execute(update(Batch).where(col(Batch.id).in_(sorted(batch_ids))).values(waiting=None))


def budget_changed(
    client: redis.Redis, namespace: str, sessions: sessionmaker[Session], tenant_id: str, *, rebuild: bool
) -> None:
    """After an operator changed a tenant's budget: its batches stop saying they wait (the next
    refusal says so again if they still do). ``rebuild`` (the tenant had no budget before, or has
    none now: its counter was not kept meanwhile) drops the month's counter, rebuilt from the
    ledger on the next claim. Otherwise the counter stays: workers pass the budget to it."""
    period = month_start(int(time.time()))
    names = [keys.budget_waiting(namespace, tenant_id)]
    if rebuild:
        names += [
            keys.spend(namespace, tenant_id, period),
            keys.spend_holds(namespace, tenant_id, period),
            keys.spend_estimates(namespace, tenant_id, period),
        ]
    client.delete(*names)
    client.publish(keys.budget_changed(namespace), tenant_id)
    with write_transaction(sessions) as session:
        session.execute(
            update(Batch)
            .where(col(Batch.tenant_id) == tenant_id, col(Batch.waiting).is_not(None))
            .values(waiting=None)
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
