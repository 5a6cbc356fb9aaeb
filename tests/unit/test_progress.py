"""Stage progress (shared.progress) and event-stream cursors (api.streams), without processes."""

from __future__ import annotations

from types import SimpleNamespace

import fakeredis
import pytest

from api.streams import Cursor
from shared.progress import (
    STAGES,
    ProgressBuffer,
    StageCalls,
    StageCounts,
    changed_channel,
    parse_event_stream,
    read_stage_sets,
    stage_counts,
)


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_marks_are_written_in_one_flush_and_announced_once_per_batch(r: fakeredis.FakeRedis) -> None:
    pubsub = r.pubsub()
    pubsub.subscribe(changed_channel("ns", "b1"))
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    buf = ProgressBuffer(r, "ns")
    buf.passed("b1", "q1", "answer")
    buf.passed("b1", "q2", "review")  # passing review means answer is behind it too
    buf.finished("b1", "q3")
    assert read_stage_sets(r, "ns", "b1") == dict.fromkeys(STAGES, 0)  # nothing written before the flush
    buf.flush()
    assert read_stage_sets(r, "ns", "b1") == {"answer": 3, "review": 2, "synthesis": 1}
    assert pubsub.get_message(timeout=1)["data"] == b"1"
    assert pubsub.get_message(timeout=0.1) is None


def test_a_query_run_twice_counts_once(r: fakeredis.FakeRedis) -> None:
    buf = ProgressBuffer(r, "ns")
    for _ in range(2):
        buf.passed("b1", "q1", "answer")
        buf.flush()
    buf.finished("b1", "q1")
    buf.flush()
    assert read_stage_sets(r, "ns", "b1") == dict.fromkeys(STAGES, 1)


def test_a_flush_without_redis_drops_marks_and_raises_nothing() -> None:
    dead = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    dead.connection_pool.connection_kwargs["server"].connected = False
    buf = ProgressBuffer(dead, "ns")
    buf.passed("b1", "q1", "answer")
    buf.flush()
    assert read_stage_sets(dead, "ns", "b1") == dict.fromkeys(STAGES, 0)


def batch(**counts: int) -> dict:
    base = {"total": 10, "completed": 0, "failed": 0, "queued": 0, "running": 0, "cancelled": 0, "expired": 0}
    return {"request_counts": {**base, **counts}}


def test_stage_counts_add_queries_that_never_ran_and_floor_at_the_terminal_count() -> None:
    # 4 passed answer on workers, 3 were cancelled while queued.
    assert stage_counts(
        {"answer": 4, "review": 1, "synthesis": 0}, batch(cancelled=3, queued=3, running=4)
    ) == (StageCounts(7, 4, 3, 10))
    # Redis lost its sets: what is terminal in the database still counts as past every stage.
    assert stage_counts({}, batch(completed=6, failed=1, running=3)) == StageCounts(7, 7, 7, 10)
    # Overlaps (a running query that expired after passing answer) never exceed the total.
    assert stage_counts({"answer": 10, "review": 10, "synthesis": 10}, batch(completed=8, expired=2)) == (
        StageCounts(10, 10, 10, 10)
    )


def test_counts_never_go_below_what_a_client_was_shown() -> None:
    shown = StageCounts(5, 4, 3, 10)
    assert StageCounts(2, 6, 0, 10).at_least(shown) == StageCounts(5, 6, 3, 10)
    assert StageCounts(2, 6, 0, 10).at_least(None) == StageCounts(2, 6, 0, 10)


def test_event_ids_round_trip_and_bad_ids_start_from_the_beginning() -> None:
    cursor = Cursor((12, 7, 3), "ab12cd34ef56", (1796136267, "query_01abc"))
    assert Cursor.parse(cursor.encode()) == cursor
    assert Cursor.parse(Cursor((1, 0, 0), "d").encode()) == Cursor((1, 0, 0), "d", None)
    for bad in (None, "", "garbage", "1.2.3", "a.b.c.d.e.f", "1.2.3.d.x.q"):
        assert Cursor.parse(bad) == Cursor()


def test_event_stream_parsing() -> None:
    lines = [
        "retry: 2000",
        "",
        ": keep-alive",
        "",
        "event: progress",
        "id: 1",
        'data: {"a": 1}',
        "",
        "data: x",
        "data: y",
        "",
    ]
    assert list(parse_event_stream(lines)) == [
        {"event": "progress", "id": "1", "data": '{"a": 1}'},
        {"event": "message", "data": "x\ny"},
    ]


def test_the_call_list_marks_a_stage_passed_when_the_next_stage_records_a_call(
    r: fakeredis.FakeRedis,
) -> None:
    buf = ProgressBuffer(r, "ns")
    calls = StageCalls(buf, "b1", "q1")
    for stage in ("answer", "answer", "answer"):
        calls.append(SimpleNamespace(stage=stage))
    buf.flush()
    assert read_stage_sets(r, "ns", "b1") == {"answer": 0, "review": 0, "synthesis": 0}
    calls.append(SimpleNamespace(stage="review"))
    buf.flush()
    assert read_stage_sets(r, "ns", "b1") == {"answer": 1, "review": 0, "synthesis": 0}
    calls.append(SimpleNamespace(stage="review"))
    calls.append(SimpleNamespace(stage="synthesis"))
    buf.flush()
    assert read_stage_sets(r, "ns", "b1") == {"answer": 1, "review": 1, "synthesis": 0}
    assert len(calls) == 6  # still the full record of calls
