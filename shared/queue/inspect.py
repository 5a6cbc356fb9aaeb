"""What Redis holds of the queues: depths, delayed and dead-lettered messages, whether a
query's message still exists, and dramatiq's queue maintenance (requeueing a dead worker's
unacknowledged messages). The only reader of dramatiq's Redis layout besides dramatiq itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis

from shared import keys
from shared.settings import PRIORITIES, Priority


@dataclass(frozen=True)
class QueueStats:
    queue: str
    depth: int  # waiting: on the queue's list or in its fair lanes
    delayed: int
    dead_lettered: int
    in_flight: int  # stored but not waiting: held by workers


def messages_exist(broker: RedisBroker, items: list[tuple[str, Priority]]) -> list[bool]:
    """For (query_id, priority) pairs: does the query's message still exist in Redis?"""
    pipe = broker.client.pipeline(transaction=False)
    for query_id, priority in items:
        pipe.hexists(keys.queue_messages(broker.namespace, priority), query_id)
    return [bool(x) for x in pipe.execute()]


def queue_depths(broker: RedisBroker) -> dict[str, int]:
    """Messages waiting per priority: on the queue's list or in its fair lanes (not yet fetched)."""
    pipe = broker.client.pipeline(transaction=False)
    for priority in PRIORITIES:
        pipe.llen(keys.queue(broker.namespace, priority))
        pipe.llen(keys.fair_depth(broker.namespace, priority))
    results = pipe.execute()
    return {p: results[2 * i] + results[2 * i + 1] for i, p in enumerate(PRIORITIES)}


def queue_stats(broker: RedisBroker) -> list[QueueStats]:
    ns = broker.namespace
    pipe = broker.client.pipeline(transaction=False)
    for p in PRIORITIES:
        pipe.llen(keys.queue(ns, p))
        pipe.llen(keys.fair_depth(ns, p))
        # A delay queue is a queue of its own in dramatiq's layout: its stored messages are
        # every delayed one, waiting or held by the consumer that releases them when due.
        pipe.hlen(keys.queue_messages(ns, keys.delayed_queue_name(p)))
        pipe.zcard(keys.dead_lettered(ns, p))
        pipe.hlen(keys.queue_messages(ns, p))
    results = pipe.execute()
    stats = []
    for i, p in enumerate(PRIORITIES):
        listed, laned, delayed, dead, stored = results[i * 5 : i * 5 + 5]
        depth = listed + laned
        stats.append(QueueStats(p, depth, delayed, dead, max(0, stored - depth)))
    return stats


def run_maintenance(broker: RedisBroker, dead_after_ms: int) -> None:
    """dramatiq's own maintenance on every queue: messages of consumers silent for
    ``dead_after_ms`` go back to their queue now rather than at some random later time.
    Raises ``redis.RedisError`` when Redis is out of reach."""
    dispatch = broker.scripts["dispatch"]
    for priority in PRIORITIES:
        dispatch(
            keys=[broker.namespace],
            args=[
                "qsize",
                current_millis(),
                priority,
                broker.broker_id,
                dead_after_ms,
                broker.dead_message_ttl,
                1,
                broker._max_unpack_size(),
            ],
        )
