"""The API's bulk enqueue writes exactly what dramatiq's own consumer reads: every message once,
to its priority's queue, with its actor, query id and trace — and survives Redis forgetting
the script; a failed enqueue can take back what it sent."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker
from dramatiq.message import Message

from shared import keys
from shared.queue.broker import make_broker
from shared.queue.contract import query_message
from shared.queue.enqueue import BULK_CHUNK, ENQUEUE_CHUNK, discard_messages, enqueue_messages
from shared.settings import Priority

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(redis_url: str) -> Iterator[RedisBroker]:
    ns = f"enqtest-{uuid.uuid4().hex[:8]}"
    broker = make_broker(redis_url, ns)
    yield broker
    keys = list(broker.client.scan_iter(f"{ns}*", count=1000))
    if keys:
        broker.client.delete(*keys)
    broker.close()


def drain(broker: RedisBroker, queue: str) -> list[tuple[str, str, tuple[str, ...], dict[str, object]]]:
    consumer = broker.consume(queue, prefetch=500, timeout=100)
    seen = []
    while True:
        message = next(consumer)
        if message is None:
            break
        seen.append((message.message_id, message.actor_name, message.args, message.options))
        consumer.ack(message)
    consumer.close()
    return seen


def test_every_message_arrives_once_on_its_own_queue(broker: RedisBroker) -> None:
    # More than one pipeline and more than one script chunk per queue, priorities interleaved.
    count = ENQUEUE_CHUNK + BULK_CHUNK + 7
    priorities: tuple[Priority, ...] = ("high", "normal", "low")
    messages = [
        query_message(f"query_{i:06d}", priorities[i % 3], {"traceparent": f"00-{i:032x}-{i:016x}-01"})
        for i in range(count)
    ]
    assert enqueue_messages(broker, messages) == count

    for p_index, priority in enumerate(priorities):
        seen = drain(broker, priority)
        expected = [f"query_{i:06d}" for i in range(count) if i % 3 == p_index]
        assert [s[0] for s in seen] == expected  # in order, each once
        assert {s[1] for s in seen} == {f"run_query_{priority}"}
        assert all(s[2] == (s[0],) for s in seen)
        assert all(s[3]["redis_message_id"] == s[0] for s in seen)
        assert seen[0][3]["trace"] == {"traceparent": f"00-{p_index:032x}-{p_index:016x}-01"}


def test_a_script_redis_forgot_is_loaded_again(broker: RedisBroker) -> None:
    # Stands in for a Redis restart (SCRIPT FLUSH would touch every other user of this server).
    broker._conclave_bulk_enqueue.sha = "0" * 40
    assert (
        enqueue_messages(broker, [query_message("query_a", "normal"), query_message("query_b", "normal")])
        == 2
    )
    assert [s[0] for s in drain(broker, "normal")] == ["query_a", "query_b"]


def test_enqueue_middleware_sees_every_message(broker: RedisBroker) -> None:
    seen: list[tuple[str, str]] = []

    class Audit(dramatiq.Middleware):
        def before_enqueue(self, broker: object, message: Message, delay: object) -> None:
            seen.append(("before", message.message_id))

        def after_enqueue(self, broker: object, message: Message, delay: object) -> None:
            seen.append(("after", message.message_id))

    broker.add_middleware(Audit())
    enqueue_messages(broker, [query_message("query_a", "low"), query_message("query_b", "low")])
    assert sorted(seen) == [
        ("after", "query_a"),
        ("after", "query_b"),
        ("before", "query_a"),
        ("before", "query_b"),
    ]


def test_discarded_messages_are_gone_and_others_stay(broker: RedisBroker) -> None:
    count = BULK_CHUNK + 5  # more than one script run
    enqueue_messages(broker, [query_message(f"query_{i:05d}", "normal") for i in range(count)])
    enqueue_messages(broker, [query_message("query_keep", "normal"), query_message("query_high", "high")])
    consumer = broker.consume("normal", prefetch=1, timeout=100)
    fetched = next(consumer)  # held by a worker: no longer in the list
    assert fetched is not None and fetched.message_id == "query_00000"

    ids = [f"query_{i:05d}" for i in range(count)] + ["query_never_sent"]
    assert discard_messages(broker, {"normal": ids}) == count
    consumer.ack(fetched)
    consumer.close()
    assert broker.client.lrange(keys.queue(broker.namespace, "normal"), 0, -1) == [b"query_keep"]
    assert broker.client.hkeys(keys.queue_messages(broker.namespace, "normal")) == [b"query_keep"]
    assert [s[0] for s in drain(broker, "high")] == ["query_high"]
