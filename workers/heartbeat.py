"""Worker liveness for reconciliation: each worker process writes a heartbeat every few seconds.

dramatiq's own heartbeat only moves when a consumer talks to Redis, which a saturated worker
(every thread busy, prefetch full) may not do for minutes; this one runs on its own thread, so
"no heartbeat for ``DEAD_AFTER_S``" reliably means the process is gone (``kill -9``, a lost
machine). Reconciliation then hands that worker's running queries to others.

Keys: ``{ns}:workers`` (sorted set: worker id → last beat, Unix seconds) and
``{ns}:workers:since`` (when the set was first written: after a Redis restart, a worker
missing from it is only presumed dead once live workers have had time to beat again).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

log = logging.getLogger("conclave.worker")

HEARTBEAT_S = 2.0
DEAD_AFTER_S = 30


def worker_identity(broker: RedisBroker) -> str:
    """``<host>:<pid>:<broker id prefix>``: unique per worker process, readable by an operator,
    and at most 64 characters (the column's width) whatever the host name."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{broker.broker_id[:12]}"


def beat(client: redis.Redis, namespace: str, worker_id: str, now: float | None = None) -> None:
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.zadd(f"{namespace}:workers", {worker_id: now})
    pipe.set(f"{namespace}:workers:since", now, nx=True)
    pipe.execute()


def dead_workers(client: redis.Redis, namespace: str, worker_ids: set[str], now: float) -> set[str]:
    """The workers among ``worker_ids`` that have certainly stopped beating."""
    if not worker_ids:
        return set()
    ordered = sorted(worker_ids)
    pipe = client.pipeline(transaction=False)
    pipe.get(f"{namespace}:workers:since")
    for worker_id in ordered:
        pipe.zscore(f"{namespace}:workers", worker_id)
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


class WorkerHeartbeat(dramatiq.Middleware):
    def __init__(
        self, client: redis.Redis, namespace: str, worker_id: str, on_beat: Callable[[], None] | None = None
    ):
        self.client = client
        self.namespace = namespace
        self.worker_id = worker_id
        # Also run on every beat (the worker's metrics flush), so nothing waits for the next query.
        self.on_beat = on_beat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        self._thread = threading.Thread(target=self._run, name="conclave-heartbeat", daemon=True)
        self._thread.start()

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            # A clean exit: its queries are finished or were handed back, nothing to recover.
            self.client.zrem(f"{self.namespace}:workers", self.worker_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                beat(self.client, self.namespace, self.worker_id)
                if self.on_beat is not None:
                    self.on_beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", type(exc).__name__)
            self._stop.wait(HEARTBEAT_S)
