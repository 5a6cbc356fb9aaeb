"""The dramatiq Redis broker, its queues, and the pipelined bulk enqueue the API uses.

One queue per priority (``high``, ``normal``, ``low``): dramatiq's Redis broker has no
per-message priority, so a worker pool chooses what it serves by the queues it consumes, and
within one process the actor priority orders what it has prefetched (high before normal
before low).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from dramatiq.message import Message
from dramatiq.middleware import AsyncIO, CurrentMessage, ShutdownNotifications, TimeLimit
from redis.exceptions import RedisError

from shared.settings import PRIORITIES, Priority

# Actor priority within one worker process: lower runs first.
ACTOR_PRIORITY = {"high": 0, "normal": 10, "low": 20}
ACTOR_NAMES = {p: f"run_query_{p}" for p in PRIORITIES}
QUERY_TIME_LIMIT_MS = 15 * 60 * 1000

# Lua's unpack and Redis argument lists are bounded; a pipeline flush every few thousand
# messages keeps memory flat for a 50,000-query batch.
ENQUEUE_CHUNK = 5000


def make_broker(redis_url: str, namespace: str = "conclave") -> RedisBroker:
    # The default Retries middleware is deliberately left out: a query retries provider calls
    # inside its own budget, and a lost or crashed query is recovered by reconciliation from
    # the database, not by dramatiq redelivering the message 20 times.
    middleware = [
        TimeLimit(time_limit=QUERY_TIME_LIMIT_MS),
        ShutdownNotifications(),
        CurrentMessage(),
        AsyncIO(),
    ]
    broker = RedisBroker(url=redis_url, namespace=namespace, middleware=middleware)
    # Load the broker's Lua scripts up front: a first EVALSHA would otherwise answer NOSCRIPT,
    # and the embedded fakeredis server closes the connection on any error reply.
    # When Redis is down at start-up they load on first use instead.
    with contextlib.suppress(RedisError):
        for script in broker.scripts.values():
            script.sha = broker.client.script_load(script.script)
    for priority in PRIORITIES:
        broker.declare_queue(priority)
    return broker


def install_broker(redis_url: str, namespace: str = "conclave") -> RedisBroker:
    broker = make_broker(redis_url, namespace)
    dramatiq.set_broker(broker)
    return broker


def query_message(query_id: str, priority: Priority, trace: dict[str, str] | None = None) -> Message:
    # The query id doubles as the Redis message id, so reconciliation can ask Redis whether a
    # query's message still exists (queued or in flight) with one HEXISTS per query.
    options: dict[str, object] = {"redis_message_id": query_id}
    if trace:
        options["trace"] = trace
    return Message(
        queue_name=priority,
        actor_name=ACTOR_NAMES[priority],
        args=(query_id,),
        kwargs={},
        options=options,
    )


def enqueue_messages(broker: RedisBroker, messages: Iterable[Message]) -> int:
    """Enqueue many messages in Redis pipelines: one round trip per chunk instead of per message.

    ``actor.send()`` costs one round trip per message (~4,000/s); running the broker's own
    dispatch script in a pipeline does ~20,000/s. The broker's enqueue hooks still run for
    every message so middleware sees exactly what ``send()`` would show it.
    """
    dispatch = broker.scripts["dispatch"]
    keys = [broker.namespace]
    max_unpack = broker._max_unpack_size()
    sent = 0
    pipe = broker.client.pipeline(transaction=False)
    pending: list[Message] = []
    for message in messages:
        if "redis_message_id" not in message.options:
            message = message.copy(options={"redis_message_id": str(message.message_id)})
        broker.emit_before("enqueue", message, None)
        args = [
            "enqueue",
            current_millis(),
            message.queue_name,
            broker.broker_id,
            broker.heartbeat_timeout,
            broker.dead_message_ttl,
            0,  # no maintenance from the API: workers do it
            max_unpack,
            message.options["redis_message_id"],
            message.encode(),
        ]
        dispatch(keys=keys, args=args, client=pipe)
        pending.append(message)
        if len(pending) >= ENQUEUE_CHUNK:
            pipe.execute()
            sent += _after_enqueue(broker, pending)
            pending = []
    if pending:
        pipe.execute()
        sent += _after_enqueue(broker, pending)
    return sent


def _after_enqueue(broker: RedisBroker, messages: list[Message]) -> int:
    for message in messages:
        broker.emit_after("enqueue", message, None)
    return len(messages)


def messages_exist(broker: RedisBroker, items: list[tuple[str, Priority]]) -> list[bool]:
    """For (query_id, priority) pairs: does the query's message still exist in Redis?"""
    pipe = broker.client.pipeline(transaction=False)
    for query_id, priority in items:
        pipe.hexists(f"{broker.namespace}:{priority}.msgs", query_id)
    return [bool(x) for x in pipe.execute()]


def queue_depths(broker: RedisBroker) -> dict[str, int]:
    pipe = broker.client.pipeline(transaction=False)
    for priority in PRIORITIES:
        pipe.llen(f"{broker.namespace}:{priority}")
    return dict(zip(PRIORITIES, pipe.execute(), strict=True))
