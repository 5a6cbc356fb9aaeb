"""Which failed queries wait out an open circuit, and for how long: the breaker's cooldown with
jitter, until the batch's window is close; then the circuit is the query's error."""

from __future__ import annotations

import random

from shared.ledger import CallRecord
from workers.runner import CIRCUIT_WINDOW_MARGIN_S, CircuitWait, circuit_wait


def call(category: str | None, model: str = "sim:alpha") -> CallRecord:
    return CallRecord(
        model=model,
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


# -- waits that follow the breaker until the batch's window is close ---------------------------

NOW = 1_800_000_000.0
DAY = 86_400
BEHIND_CIRCUIT = [call(None), call("circuit_open", "p2:beta"), call("circuit_open", "p2:beta")]
ERROR = {"type": "insufficient_answers", "message": "1 of 2 members answered, 2 needed"}


def wait(
    cooldown_s: float,
    expires_in: float = DAY,
    calls: list[CallRecord] = BEHIND_CIRCUIT,
    status: str = "failed",
    seed: int = 7,
) -> CircuitWait:
    return circuit_wait(
        status,
        ERROR if status == "failed" else None,
        calls,
        cooldown_s=cooldown_s,
        now=NOW,
        expires_at=int(NOW + expires_in),
        rng=random.Random(seed),
    )


def test_a_query_behind_an_open_circuit_waits_for_its_cooldown_with_jitter() -> None:
    delays = [wait(240.0, seed=seed).requeue_in_s for seed in range(200)]

    assert all(240 <= d <= 360 for d in delays)
    assert len(set(delays)) > 50  # spread out, so the herd does not come back at once
    assert all(wait(240.0, seed=seed).error is None for seed in range(5))


def test_it_keeps_waiting_for_as_long_as_the_window_allows() -> None:
    # However many times it has waited: only the window ends the waits (four fixed ones did).
    assert wait(15.0, expires_in=DAY).requeue_in_s >= 15
    assert wait(15.0, expires_in=CIRCUIT_WINDOW_MARGIN_S + 16).requeue_in_s >= 15


def test_a_closed_or_probing_circuit_brings_the_query_back_soon() -> None:
    delays = {wait(0.0, seed=seed).requeue_in_s for seed in range(50)}

    assert delays <= {2, 3} and delays


def test_the_last_wait_ends_in_time_for_a_last_run_before_the_window_closes() -> None:
    left = CIRCUIT_WINDOW_MARGIN_S + 250  # the cooldown fits; 0-50% of jitter would not

    delays = {wait(240.0, expires_in=left, seed=seed).requeue_in_s for seed in range(50)}

    assert min(delays) >= 240 and max(delays) == 250


def test_near_the_end_of_the_window_the_query_fails_with_the_circuit_as_its_error() -> None:
    verdict = wait(240.0, expires_in=CIRCUIT_WINDOW_MARGIN_S + 200)

    assert verdict.requeue_in_s == 0
    assert verdict.error == {
        "type": "circuit_open",
        "message": "circuit open for p2: it rests 240 s more and the batch's window closes in 320 s "
        "(last run: 1 of 2 members answered, 2 needed)",
    }
    assert wait(5.0, expires_in=-30).error is not None  # past its window: no wait at all


def test_failures_of_other_kinds_and_successes_are_recorded_as_they_are() -> None:
    assert wait(240.0, calls=[call("server"), call("timeout")]) == CircuitWait()
    assert wait(240.0, status="succeeded") == CircuitWait()
