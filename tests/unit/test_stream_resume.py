"""A stream resumed on a replica whose feed is behind the client's cursor (``api/streams.py``):
query events the client already has are not sent again once that feed catches up.

Seen in CI under load: a follower that dropped and resumed on the other API replica received a
handful of query events twice (tests/integration/test_events.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from api.streams import BatchFeed, Cursor, _events
from shared.progress import FinishedQuery


@dataclass
class FakeHub:
    closing: bool = False


@dataclass
class FakeFeed:
    """What ``_events`` reads of a ``BatchFeed``; progress is left out (no batch yet)."""

    hub: FakeHub = field(default_factory=FakeHub)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    queries: list[FinishedQuery] = field(default_factory=list)
    query_index: dict[str, int] = field(default_factory=dict)
    queries_loaded: bool = True
    batch: Any = None
    end: Any = None
    stages: Any = None

    def load(self, *finished: FinishedQuery) -> None:
        for q in finished:
            self.query_index[q.query_id] = len(self.queries)
            self.queries.append(q)
        self.changed.set()
        self.changed = asyncio.Event()

    position_after = BatchFeed.position_after


def q(finished_at: int, n: int) -> FinishedQuery:
    return FinishedQuery(finished_at, f"query_{n:03d}", f"c-{n}", "succeeded")


def test_a_feed_behind_the_cursor_sends_only_what_follows_it() -> None:
    async def scenario() -> list[str]:
        feed = FakeFeed()
        feed.load(q(100, 1), q(100, 2))  # this replica has read up to query 2 so far
        cursor = Cursor((0, 0, 0), "", (101, "query_004"))  # the client saw up to query 4 elsewhere

        @contextlib.asynccontextmanager
        async def ctx() -> AsyncIterator[FakeFeed]:
            yield feed

        sent: list[str] = []

        async def follow() -> None:
            async for chunk in _events(ctx(), cursor, want_queries=True):
                sent.extend(
                    line.split(b'"query_id":"')[1].split(b'"')[0].decode()
                    for line in chunk.split(b"\n")
                    if line.startswith(b"data: ") and b'"query_id"' in line
                )

        task = asyncio.create_task(follow())
        await asyncio.sleep(0)
        feed.load(q(101, 3), q(101, 4), q(102, 5))  # it catches up, past the cursor
        await asyncio.sleep(0)
        feed.end = {"status": "completed"}
        feed.load(q(103, 6))
        await asyncio.wait_for(task, 5)
        return sent

    assert asyncio.run(scenario()) == ["query_005", "query_006"]
