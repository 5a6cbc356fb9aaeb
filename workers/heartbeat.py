"""The worker's heartbeat: a middleware whose own thread beats every ``HEARTBEAT_S``
(``shared/liveness.py`` says why, and owns the keys)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from shared.liveness import HEARTBEAT_S, beat, forget

log = logging.getLogger("conclave.worker")


def worker_identity(broker: RedisBroker) -> str:
    """``<host>:<pid>:<broker id prefix>``: unique per worker process, readable by an operator,
    and at most 64 characters (the column's width) whatever the host name."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{broker.broker_id[:12]}"


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
            forget(self.client, self.namespace, self.worker_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                beat(self.client, self.namespace, self.worker_id)
                if self.on_beat is not None:
                    self.on_beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", type(exc).__name__)
            self._stop.wait(HEARTBEAT_S)
