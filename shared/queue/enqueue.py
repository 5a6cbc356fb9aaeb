"""Bulk enqueue: many messages in few Redis round trips, in dramatiq's own Redis layout.

Producers (the batch service, reconciliation) send whole batches at once; ``actor.send()`` costs
one round trip per message (~4,000/s) and dramatiq's dispatch script in a pipeline one script
run per message (~20,000/s); this is one script run per 1,000 messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import dramatiq
import orjson
from dramatiq.brokers.redis import RedisBroker
from dramatiq.message import Message
from dramatiq.middleware import MiddlewareError
from redis.exceptions import NoScriptError, RedisError

from shared import keys
from shared.queue import fair
from shared.queue.fair import Lane

# Lua's unpack and Redis argument lists are bounded; a pipeline flush every few thousand
# messages keeps memory flat for a 50,000-query batch.
ENQUEUE_CHUNK = 5000


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

# Take back messages of one queue by id: the body, and the list entry, which is only searched
# for (from the tail, where a fresh enqueue put it) when the body was still there, i.e. no worker
# has acked the message yet. A message a worker has fetched already is no longer in the list: the
# worker runs the copy it holds, claims nothing without its row, and acks.
# KEYS[1] = {ns}:{queue}, KEYS[2] = {ns}:{queue}.msgs; ARGV = ids
_DISCARD = """
local removed = 0
for i = 1, #ARGV do
  if redis.call("hdel", KEYS[2], ARGV[i]) == 1 then
    redis.call("lrem", KEYS[1], -1, ARGV[i])
    removed = removed + 1
  end
end
return removed
"""


class EnqueueError(RedisError):
    """A bulk enqueue that failed part way. ``sent``: per queue, the ids of every message that may
    have reached Redis (the flushes that went through and the one that failed, which may have
    partly run), for ``discard_messages``."""

    def __init__(self, message: str, sent: dict[str, list[str]]):
        super().__init__(message)
        self.sent = sent


def enqueue_messages(
    broker: RedisBroker,
    messages: Iterable[Message],
    lane: Lane | Callable[[Message], Lane | None] | None = None,
) -> int:
    """Enqueue many messages: one script run per 1,000 messages of a queue, one Redis round
    trip per ``ENQUEUE_CHUNK``, instead of a round trip (``actor.send()``, ~4,000/s) or a script
    run (dramatiq's dispatch in a pipeline, ~20,000/s) per message. The broker's enqueue hooks
    still run for every message so middleware sees exactly what ``send()`` would show it.

    ``lane`` (one for all, or per message): the fair lane the messages wait in for their turn
    (``shared/queue/fair.py``); without one they go straight onto their queue.

    A Redis error raises ``EnqueueError``, naming what may have been sent already: the messages
    before it stay queued unless the caller discards them (``discard_messages``).
    """
    script = bulk_script(broker)
    sent = 0
    by_queue: dict[tuple[str, Lane | None], list[Message]] = {}
    pending = 0
    handed: dict[str, list[str]] = {}
    before = _hooks(broker, "before_enqueue")
    # One lane for all (a batch): grouped by queue alone, without a Lane to hash per message.
    per_message = lane if callable(lane) else None
    single: Lane | None = None if callable(lane) else lane
    groups: dict[str, list[Message]] = {}

    def flush() -> int:
        for queue_name, queued in groups.items():
            by_queue[(queue_name, single)] = queued
        for (queue_name, _), queued in by_queue.items():
            handed.setdefault(queue_name, []).extend(m.options["redis_message_id"] for m in queued)
        try:
            return _flush(broker, script, by_queue)
        except RedisError as exc:
            raise EnqueueError(f"{type(exc).__name__}: {exc}", handed) from exc

    for message in messages:
        if "redis_message_id" not in message.options:
            message = message.copy(options={"redis_message_id": str(message.message_id)})
        if before:
            _emit(broker, before, message)
        if per_message is None:
            queued = groups.get(message.queue_name)
            if queued is None:
                queued = groups[message.queue_name] = []
            queued.append(message)
        else:
            by_queue.setdefault((message.queue_name, per_message(message)), []).append(message)
        pending += 1
        if pending >= ENQUEUE_CHUNK:
            sent += flush()
            by_queue, groups, pending = {}, {}, 0
    if pending:
        sent += flush()
    return sent


def discard_messages(broker: RedisBroker, sent: dict[str, list[str]]) -> int:
    """Remove messages by id, per queue (what an ``EnqueueError`` names), as far as no worker has
    them yet; ids no longer there are skipped. Returns how many were removed."""
    script = getattr(broker, "_conclave_discard", None)
    if script is None:
        script = broker.client.register_script(_DISCARD)
        broker._conclave_discard = script  # type: ignore[attr-defined]
    pipe = broker.client.pipeline(transaction=False)
    # A lane keeps ids whose body is gone: its refill skips them.
    for queue_name, ids in sent.items():
        queue_keys = [
            keys.queue(broker.namespace, queue_name),
            keys.queue_messages(broker.namespace, queue_name),
        ]
        for i in range(0, len(ids), BULK_CHUNK):
            script(keys=queue_keys, args=ids[i : i + BULK_CHUNK], client=pipe)
    return sum(pipe.execute())


def _hooks(broker: RedisBroker, name: str) -> list[Any]:
    """The middleware that define the hook: what ``broker.emit_before``/``emit_after`` would call
    (the others are the base class's no-op), without a loop over every middleware per message."""
    base = getattr(dramatiq.Middleware, name)
    return [getattr(m, name) for m in broker.middleware if getattr(type(m), name, base) is not base]


def bulk_script(broker: RedisBroker) -> Any:
    script = getattr(broker, "_conclave_bulk_enqueue", None)
    if script is None:
        script = broker.client.register_script(_BULK_ENQUEUE)
        broker._conclave_bulk_enqueue = script  # type: ignore[attr-defined]
    return script


def _flush(broker: RedisBroker, script: Any, by_queue: dict[tuple[str, Lane | None], list[Message]]) -> int:
    pipe = broker.client.pipeline(transaction=False)
    lane_sha = ""
    if any(lane for _, lane in by_queue):
        # A pipeline mixing two scripts must not meet NOSCRIPT for one and run the other: load
        # both on this process's first use (after a Redis restart both are gone: nothing runs).
        if not broker.__dict__.get("_conclave_scripts_loaded"):
            preload(broker)
            broker.__dict__["_conclave_scripts_loaded"] = True
        lane_sha = fair.enqueue_script_sha(broker)
    for (queue_name, lane), queued in by_queue.items():
        for i in range(0, len(queued), BULK_CHUNK):
            args: list[str | bytes] = []
            for message in queued[i : i + BULK_CHUNK]:
                args.append(message.options["redis_message_id"])
                # orjson writes the same compact JSON as dramatiq's encoder, several times faster;
                # the dict is Message.asdict()'s, built without its dataclasses.fields() walk.
                args.append(orjson.dumps(_body(message)))
            if lane is None:
                full = keys.queue(broker.namespace, queue_name)
                pipe.evalsha(script.sha, 2, full, keys.queue_messages(broker.namespace, queue_name), *args)
            else:
                lane_keys = fair.lane_prefix_keys(broker, queue_name)
                pipe.evalsha(lane_sha, 3, *lane_keys, *fair.lane_enqueue_args(lane), *args)
    try:
        pipe.execute()
    except NoScriptError:
        # Redis restarted and forgot the scripts: nothing in the pipeline ran (every command is
        # one of them), so load them and send the same pipeline again.
        script.sha = broker.client.script_load(_BULK_ENQUEUE)
        fair.load_enqueue_script(broker)
        return _flush(broker, script, by_queue)
    sent = 0
    for queued in by_queue.values():
        sent += _after_enqueue(broker, queued)
    return sent


def _body(message: Message) -> dict[str, Any]:
    """``message.asdict()``: dramatiq's seven fields, in its order."""
    return {
        "queue_name": message.queue_name,
        "actor_name": message.actor_name,
        "args": message.args,
        "kwargs": message.kwargs,
        "options": message.options,
        "message_id": message.message_id,
        "message_timestamp": message.message_timestamp,
    }


def _after_enqueue(broker: RedisBroker, messages: list[Message]) -> int:
    after = _hooks(broker, "after_enqueue")
    if after:
        for message in messages:
            _emit(broker, after, message)
    return len(messages)


def _emit(broker: RedisBroker, hooks: list[Any], message: Message) -> None:
    # As Broker.emit_before/emit_after: a middleware's failure is logged, not raised, unless
    # it is a MiddlewareError.
    for hook in hooks:
        try:
            hook(broker, message, None)
        except MiddlewareError:
            raise
        except Exception:
            broker.logger.critical("Unexpected failure in %r.", hook, exc_info=True)


def preload(broker: RedisBroker) -> None:
    """Load the bulk scripts now, so the first enqueue does not meet NOSCRIPT (raises RedisError)."""
    bulk_script(broker).sha = broker.client.script_load(_BULK_ENQUEUE)
    fair.load_enqueue_script(broker)
