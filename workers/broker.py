"""The worker's side of the queues: dramatiq's Redis broker with consumers that share the
process's thread budget, so priority holds inside one pool. (What producers send, and how,
is the queue contract in ``shared/queue/``.)

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

import os
import threading
import time
from typing import Any

import dramatiq
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message
from dramatiq.middleware import AsyncIO, CurrentMessage, ShutdownNotifications, TimeLimit
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.queue.broker import make_broker
from shared.queue.contract import HIGH_RESERVE, HIGH_RESERVE_ENV, serves_high_and_lower, time_limit_ms
from shared.queue.fair import refill
from shared.settings import PRIORITIES, Settings

# _RedisConsumer is private to dramatiq: the pin in pyproject.toml (dramatiq 2.2.x) is the
# version whose ``__next__`` ``_BudgetedConsumer`` mirrors.


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

    Its ``__next__`` mirrors dramatiq 2.x's, with two changes: when the budget is spent it
    waits for an acknowledgement (not a growing back-off), so a freed thread is refilled at once;
    and each fetch first tops the queue up from the fair lanes (``shared/queue/fair.py``).
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
                    # Fetched under the lock, so two consumers cannot both spend the same room;
                    # the fair lanes decide, now, whose work that room goes to.
                    refill(self.broker, self.queue_name, want)
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


def make_worker_broker(settings: Settings, extra: list[dramatiq.Middleware] | None = None) -> RedisBroker:
    """The worker process's broker: budgeted consumers, the time limit derived from the lease."""
    middleware: list[dramatiq.Middleware] = [
        TimeLimit(time_limit=time_limit_ms(settings.query_lease_seconds)),
        ShutdownNotifications(),
        CurrentMessage(),
        AsyncIO(),
        HighReserve(),
        *(extra or []),
    ]
    return make_broker(
        settings.redis_url, settings.queue_namespace, broker_class=ConclaveBroker, middleware=middleware
    )
