"""The worker process's entry module: ``dramatiq workers.actors`` (what ``conclave worker`` runs).

Importing it is its purpose: it builds the process's broker from settings, installs it, and
declares the actors. Everything else is importable without side effects: the pipeline in
``workers/pipeline.py``, the process's world in ``workers/context.py`` (built on the first
message, after dramatiq has forked the worker process).
"""

from __future__ import annotations

import threading

import dramatiq
import redis

from shared.logs import configure_logging
from shared.metrics import MetricsBuffer
from shared.settings import get_settings
from shared.tracing import setup_tracing
from workers.broker import make_worker_broker
from workers.context import WorkerContext, build_context
from workers.heartbeat import WorkerHeartbeat, worker_identity
from workers.pipeline import declare_actors

settings = get_settings()
broker = make_worker_broker(settings)
dramatiq.set_broker(broker)
WORKER_ID = worker_identity(broker)
METRICS = MetricsBuffer(redis.Redis.from_url(settings.redis_url), settings.queue_namespace)
broker.add_middleware(
    WorkerHeartbeat(
        redis.Redis.from_url(settings.redis_url), settings.queue_namespace, WORKER_ID, METRICS.flush
    )
)

_context: WorkerContext | None = None
_context_lock = threading.Lock()


def context() -> WorkerContext:
    global _context
    if _context is None:
        with _context_lock:
            if _context is None:
                setup_tracing(settings, "conclave-worker")
                configure_logging(settings.log_level, "conclave-worker")
                _context = build_context(settings, broker, WORKER_ID, metrics=METRICS)
    return _context


actors = declare_actors(broker, context)
