"""Which failed queries wait out an open circuit, and for how long."""

from __future__ import annotations

from shared.ledger import CallRecord
from workers.runner import CIRCUIT_REQUEUES, circuit_requeue_delay


def call(category: str | None) -> CallRecord:
    return CallRecord(
        model="sim:alpha",
        stage="answer",
        attempt=1,
        status="failed" if category else "succeeded",
        error_category=category,
        latency_ms=1,
        input_tokens=0,
        output_tokens=0,
        cost_usd=0.0,
        created_at=0,
    )


def test_a_query_failed_behind_an_open_circuit_waits_longer_each_time_then_gives_up() -> None:
    calls = [call(None), call("circuit_open"), call("circuit_open")]
    delays = [circuit_requeue_delay(a, "failed", calls) for a in range(1, CIRCUIT_REQUEUES + 1)]
    for attempt, delay in enumerate(delays, start=1):
        base = 2 * 2 ** (attempt - 1)
        assert base + 1 <= delay <= base * 1.5 + 1
    assert circuit_requeue_delay(CIRCUIT_REQUEUES + 1, "failed", calls) == 0


def test_other_failures_and_successes_are_recorded_at_once() -> None:
    assert circuit_requeue_delay(1, "failed", [call("server"), call("timeout")]) == 0
    assert circuit_requeue_delay(1, "succeeded", [call("circuit_open"), call(None)]) == 0
