"""The coalescer groups what many threads submit into few flushes and hands each its own answer."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from tests.helpers import poll
from workers.coalesce import Coalescer


def test_each_thread_gets_the_answer_for_its_own_item() -> None:
    gate = threading.Event()
    groups: list[list[int]] = []

    def flush(items: Sequence[int]) -> list[int]:
        gate.wait(5)  # hold the first group so the others queue up behind it
        groups.append(list(items))
        return [i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer("test", flush)
    answers: dict[int, int] = {}

    def submit(i: int) -> None:
        answers[i] = coalescer.submit(i)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    # Everything is either in the held first group or queued behind it.
    poll(lambda: coalescer.items + len(coalescer._pending) == 50, timeout=5, what="all items submitted")
    gate.set()
    for t in threads:
        t.join(10)
    coalescer.close()

    assert answers == {i: i * 10 for i in range(50)}
    assert sorted(i for g in groups for i in g) == list(range(50))  # each item flushed once
    assert len(groups) == 2  # all that arrived during the first flush went out together


def test_a_failed_flush_raises_in_every_waiting_thread_and_the_next_group_still_runs() -> None:
    calls = 0

    def flush(items: Sequence[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database gone")
        return [s.upper() for s in items]

    coalescer: Coalescer[str, str] = Coalescer("test", flush)
    with pytest.raises(ConnectionError, match="database gone"):
        coalescer.submit("a")
    assert coalescer.submit("b") == "B"
    coalescer.close()
    with pytest.raises(RuntimeError, match="closed"):
        coalescer.submit("c")


def test_groups_are_capped() -> None:
    gate = threading.Event()
    sizes: list[int] = []

    def flush(items: Sequence[int]) -> list[None]:
        gate.wait(5)
        sizes.append(len(items))
        return [None] * len(items)

    coalescer: Coalescer[int, None] = Coalescer("test", flush, max_group=4)
    threads = [threading.Thread(target=coalescer.submit, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    coalescer.close()
    assert sum(sizes) == 20 and max(sizes) <= 4
