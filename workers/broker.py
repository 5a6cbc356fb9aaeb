"""The dramatiq Redis broker, its queues, and the pipelined bulk enqueue the API uses.

One queue per priority (``high``, ``normal``, ``low``): dramatiq's Redis broker has no
per-message priority, so a worker pool chooses what it serves by the queues it consumes, and
within one process the actor priority orders what it has prefetched (high before normal
before low).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import dramatiq
import orjson
from dramatiq.brokers.redis import RedisBroker
from dramatiq.message import Message
from dramatiq.middleware import AsyncIO, CurrentMessage, ShutdownNotifications, TimeLimit
from redis.exceptions import NoScriptError, RedisError

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
        _bulk_script(broker).sha = broker.client.script_load(_BULK_ENQUEUE)
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
        message_id=query_id,  # unique already; saves a uuid4 per message
    )


# Enqueue many messages to one queue in one script run: the same two writes dramatiq's own
# dispatch script makes per message ("enqueue": HSET {queue}.msgs id data; RPUSH {queue} id),
# for a whole chunk at once. Running dramatiq's script per message in a pipeline costs Redis
# one script execution per message and the API one EVALSHA to pack per message; this is one
# per chunk. Written against dramatiq 2.x's Redis layout (dramatiq/brokers/redis/dispatch.lua);
# the integration tests consume what it enqueues with real dramatiq workers.
# KEYS[1] = {ns}:{queue}, KEYS[2] = {ns}:{queue}.msgs; ARGV = id1, data1, id2, data2, ...
_BULK_ENQUEUE = """
redis.call("hset", KEYS[2], unpack(ARGV))
local ids = {}
for i = 1, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
end
redis.call("rpush", KEYS[1], unpack(ids))
return #ids
"""
# Lua's unpack is bounded (LUAI_MAXCSTACK, 8,000 on Redis): 2 arguments per message.
BULK_CHUNK = 1000


def enqueue_messages(broker: RedisBroker, messages: Iterable[Message]) -> int:
    """Enqueue many messages: one script run per 1,000 messages of a queue, one Redis round
    trip per ``ENQUEUE_CHUNK``, instead of a round trip (``actor.send()``, ~4,000/s) or a script
    run (dramatiq's dispatch in a pipeline, ~20,000/s) per message. The broker's enqueue hooks
    still run for every message so middleware sees exactly what ``send()`` would show it.
    """
    script = _bulk_script(broker)
    sent = 0
    by_queue: dict[str, list[Message]] = {}
    pending = 0
    for message in messages:
        if "redis_message_id" not in message.options:
            message = message.copy(options={"redis_message_id": str(message.message_id)})
        broker.emit_before("enqueue", message, None)
        by_queue.setdefault(message.queue_name, []).append(message)
        pending += 1
        if pending >= ENQUEUE_CHUNK:
            sent += _flush(broker, script, by_queue)
            by_queue, pending = {}, 0
    if pending:
        sent += _flush(broker, script, by_queue)
    return sent


def _bulk_script(broker: RedisBroker) -> Any:
    script = getattr(broker, "_conclave_bulk_enqueue", None)
    if script is None:
        script = broker.client.register_script(_BULK_ENQUEUE)
        broker._conclave_bulk_enqueue = script  # type: ignore[attr-defined]
    return script


def _flush(broker: RedisBroker, script: Any, by_queue: dict[str, list[Message]]) -> int:
    pipe = broker.client.pipeline(transaction=False)
    for queue_name, queued in by_queue.items():
        full = f"{broker.namespace}:{queue_name}"
        for i in range(0, len(queued), BULK_CHUNK):
            args: list[str | bytes] = []
            for message in queued[i : i + BULK_CHUNK]:
                args.append(message.options["redis_message_id"])
                # orjson writes the same compact JSON as dramatiq's encoder, several times faster.
                args.append(orjson.dumps(message.asdict()))
            pipe.evalsha(script.sha, 2, full, f"{full}.msgs", *args)
    try:
        pipe.execute()
    except NoScriptError:
        # Redis restarted and forgot the script: nothing in the pipeline ran (every command is
        # this script), so load it and send the same pipeline again.
        script.sha = broker.client.script_load(_BULK_ENQUEUE)
        return _flush(broker, script, by_queue)
    sent = 0
    for queued in by_queue.values():
        sent += _after_enqueue(broker, queued)
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
