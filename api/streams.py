"""Batch event streams (SPEC §12): one reader per batch per API process, fanned out to every
stream following that batch.

A ``BatchFeed`` reads the batch through the same read model as ``GET /v1/batches/{id}`` (plus
the stage counts of ``shared.progress``) at most once a second: when a worker's flush announces
a change on the batch's pub/sub channel, or after a second without one (claims, cancels and
expiry announce nothing, and the ETA moves with the clock). Each read is published to the
feed's subscribers by waking them; each stream then writes what it has not sent yet. A stream
costs the process a coroutine and a few bytes per event, never a read of its own.

Event ids carry the whole cursor, so a client reconnecting with ``Last-Event-ID`` to any
replica resumes exactly: ``{answer}.{review}.{synthesis}.{digest}.{finished_at}.{query_id}``
— the stage counts last shown (never shown lower again), a digest of the last progress
document (not sent again unchanged), and the place in the batch's finish order of the last
``query`` event (the order is read from the database, the same on every replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
import orjson
import redis.asyncio as aioredis
from fastapi import Depends, Header, Request
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.deps import AppState
from shared import progress
from shared.batches import read
from shared.lifecycle.statuses import BATCH_TERMINAL
from shared.models import Batch
from shared.progress import FinishedQuery, StageCounts

log = logging.getLogger("conclave.events")

MIN_INTERVAL_S = 1.0  # SPEC: progress at most once a second
POLL_S = 1.0  # a read without an announcement after this long
MIN_READ_GAP_S = 0.1  # between two reads of one batch, whatever wakes the reader
KEEPALIVE_S = 15.0
QUERY_PAGE = 10_000


# ---------------------------------------------------------------- event ids


@dataclass(frozen=True)
class Cursor:
    stages: tuple[int, int, int] = (0, 0, 0)
    digest: str = ""
    query: tuple[int, str] | None = None

    def encode(self, digest: str | None = None) -> str:
        ts, qid = self.query or (0, "")
        a, r, s = self.stages
        return f"{a}.{r}.{s}.{self.digest if digest is None else digest}.{ts}.{qid}"

    @classmethod
    def parse(cls, raw: str | None) -> Cursor:
        """A malformed id is treated as none: the stream starts from the beginning."""
        if not raw:
            return cls()
        parts = raw.strip().split(".")
        if len(parts) != 6 or not all(p.isdigit() for p in (*parts[:3], parts[4])):
            return cls()
        a, r, s, digest, ts, qid = parts
        return cls((int(a), int(r), int(s)), digest, (int(ts), qid) if qid else None)

    def floor(self, total: int) -> StageCounts:
        return StageCounts(*self.stages, total=total)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=6).hexdigest()


def _frame(event: str, event_id: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\nid: " + event_id.encode() + b"\ndata: " + data + b"\n\n"


# ---------------------------------------------------------------- one reader per batch


@dataclass
class Snapshot:
    batch: dict[str, Any]
    stages: StageCounts
    finished: list[FinishedQuery]
    terminal: bool


@dataclass
class BatchFeed:
    """The latest state of one batch in this process, shared by all its streams."""

    hub: ProgressHub
    batch_id: str
    subscribers: int = 0
    want_queries: bool = False
    batch: dict[str, Any] | None = None
    stages: StageCounts | None = None
    progress_data: bytes = b""
    progress_digest: str = ""
    progress_frame: bytes = b""
    queries: list[FinishedQuery] = field(default_factory=list)
    query_index: dict[str, int] = field(default_factory=dict)
    queries_loaded: bool = False
    end: dict[str, Any] | None = None
    reads: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        # The once-a-second budget is spent only by reads that found a change: were a poll that
        # found none to count, reads would lock in step just behind the workers' flushes and
        # every announced change would wait most of a second.
        last_change = last_read = -MIN_INTERVAL_S
        while self.subscribers > 0:
            now = time.monotonic()
            await asyncio.sleep(
                max(0.0, last_change + MIN_INTERVAL_S - now, last_read + MIN_READ_GAP_S - now)
            )
            self.wake.clear()
            last_read = time.monotonic()
            try:
                snap = await run_in_threadpool(self._read)
            except Exception as exc:  # the database or Redis is down: try again on the next tick
                log.warning("reading batch %s for its streams failed (%s)", self.batch_id, type(exc).__name__)
            else:
                if self._apply(snap):
                    last_change = last_read
                if self.end is not None:
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_S)

    def _read(self) -> Snapshot:
        hub = self.hub
        with hub.state.sessions() as session:
            row = session.get(Batch, self.batch_id)
            if row is None:
                raise LookupError(self.batch_id)
            batch = read.batch_object(row, read.counts_for(session, [row.id])[row.id])
            terminal = row.status in BATCH_TERMINAL
            finished: list[FinishedQuery] = []
            if self.want_queries:
                after = None
                if self.queries:
                    last = self.queries[-1]
                    after = (last.finished_at, last.query_id)
                before = (
                    None if terminal else progress.settled_before(session, self.batch_id, int(time.time()))
                )
                while True:
                    page = progress.finished_queries(session, self.batch_id, after, before, QUERY_PAGE)
                    finished.extend(page)
                    if len(page) < QUERY_PAGE:
                        break
                    after = (page[-1].finished_at, page[-1].query_id)
        sets = progress.read_stage_sets(hub.state.broker.client, hub.namespace, self.batch_id)
        return Snapshot(batch, progress.stage_counts(sets, batch), finished, terminal)

    def _apply(self, snap: Snapshot) -> bool:
        """Take a read; True when subscribers have something new."""
        self.reads += 1
        stages = snap.stages.at_least(self.stages)
        self.stages = stages
        data = orjson.dumps(progress.progress_document(snap.batch, stages))
        digest = _digest(data)
        changed = digest != self.progress_digest
        self.batch, self.progress_data, self.progress_digest = snap.batch, data, digest
        if self.want_queries:
            for q in snap.finished:
                self.query_index[q.query_id] = len(self.queries)
                self.queries.append(q)
            changed = changed or bool(snap.finished) or not self.queries_loaded
            self.queries_loaded = True
        if snap.terminal:
            self.end = snap.batch
            changed = True
        if changed:
            # Most streams follow progress only and were shown no more than the feed: one frame
            # serves them all.
            shown = (stages.answer, stages.review, stages.synthesis)
            self.progress_frame = _frame("progress", Cursor(shown, digest).encode(), data)
            self.changed.set()
            self.changed = asyncio.Event()
        return changed

    def position_after(self, cursor: tuple[int, str] | None) -> int:
        """Index of the first query event after ``cursor`` in this feed's finish order."""
        if cursor is None:
            return 0
        found = self.query_index.get(cursor[1])
        if found is not None:
            return found + 1
        return next(
            (i for i, q in enumerate(self.queries) if (q.finished_at, q.query_id) > cursor), len(self.queries)
        )


class ProgressHub:
    """This process's feeds, and the one pub/sub subscription that wakes them."""

    def __init__(self, state: AppState):
        self.state = state
        self.namespace = state.settings.queue_namespace
        self.feeds: dict[str, BatchFeed] = {}
        self._listener: asyncio.Task[None] | None = None
        # Set by sse-starlette when the server shuts down: every stream then ends cleanly (the
        # client resumes on another replica) instead of holding the shutdown up.
        self.shutdown: anyio.Event | None = None
        self.closing = False
        self._closer: asyncio.Task[None] | None = None

    def start(self) -> anyio.Event:
        """Start the process's subscription (once, on the running loop); returns the shutdown event."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())
        if self.shutdown is None:
            self.shutdown = anyio.Event()
            self._closer = asyncio.create_task(self._close_on_shutdown(self.shutdown))
        return self.shutdown

    @contextlib.asynccontextmanager
    async def follow(self, batch_id: str, want_queries: bool) -> AsyncIterator[BatchFeed]:
        self.start()
        feed = self.feeds.get(batch_id)
        if feed is None:
            feed = self.feeds[batch_id] = BatchFeed(self, batch_id)
        feed.subscribers += 1
        if want_queries and not feed.want_queries:
            feed.want_queries = True
            feed.wake.set()
        if feed.task is None or feed.task.done():
            feed.task = asyncio.create_task(feed.run())
        try:
            yield feed
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0:
                # The last stream left: the reader ends on its next turn; a new stream starts afresh.
                if self.feeds.get(batch_id) is feed:
                    del self.feeds[batch_id]
                feed.wake.set()

    async def _close_on_shutdown(self, shutdown: anyio.Event) -> None:
        await shutdown.wait()
        self.closing = True
        for feed in list(self.feeds.values()):
            feed.changed.set()

    async def _listen(self) -> None:
        """Wake a feed when a worker announces a change to its batch; without Redis, feeds poll."""
        pattern = progress.changed_channel(self.namespace, "*")
        while True:
            client = aioredis.Redis.from_url(self.state.settings.redis_url)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.psubscribe(pattern)
                async for message in pubsub.listen():
                    channel = message.get("channel")
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    feed = self.feeds.get(progress.batch_of_channel(self.namespace, str(channel)))
                    if feed is not None:
                        feed.wake.set()
            except (RedisError, OSError) as exc:
                log.warning("progress subscription lost (%s); retrying", type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(1.0)


def hub_of(request: Request) -> ProgressHub:
    hub: ProgressHub | None = getattr(request.app.state, "progress_hub", None)
    if hub is None:
        hub = request.app.state.progress_hub = ProgressHub(request.app.state.conclave)
    return hub


# ---------------------------------------------------------------- one stream


async def _events(feed_ctx: Any, cursor: Cursor, want_queries: bool) -> AsyncIterator[bytes]:
    async with feed_ctx as feed:
        qcursor = cursor.query
        sent_digest = cursor.digest
        last_progress = -MIN_INTERVAL_S
        last_write = time.monotonic()
        pos: int | None = None
        yield b"retry: 2000\n\n"
        while not feed.hub.closing:
            waiter = feed.changed
            out: list[bytes] = []
            if want_queries and feed.queries_loaded:
                if pos is None:
                    pos = feed.position_after(qcursor)
                for q in feed.queries[pos:]:
                    at = (q.finished_at, q.query_id)
                    if qcursor is not None and at <= qcursor:
                        # Sent already: a client resuming here was ahead of this replica's feed
                        # (its cursor not loaded yet), and the feed has caught up to it since.
                        continue
                    qcursor = at
                    out.append(
                        _frame("query", _id(feed, cursor, qcursor, sent_digest), orjson.dumps(q.as_dict()))
                    )
                pos = len(feed.queries)
            now = time.monotonic()
            delay = None
            if feed.batch is not None:
                data, digest = _progress_for(feed, cursor)
                if digest != sent_digest:
                    if now - last_progress >= MIN_INTERVAL_S or feed.end is not None:
                        shared_frame = qcursor is None and digest == feed.progress_digest
                        sent_digest = digest
                        out.append(
                            feed.progress_frame
                            if shared_frame
                            else _frame("progress", _id(feed, cursor, qcursor, sent_digest), data)
                        )
                        last_progress = now
                    else:
                        delay = last_progress + MIN_INTERVAL_S - now
            if feed.end is not None and (not want_queries or feed.queries_loaded):
                # The same cursor as the last progress: a client reconnecting after the end is sent
                # the end again and nothing else.
                out.append(_frame("end", _id(feed, cursor, qcursor, sent_digest), orjson.dumps(feed.end)))
                yield b"".join(out)
                return
            if out:
                yield b"".join(out)
                last_write = time.monotonic()
            timeout = KEEPALIVE_S - (time.monotonic() - last_write)
            if delay is not None:
                timeout = min(timeout, delay)
            try:
                await asyncio.wait_for(waiter.wait(), max(0.0, timeout))
            except TimeoutError:
                if time.monotonic() - last_write >= KEEPALIVE_S:
                    yield b": keep-alive\n\n"
                    last_write = time.monotonic()


def _progress_for(feed: BatchFeed, cursor: Cursor) -> tuple[bytes, str]:
    """The feed's progress document, raised to what this client was already shown."""
    assert feed.batch is not None and feed.stages is not None
    floor = cursor.floor(feed.stages.total)
    raised = feed.stages.at_least(floor)
    if raised == feed.stages:
        return feed.progress_data, feed.progress_digest
    data = orjson.dumps(progress.progress_document(feed.batch, raised))
    return data, _digest(data)


def _id(feed: BatchFeed, cursor: Cursor, qcursor: tuple[int, str] | None, digest: str) -> str:
    stages = feed.stages.at_least(cursor.floor(feed.stages.total)) if feed.stages else None
    shown = (stages.answer, stages.review, stages.synthesis) if stages else cursor.stages
    return Cursor(shown, digest, qcursor).encode()


@dataclass(frozen=True)
class StreamAsk:
    """What a client asks of a batch's stream, read the same way by the API's route and the
    dashboard's: ``?queries=true`` for a ``query`` event per finished query, and ``Last-Event-ID``
    to resume after the event a client last saw."""

    request: Request
    queries: bool
    last_event_id: str | None


async def stream_ask(  # async: FastAPI would run a plain def in its thread pool
    request: Request,
    queries: bool = False,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=256)] = None,
) -> StreamAsk:
    return StreamAsk(request, queries, last_event_id)


StreamAskDep = Annotated[StreamAsk, Depends(stream_ask)]


async def open_stream(ask: StreamAsk, state: AppState, tenant_id: str, batch_id: str) -> EventSourceResponse:
    """The event stream of one of the tenant's batches (404 for anyone else's, before any byte)."""

    def check() -> None:
        with state.sessions() as session:
            read.get_batch(session, tenant_id, batch_id)

    await run_in_threadpool(check)
    hub = hub_of(ask.request)
    feed = hub.follow(batch_id, ask.queries)
    body = _events(feed, Cursor.parse(ask.last_event_id), ask.queries)
    # sse-starlette ends the stream when the server shuts down (uvicorn would otherwise wait for
    # every open stream to close); keep-alives are ours (sent only when a stream is idle).
    return EventSourceResponse(body, ping=0, shutdown_event=hub.start(), shutdown_grace_period=2.0)
