"""Fair lanes: where the order of a priority queue's work is decided (SPEC §15).

A batch's messages do not go straight onto their priority's dramatiq queue. They wait in a lane
of their own (a Redis list per batch, in input order), grouped by tenant; a worker's consumer,
when it wants ``n`` messages, first tops the dramatiq queue up to ``n`` from the lanes
(``refill``), and then fetches as dramatiq always does. So the dramatiq queue holds only what
consumers are about to take, and the order is decided at the last moment:

- **between tenants**, by weight: stride scheduling. Each tenant with work has a *pass*; the
  tenant with the lowest pass sends next and its pass grows by ``1 / weight``, so over any
  stretch each backlogged tenant sends in proportion to its weight (its tier's ``weight``, which
  a tenant's ``limits`` may override), whatever its backlog. A tenant that had nothing queued
  joins at the current clock: idle time is not banked as credit.
- **within a tenant**, by deadline: its batch with the earliest ``expires_at`` sends first.
- **a batch that would miss its window** at its current rate (``scheduler/jobs/deadlines.py``)
  is *urgent*: urgent batches send before everyone else, earliest deadline first, and their
  tenant is charged as usual, so it pays the time back once the batch is safe.

Why here, and not a dispatcher that meters work from the database or per-tenant dramatiq
queues: the order must be decided where capacity frees up, and that is the consumer's fetch.
Measured with ``benchmarks/fairness.py``: a 50-query batch sent behind another tenant's 3,000
finishes in about the time it takes alone, and the three-tenant 1:1:2 split holds within a few
percent. A dispatcher process would add a component that must always run (and a tick of delay
to every batch); per-tenant dramatiq queues would need consumers for queues that appear at
runtime. The lanes cost one script run per fetch (a few tens of microseconds of Redis).

What waits in a queue's lanes is also counted by a list of one-byte marks (``…:depth``, one
per message), so a queue-length autoscaler (KEDA's Redis list scaler, ``deploy/k8s/keda.yaml``)
sees the backlog: the dramatiq queue itself holds only what consumers are about to take.

Nothing here is the truth: the database is. Message bodies stay in dramatiq's ``.msgs`` hash
from the moment they are enqueued (so reconciliation's "does its message exist?" still holds),
and if Redis loses the lanes, reconciliation sends the queued queries again, into new lanes.
A message sent without a lane (a delayed re-send, ``actor.send()``) goes straight onto the
queue, ahead of the lanes: it had waited its turn once already.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dramatiq.brokers.redis import RedisBroker

from shared import keys
from shared.settings import PRIORITIES


@dataclass(frozen=True)
class Lane:
    """Whose work a message is and when it is due: where it waits for its turn."""

    tenant_id: str
    batch_id: str
    deadline: int  # the batch's expires_at (Unix seconds)
    weight: float | None = None  # the tenant's share weight; None keeps the one Redis has (or 1)


# Put one chunk of one lane's messages into the lane: their bodies into dramatiq's message hash
# (where a fetch reads them), their ids onto the batch's list, the batch among its tenant's
# batches by deadline, and the tenant among those with work (at the clock, if it had none).
# KEYS[1] = lane prefix, KEYS[2] = {ns}:{queue}.msgs, KEYS[3] = weights hash
# ARGV = tenant, batch, deadline, weight ("" = keep), id1, data1, id2, data2, ...
_LANE_ENQUEUE = """
local P = KEYS[1]
local tenant, batch, deadline, weight = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ids = {}
for i = 5, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
end
if #ids == 0 then
  return 0
end
redis.call("hset", KEYS[2], unpack(ARGV, 5))
redis.call("rpush", P .. ":b:" .. batch, unpack(ids))
redis.call("hset", P .. ":owner", batch, tenant)
redis.call("zadd", P .. ":t:" .. tenant, deadline, batch)
if weight ~= "" then
  redis.call("hset", KEYS[3], tenant, weight)
end
if not redis.call("zscore", P .. ":tenants", tenant) then
  redis.call("zadd", P .. ":tenants", redis.call("get", P .. ":clock") or 0, tenant)
end
local marks = {}
for i = 1, #ids do
  marks[i] = "1"
end
redis.call("rpush", P .. ":depth", unpack(marks))
return #ids
"""

# Top the dramatiq queue up to ARGV[1] messages from the lanes, in fair order (module docstring).
# An id whose body is gone (its batch failed to store, or was taken back) is skipped.
# KEYS[1] = lane prefix, KEYS[2] = {ns}:{queue}, KEYS[3] = {ns}:{queue}.msgs, KEYS[4] = weights
_REFILL = """
local P = KEYS[1]
local need = tonumber(ARGV[1]) - redis.call("llen", KEYS[2])
local moved = 0
local steps = 0
local function retire(batch, tenant)
  redis.call("zrem", P .. ":urgent", batch)
  redis.call("hdel", P .. ":owner", batch)
  if tenant then
    redis.call("zrem", P .. ":t:" .. tenant, batch)
    if redis.call("zcard", P .. ":t:" .. tenant) == 0 then
      redis.call("zrem", P .. ":tenants", tenant)
    end
  end
end
while need > 0 and steps < 4 * tonumber(ARGV[1]) + 64 do
  steps = steps + 1
  local batch, tenant, urgent = nil, nil, false
  local first = redis.call("zrange", P .. ":urgent", 0, 0)
  if #first > 0 then
    batch, urgent = first[1], true
    tenant = redis.call("hget", P .. ":owner", batch) or nil
  else
    local t = redis.call("zrange", P .. ":tenants", 0, 0)
    if #t == 0 then
      break
    end
    tenant = t[1]
    local b = redis.call("zrange", P .. ":t:" .. tenant, 0, 0)
    if #b == 0 then
      redis.call("zrem", P .. ":tenants", tenant)
    else
      batch = b[1]
    end
  end
  if batch then
    local id = redis.call("lpop", P .. ":b:" .. batch)
    if not id then
      retire(batch, tenant)
    else
      redis.call("lpop", P .. ":depth")
      if redis.call("hexists", KEYS[3], id) == 1 then
        redis.call("rpush", KEYS[2], id)
        need = need - 1
        moved = moved + 1
        if tenant then
          local pass = redis.call("zscore", P .. ":tenants", tenant)
          if pass then
            local weight = tonumber(redis.call("hget", KEYS[4], tenant) or "1") or 1
            if not urgent then
              redis.call("set", P .. ":clock", pass)
            end
            redis.call("zadd", P .. ":tenants", "XX", tonumber(pass) + 1 / weight, tenant)
          end
        end
      end
      if redis.call("llen", P .. ":b:" .. batch) == 0 then
        retire(batch, tenant)
      end
    end
  end
end
return moved
"""

# Mark batches urgent (ARGV = batch, deadline, ...) or not (ARGV[1] = "-", then batches), as far
# as they still have a lane.
_URGENT = """
local P = KEYS[1]
local changed = 0
if ARGV[1] == "-" then
  for i = 2, #ARGV do
    changed = changed + redis.call("zrem", P .. ":urgent", ARGV[i])
  end
  return changed
end
for i = 1, #ARGV, 2 do
  if redis.call("hexists", P .. ":owner", ARGV[i]) == 1 then
    changed = changed + redis.call("zadd", P .. ":urgent", ARGV[i + 1], ARGV[i])
  end
end
return changed
"""

# Drop batches' lanes (ARGV = batches) and their bodies: a cancelled or expired batch's messages
# would otherwise each cost a fetch and a claim that finds nothing.
_DROP = """
local P = KEYS[1]
local dropped = 0
for i = 1, #ARGV do
  local lane = P .. ":b:" .. ARGV[i]
  local ids = redis.call("lrange", lane, 0, -1)
  for j = 1, #ids do
    redis.call("hdel", KEYS[2], ids[j])
  end
  if #ids > 0 then
    redis.call("ltrim", P .. ":depth", #ids, -1)
  end
  redis.call("del", lane)
  local tenant = redis.call("hget", P .. ":owner", ARGV[i])
  redis.call("zrem", P .. ":urgent", ARGV[i])
  redis.call("hdel", P .. ":owner", ARGV[i])
  if tenant then
    redis.call("zrem", P .. ":t:" .. tenant, ARGV[i])
    if redis.call("zcard", P .. ":t:" .. tenant) == 0 then
      redis.call("zrem", P .. ":tenants", tenant)
    end
  end
  dropped = dropped + #ids
end
return dropped
"""

_SCRIPTS = {"enqueue": _LANE_ENQUEUE, "refill": _REFILL, "urgent": _URGENT, "drop": _DROP}


def _script(broker: RedisBroker, name: str) -> Any:
    cache: dict[str, Any] = broker.__dict__.setdefault("_conclave_fair_scripts", {})
    if name not in cache:
        cache[name] = broker.client.register_script(_SCRIPTS[name])
    return cache[name]


def _lane_keys(broker: RedisBroker, queue_name: str) -> tuple[str, str, str, str]:
    ns = broker.namespace
    return (
        keys.fair_lanes(ns, queue_name),
        keys.queue(ns, queue_name),
        keys.queue_messages(ns, queue_name),
        keys.fair_weights(ns),
    )


def lane_enqueue_args(lane: Lane) -> list[str]:
    """The leading arguments of a lane enqueue: who, which batch, its deadline, its weight."""
    weight = "" if lane.weight is None else repr(float(lane.weight))
    return [lane.tenant_id, lane.batch_id, str(int(lane.deadline)), weight]


def enqueue_script_sha(broker: RedisBroker) -> str:
    return str(_script(broker, "enqueue").sha)


def load_enqueue_script(broker: RedisBroker) -> str:
    script = _script(broker, "enqueue")
    script.sha = broker.client.script_load(_LANE_ENQUEUE)
    return str(script.sha)


def lane_prefix_keys(broker: RedisBroker, queue_name: str) -> list[str]:
    """KEYS of a lane enqueue: the lane prefix, the queue's message hash, the weights hash."""
    prefix, _, messages, weights = _lane_keys(broker, queue_name)
    return [prefix, messages, weights]


def refill(broker: RedisBroker, queue_name: str, want: int) -> int:
    """Top ``queue_name`` up to ``want`` waiting messages from its lanes; returns how many moved.
    Raises ``redis.RedisError`` when Redis is out of reach."""
    if want <= 0:
        return 0
    return int(_script(broker, "refill")(keys=list(_lane_keys(broker, queue_name)), args=[want]))


def mark_urgent(broker: RedisBroker, queue_name: str, deadlines: dict[str, int]) -> int:
    """Send these batches (batch id → deadline) ahead of everyone's lanes until they are drained."""
    if not deadlines:
        return 0
    args: list[str] = []
    for batch_id, deadline in deadlines.items():
        args += [batch_id, str(int(deadline))]
    return int(_script(broker, "urgent")(keys=[keys.fair_lanes(broker.namespace, queue_name)], args=args))


def clear_urgent(broker: RedisBroker, queue_name: str, batch_ids: Iterable[str]) -> int:
    ids = list(batch_ids)
    if not ids:
        return 0
    prefix = keys.fair_lanes(broker.namespace, queue_name)
    return int(_script(broker, "urgent")(keys=[prefix], args=["-", *ids]))


def urgent_batches(broker: RedisBroker, queue_name: str) -> list[str]:
    prefix = keys.fair_lanes(broker.namespace, queue_name)
    rows: list[Any] = broker.client.zrange(f"{prefix}:urgent", 0, -1)
    return [b.decode() if isinstance(b, bytes) else str(b) for b in rows]


def drop_lanes(broker: RedisBroker, batch_ids: Sequence[str]) -> int:
    """Take the waiting messages of these batches out of every priority's lanes (cancel, expiry).
    Returns how many were dropped."""
    if not batch_ids:
        return 0
    dropped = 0
    for priority in PRIORITIES:
        prefix, _, messages, _ = _lane_keys(broker, priority)
        dropped += int(_script(broker, "drop")(keys=[prefix, messages], args=list(batch_ids)))
    return dropped


def backlog(broker: RedisBroker) -> dict[str, int]:
    """Messages waiting in each priority's lanes (not yet on the dramatiq queue)."""
    pipe = broker.client.pipeline(transaction=False)
    for priority in PRIORITIES:
        pipe.llen(keys.fair_depth(broker.namespace, priority))
    return {p: int(v) for p, v in zip(PRIORITIES, pipe.execute(), strict=True)}


def tenant_passes(broker: RedisBroker, queue_name: str) -> dict[str, float]:
    """The tenants with work in a queue's lanes and their pass (lowest sends next)."""
    prefix = keys.fair_lanes(broker.namespace, queue_name)
    rows: list[Any] = broker.client.zrange(f"{prefix}:tenants", 0, -1, withscores=True)
    return {(t.decode() if isinstance(t, bytes) else t): float(s) for t, s in rows}


def waiting_ids(broker: RedisBroker, queue_name: str) -> list[str]:
    """Every message id waiting for ``queue_name``: on its list, then in its lanes (batch by batch,
    in no particular order of batches). For inspection and tests, not for hot paths."""
    ns = broker.namespace
    prefix = keys.fair_lanes(ns, queue_name)
    client = broker.client
    ids: list[Any] = client.lrange(keys.queue(ns, queue_name), 0, -1)
    batches: list[Any] = client.hkeys(f"{prefix}:owner")
    for batch in batches:
        name = batch.decode() if isinstance(batch, bytes) else str(batch)
        ids += client.lrange(f"{prefix}:b:{name}", 0, -1)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
