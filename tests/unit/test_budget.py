"""A worker process's message budget: lower priorities leave threads free for high work, and a
busy process does not take high messages it cannot start."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from shared.queue.contract import HIGH_RESERVE_ENV, high_reserve
from workers.broker import ConclaveBroker, HighReserve, _Budget


def budget_with(threads: int, lower_cap: int, held: dict[str, int]) -> _Budget:
    budget = _Budget()
    budget.threads, budget.lower_cap = threads, lower_cap
    budget.consumers = [
        SimpleNamespace(queue_name=q, outstanding_message_count=n)  # type: ignore[misc]
        for q, n in held.items()
    ]
    return budget


def test_a_saturated_lower_backlog_leaves_the_reserve_to_high() -> None:
    assert high_reserve(256, ["high", "normal"]) == 32
    budget = budget_with(288, 256, {"high": 0, "normal": 100, "low": 156})
    assert budget.room("low") == 0 and budget.room("normal") == 0
    assert budget.room("high") == 32


def test_high_is_fetched_only_for_idle_threads() -> None:
    budget = budget_with(256, 224, {"high": 20, "low": 224})
    assert budget.room("high") == 12
    busy = budget_with(64, 80, {"high": 10, "low": 80})  # lower work prefetched past the threads
    assert busy.room("high") <= 0


def test_an_unbooted_budget_does_not_limit() -> None:
    assert _Budget().room("low") > 1_000_000


@pytest.mark.parametrize(
    ("queues", "reserve_env", "expected_cap"),
    [
        (None, "32", 256),  # `conclave worker --threads 256` on every queue: 288 threads
        ({"high", "low"}, "32", 256),
        ({"high", "low"}, None, 252),  # plain dramatiq --threads 288: an eighth carved out
        ({"normal", "low"}, None, 360),  # no high: no reserve, a quarter prefetched
        ({"high"}, None, 360),
    ],
)
def test_the_reserve_applies_only_to_processes_serving_high_and_lower_queues(
    queues: set[str] | None, reserve_env: str | None, expected_cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if reserve_env is None:
        monkeypatch.delenv(HIGH_RESERVE_ENV, raising=False)
    else:
        monkeypatch.setenv(HIGH_RESERVE_ENV, reserve_env)
    broker: Any = ConclaveBroker.__new__(ConclaveBroker)
    broker.budget = _Budget()
    HighReserve().before_worker_boot(broker, SimpleNamespace(consumer_whitelist=queues, worker_threads=288))
    assert broker.budget.threads == 288 and broker.budget.lower_cap == expected_cap


def test_conclave_worker_adds_the_reserve_only_when_high_shares_the_process() -> None:
    assert high_reserve(64, ["normal", "high"]) == 8
    assert high_reserve(1, ["high", "low"]) == 1
    assert high_reserve(64, ["high"]) == 0 and high_reserve(64, ["normal", "low"]) == 0
