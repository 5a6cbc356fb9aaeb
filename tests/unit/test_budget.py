"""A worker process's message budget: lower priorities leave threads free for high work, and a
busy process does not take high messages it cannot start."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from workers.broker import ConclaveBroker, HighReserve, _Budget, low_capacity


def budget_with(threads: int, lower_cap: int, held: dict[str, int]) -> _Budget:
    budget = _Budget()
    budget.threads, budget.lower_cap = threads, lower_cap
    budget.consumers = [
        SimpleNamespace(queue_name=q, outstanding_message_count=n)  # type: ignore[misc]
        for q, n in held.items()
    ]
    return budget


def test_a_saturated_lower_backlog_leaves_the_reserve_to_high() -> None:
    cap = low_capacity(256)
    assert cap == 224
    budget = budget_with(256, cap, {"high": 0, "normal": 100, "low": 124})
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
    ("queues", "expected_cap"),
    [(None, 224), ({"high", "low"}, 224), ({"normal", "low"}, 320), ({"high"}, 320)],
)
def test_the_reserve_applies_only_to_processes_serving_high_and_lower_queues(
    queues: set[str] | None, expected_cap: int
) -> None:
    broker: Any = ConclaveBroker.__new__(ConclaveBroker)
    broker.budget = _Budget()
    HighReserve().before_worker_boot(broker, SimpleNamespace(consumer_whitelist=queues, worker_threads=256))
    assert broker.budget.threads == 256 and broker.budget.lower_cap == expected_cap
