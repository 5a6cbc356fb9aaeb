"""Group the database writes of a worker process's many in-flight queries into few transactions.

A worker holds hundreds of queries at once; each used to open its own transaction to claim
itself, another to record its outcome and a third to finalise its batch — three pool
checkouts, three commits (three fsyncs on SQLite, three round trips plus a ping on
PostgreSQL) per query, which was most of the worker's CPU per provider call
(``benchmarks/council.py``). Here every thread hands its item to one flusher thread and waits;
the flusher takes *everything* that queued up while it was busy and writes it in one
transaction. The batching is natural: no timer, so an idle worker adds no latency, and a busy
one writes in larger groups exactly when it matters.

No library does this for us: SQLAlchemy's ``insertmanyvalues`` batches rows of one statement
from one caller; it cannot merge statements that many threads issue independently.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger("conclave.worker")

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")


class FlushThread(ABC, Generic[W]):
    """One daemon thread that writes whatever queued up while it was busy. Producers append under
    ``self._ready`` and notify it; the thread waits for work (``_queued``), takes it under the
    lock (``_take``), handles it outside (``_handle``), and ends once closed with nothing left."""

    def __init__(self, thread_name: str) -> None:
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    @abstractmethod
    def _queued(self) -> bool: ...

    @abstractmethod
    def _take(self) -> W: ...

    @abstractmethod
    def _handle(self, work: W) -> None: ...

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queued() and not self._closed:
                    self._ready.wait()
                if not self._queued():
                    return
                work = self._take()
            self._handle(work)


class Coalescer(FlushThread[list[tuple[T, Future[R]]]], Generic[T, R]):
    """``submit(item)`` blocks until ``flush`` has handled a group containing ``item`` and returns
    its result for that item; an exception from ``flush`` is raised in every waiting thread."""

    def __init__(self, name: str, flush: Callable[[Sequence[T]], Sequence[R]], max_group: int = 512):
        super().__init__(f"conclave-{name}")
        self.name = name
        self._flush = flush
        self._max_group = max_group
        self._pending: list[tuple[T, Future[R]]] = []
        self._thread.start()
        self.groups = 0  # how many flushes ran (for tests and the benchmark's curiosity)
        self.items = 0

    def submit(self, item: T) -> R:
        future: Future[R] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            self._pending.append((item, future))
            self._ready.notify()
        return future.result()

    def _queued(self) -> bool:
        return bool(self._pending)

    def _take(self) -> list[tuple[T, Future[R]]]:
        group, self._pending = self._pending[: self._max_group], self._pending[self._max_group :]
        return group

    def _handle(self, group: list[tuple[T, Future[R]]]) -> None:
        self.groups += 1
        self.items += len(group)
        try:
            results = self._flush([item for item, _ in group])
        except BaseException as exc:
            for _, future in group:
                future.set_exception(exc)
            return
        for (_, future), result in zip(group, results, strict=True):
            future.set_result(result)
