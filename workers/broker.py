"""The dramatiq Redis broker, its queues, and the pipelined bulk enqueue the API uses.

One queue per priority (``high``, ``normal``, ``low``): dramatiq's Redis broker has no
per-message priority, so a worker pool chooses what it serves by the queues it consumes, and
within one process the actor priority orders what it has prefetched (high before normal
before low).

Ordering prefetched work is not enough: a query holds its thread for its whole council
(seconds), so a pool saturated with ``low`` work made a ``high`` query wait for a thread until
a whole wave of low queries ended — about 2× its idle makespan in ``benchmarks/priority.py``.
A process that serves ``high`` and a lower queue therefore has threads kept for ``high``: an
eighth more than ``--threads`` when started by ``conclave worker`` (an eighth of its threads
when started as plain ``dramatiq``). Its ``normal`` and ``low`` consumers together stop fetching
once they hold the other threads' worth of messages, and fetch again the moment one is
acknowledged; and a process
fetches a ``high`` message only when it has a thread free for it, so high work lands on the
processes that can start it now (``_Budget``).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import dramatiq
import orjson
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message
from dramatiq.middleware import AsyncIO, CurrentMessage, MiddlewareError, ShutdownNotifications, TimeLimit
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from shared.settings import PRIORITIES, Priority

# Actor priority within one worker process: lower runs first.
ACTOR_PRIORITY = {"high": 0, "normal": 10, "low": 20}
ACTOR_NAMES = {p: f"run_query_{p}" for p in PRIORITIES}
QUERY_TIME_LIMIT_MS = 15 * 60 * 1000

# Lua's unpack and Redis argument lists are bounded; a pipeline flush every few thousand
# messages keeps memory flat for a 50,000-query batch.
ENQUEUE_CHUNK = 5000


# Share of a process's threads kept for high-priority queries when it also serves lower ones.
HIGH_RESERVE = 0.125


class _Budget:
    """How many messages one worker process may hold at once, by kind.

    ``high``: only as many as it has idle threads — a high message fetched by a busy process
    would wait there while another process sits idle. ``normal``/``low`` together: at most
    ``lower_cap`` (the threads minus the reserve when the process serves ``high``; a little
    more than the threads otherwise, so a freed thread finds its next query already here).
    Both are None until the worker boots (a consumer outside a worker is not limited).
    """

    def __init__(self) -> None:
        self.threads: int | None = None
        self.lower_cap: int | None = None
        self.consumers: list[_BudgetedConsumer] = []
        self.changed = threading.Condition()

    def room(self, queue_name: str) -> int:
        if self.threads is None or self.lower_cap is None:
            return 1 << 30
        held = {"high": 0, "lower": 0}
        for c in self.consumers:
            held["high" if c.queue_name == "high" else "lower"] += c.outstanding_message_count
        if queue_name == "high":
            return self.threads - held["high"] - min(held["lower"], self.threads)
        return self.lower_cap - held["lower"]

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()


class _BudgetedConsumer(_RedisConsumer):
    """dramatiq's Redis consumer, fetching only what the process's budget allows.

    Its ``__next__`` mirrors dramatiq 2.x's, with one change: when the budget is spent it
    waits for an acknowledgement (not a growing back-off), so a freed thread is refilled at once.
    """

    def __init__(self, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int, budget: _Budget):
        super().__init__(broker, queue_name, prefetch, timeout)
        self.budget = budget
        with budget.changed:
            budget.consumers.append(self)

    def __next__(self) -> MessageProxy | None:
        try:
            while True:
                if self.message_cache:
                    data = self.message_cache.pop(0)
                    if data is None:
                        continue
                    self.misses = 0
                    message = Message.decode(data)
                    self.queued_message_ids.add(message.message_id)
                    return MessageProxy(message)
                with self.budget.changed:
                    want = min(
                        self.prefetch - self.outstanding_message_count, self.budget.room(self.queue_name)
                    )
                    if want <= 0:
                        self.budget.changed.wait(self.timeout / 1000)
                        return None
                    # Fetched under the lock, so two consumers cannot both spend the same room.
                    self.message_cache = self.broker.do_fetch(self.queue_name, want)
                if self.message_cache:
                    continue
                self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                time.sleep(backoff_ms / 1000)
                return None
        except RedisConnectionError as exc:
            raise ConnectionClosed(exc) from None

    def ack(self, message: MessageProxy) -> None:
        try:
            super().ack(message)
        finally:
            self.budget.notify()

    def nack(self, message: MessageProxy) -> None:
        try:
            super().nack(message)
        finally:
            self.budget.notify()

    def close(self) -> None:
        with self.budget.changed:
            if self in self.budget.consumers:
                self.budget.consumers.remove(self)
        super().close()


class ConclaveBroker(RedisBroker):
    """dramatiq's Redis broker whose priority-queue consumers share the process's budget."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = _Budget()

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        if queue_name in PRIORITIES:  # not the delay queues: they only move messages along
            return _BudgetedConsumer(self, queue_name, prefetch, timeout, self.budget)
        return super().consume(queue_name, prefetch, timeout)


# Set by `conclave worker` for the dramatiq processes it starts: threads kept for `high`.
HIGH_RESERVE_ENV = "CONCLAVE_HIGH_RESERVE_THREADS"


def serves_high_and_lower(queues: Iterable[str]) -> bool:
    served = set(queues)
    return "high" in served and bool(served & {"normal", "low"})


def high_reserve(threads: int, queues: Iterable[str]) -> int:
    """Extra threads a process gets for ``high`` work on top of ``threads`` for the rest."""
    return max(1, math.ceil(threads * HIGH_RESERVE)) if serves_high_and_lower(queues) else 0


class HighReserve(dramatiq.Middleware):
    """Sets the budget when the worker boots, from its thread count and the queues it serves."""

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        if not isinstance(broker, ConclaveBroker):
            return
        serves = worker.consumer_whitelist or set(PRIORITIES)
        threads = worker.worker_threads
        if not serves_high_and_lower(serves):
            reserve = 0
        elif os.environ.get(HIGH_RESERVE_ENV, "").isdigit():
            reserve = int(os.environ[HIGH_RESERVE_ENV])  # added on top by `conclave worker`
        else:
            reserve = max(1, round(threads * HIGH_RESERVE))  # plain `dramatiq`: carved out
        broker.budget.threads = threads
        broker.budget.lower_cap = max(1, threads - reserve) if reserve else threads + threads // 4


def make_broker(redis_url: str, namespace: str = "conclave") -> RedisBroker:
    # The default Retries middleware is deliberately left out: a query retries provider calls
    # inside its own budget, and a lost or crashed query is recovered by reconciliation from
    # the database, not by dramatiq redelivering the message 20 times.
    middleware = [
        TimeLimit(time_limit=QUERY_TIME_LIMIT_MS),
        ShutdownNotifications(),
        CurrentMessage(),
        AsyncIO(),
        HighReserve(),
    ]
    broker = ConclaveBroker(url=redis_url, namespace=namespace, middleware=middleware)
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
    before = _hooks(broker, "before_enqueue")
    for message in messages:
        if "redis_message_id" not in message.options:
            message = message.copy(options={"redis_message_id": str(message.message_id)})
        _emit(broker, before, message)
        by_queue.setdefault(message.queue_name, []).append(message)
        pending += 1
        if pending >= ENQUEUE_CHUNK:
            sent += _flush(broker, script, by_queue)
            by_queue, pending = {}, 0
    if pending:
        sent += _flush(broker, script, by_queue)
    return sent


def _hooks(broker: RedisBroker, name: str) -> list[Any]:
    """The middleware that define the hook: what ``broker.emit_before``/``emit_after`` would call
    (the others are the base class's no-op), without a loop over every middleware per message."""
    base = getattr(dramatiq.Middleware, name)
    return [getattr(m, name) for m in broker.middleware if getattr(type(m), name, base) is not base]


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
    after = _hooks(broker, "after_enqueue")
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
