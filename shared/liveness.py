"""Worker liveness: each worker process beats every few seconds; reconciliation and the admin
views ask who is alive.

dramatiq's own heartbeat only moves when a consumer talks to Redis, which a saturated worker
(every thread busy, prefetch full) may not do for minutes; ours beats from its own thread
(``workers/heartbeat.py``), so "no heartbeat for ``DEAD_AFTER_S``" reliably means the process is
gone (``kill -9``, a lost machine). Reconciliation then hands that worker's running queries to
others.

Keys (``shared/keys.py``): ``workers`` (sorted set: worker id → last beat, Unix seconds) and
``workers:since`` (when the set was first written: after a Redis restart, a worker missing from
it is only presumed dead once live workers have had time to beat again).
"""

from __future__ import annotations

import time

import redis

from shared import keys

HEARTBEAT_S = 2.0
DEAD_AFTER_S = 30


def beat(client: redis.Redis, namespace: str, worker_id: str, now: float | None = None) -> None:
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.zadd(keys.workers(namespace), {worker_id: now})
    pipe.set(keys.workers_since(namespace), now, nx=True)
    pipe.execute()


def forget(client: redis.Redis, namespace: str, worker_id: str) -> None:
    """A clean exit: its queries are finished or were handed back, nothing to recover."""
    client.zrem(keys.workers(namespace), worker_id)


def alive_workers(client: redis.Redis, namespace: str, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    found = client.zrangebyscore(keys.workers(namespace), now - DEAD_AFTER_S, "+inf")
    return [w.decode() if isinstance(w, bytes) else str(w) for w in found]


def dead_workers(client: redis.Redis, namespace: str, worker_ids: set[str], now: float) -> set[str]:
    """The workers among ``worker_ids`` that have certainly stopped beating."""
    if not worker_ids:
        return set()
    ordered = sorted(worker_ids)
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.workers_since(namespace))
    for worker_id in ordered:
        pipe.zscore(keys.workers(namespace), worker_id)
    since_raw, *scores = pipe.execute()
    since = float(since_raw) if since_raw else None
    dead = set()
    for worker_id, score in zip(ordered, scores, strict=True):
        if score is not None:
            if now - float(score) > DEAD_AFTER_S:
                dead.add(worker_id)
        elif since is not None and now - since > DEAD_AFTER_S:
            dead.add(worker_id)
    return dead
