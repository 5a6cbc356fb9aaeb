"""The worker's call journal: every provider call is in the ledger before it is sent, and its
completion reaches the ledger whatever then happens to its query.

``started`` (awaited on the event loop, just before the request goes out) writes the call's
in-flight row; ``finished`` (never blocks) queues its completion. One flusher thread writes
whatever queued up while it was busy in one transaction, like ``workers/coalesce.py`` (no timer:
an idle worker adds no latency, a busy one writes in larger groups). The outcome write of a query
takes the completions still queued (``take_finished``) into its own transaction, so a batch
finalised right after sees its whole cost.

Why not only at the outcome, as before: a query killed by its time limit, or whose outcome write
failed four times, dropped its calls, and a ``kill -9`` lost the calls of every query its worker
held, although every one of them had reached a provider and cost money.

Fenced (``shared/ledger.py``): a start of a call whose query is no longer held by this worker
(reconciliation judged it dead and handed the query on, as after a network partition) is refused,
and ``started`` raises ``LeaseLost`` so the call is never sent; a completion of a call that was
abandoned meanwhile is refused and dropped. Both are logged by the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.db import write_transaction
from shared.ledger import CallRecord, LeaseLost, StartedCall, finish_calls, start_calls
from workers.coalesce import FlushThread

log = logging.getLogger("conclave.worker")

WRITE_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.2

_Start = tuple[StartedCall, asyncio.AbstractEventLoop, asyncio.Future[None]]
_Work = tuple[list[_Start], list[CallRecord]]  # a flush: in-flight rows to write, completions


class CallJournal(FlushThread[_Work]):
    def __init__(self, sessions: sessionmaker[Session]):
        super().__init__("conclave-journal")
        self._sessions = sessions
        self._starts: list[_Start] = []
        self._finished: list[CallRecord] = []
        self._thread.start()
        self.groups = 0  # flushes run (for tests)

    async def started(self, call: StartedCall) -> None:
        """Returns once the call's in-flight row is committed; raises what the write raised, or
        ``LeaseLost`` when the call's query is no longer this worker's (the call must not go out)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the call journal is closed")
            self._starts.append((call, loop, future))
            self._ready.notify()
        await future

    def finished(self, call: CallRecord) -> None:
        if call.call_key is None:
            return  # never sent: its query's outcome records it
        with self._ready:
            self._finished.append(call)
            self._ready.notify()

    def take_finished(self) -> list[CallRecord]:
        """The completions not yet written, for the caller to write in its own transaction; give
        them back with ``restore`` if that transaction fails."""
        with self._ready:
            taken, self._finished = self._finished, []
        return taken

    def restore(self, calls: Sequence[CallRecord]) -> None:
        if calls:
            with self._ready:
                self._finished[:0] = calls
                self._ready.notify()

    def _queued(self) -> bool:
        return bool(self._starts or self._finished)

    def _take(self) -> _Work:
        starts, self._starts = self._starts, []
        finished, self._finished = self._finished, []
        return starts, finished

    def _handle(self, work: _Work) -> None:
        starts, finished = work
        self.groups += 1
        error, refused = self._write([s for s, _, _ in starts], finished)
        if error is not None:
            self.restore(finished)
        for call, loop, future in starts:
            lost = (
                LeaseLost(f"query {call.owner.query_id} was handed on") if call.call_key in refused else None
            )
            loop.call_soon_threadsafe(_settle, future, error or lost)
        if error is not None and finished:
            time.sleep(RETRY_BACKOFF_S)  # the database is in trouble: do not spin on it

    def _write(
        self, starts: list[StartedCall], finished: list[CallRecord]
    ) -> tuple[BaseException | None, set[str]]:
        """The write's error (after its retries), or None and the keys of the starts refused."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with write_transaction(self._sessions) as session:
                    refused = start_calls(session, starts)
                    finish_calls(session, finished)  # refused completions are logged and dropped
                return None, {s.call_key for s in refused}
            except OperationalError as exc:
                rows = len(starts) + len(finished)
                log.warning("writing %d call rows failed (%s)", rows, type(exc).__name__)
                if attempt == WRITE_ATTEMPTS:
                    return exc, set()
                time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
        return None, set()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the call was cancelled while it waited
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
