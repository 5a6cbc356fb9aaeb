"""Build a dramatiq Redis broker with Conclave's queues declared and its scripts loaded.

Producers (API, scheduler) use ``make_broker`` as it is: they only enqueue and inspect. The
worker passes its own broker class (``workers/broker.py``, budgeted consumers) and middleware.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from redis.exceptions import RedisError

from shared.keys import DEFAULT_NAMESPACE
from shared.queue import enqueue
from shared.settings import PRIORITIES


def make_broker(
    redis_url: str,
    namespace: str = DEFAULT_NAMESPACE,
    *,
    broker_class: type[RedisBroker] = RedisBroker,
    middleware: Sequence[dramatiq.Middleware] = (),
) -> RedisBroker:
    # No default middleware: a producer needs none, and the worker chooses its own (the default
    # Retries middleware in particular is unwanted: reconciliation recovers lost queries from
    # the database, not dramatiq redelivering a message 20 times).
    broker = broker_class(url=redis_url, namespace=namespace, middleware=list(middleware))
    # Load the broker's Lua scripts up front: a first EVALSHA would otherwise answer NOSCRIPT,
    # and the embedded fakeredis server closes the connection on any error reply.
    # When Redis is down at start-up they load on first use instead.
    with contextlib.suppress(RedisError):
        for script in broker.scripts.values():
            script.sha = broker.client.script_load(script.script)
        enqueue.preload(broker)
    for priority in PRIORITIES:
        broker.declare_queue(priority)
    return broker
