"""The simulated provider's memory of what it was asked: request log and counters.

Owns the capped in-memory log that tests page through with ``since`` (optionally mirrored to a
JSONL file), the per api/model/outcome counters, and the in-flight gauge benchmarks read. All of
it is touched only from the server's event loop, so nothing here locks.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict, deque
from typing import IO, Any

import orjson

Record = dict[str, Any]


class RequestLog:
    """Records in arrival order with contiguous ``seq`` numbers (1, 2, …) that never restart."""

    def __init__(self, limit: int, path: str | None = None):
        self._records: deque[Record] = deque(maxlen=limit)
        self._last_seq = 0
        self._file: IO[bytes] | None = None
        self._path: str | None = None
        self.mirror_to(path)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def next_seq(self) -> int:
        self._last_seq += 1
        return self._last_seq

    def append(self, record: Record) -> None:
        self._records.append(record)
        if self._file is not None:
            self._file.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
            # Flushed per line so a test or an operator tailing the file sees every request.
            self._file.flush()

    def since(self, seq: int, limit: int | None = None) -> list[Record]:
        """Records with a seq above ``seq``, oldest first."""
        if not self._records:
            return []
        # Seqs in the deque are contiguous (only the oldest are dropped, or all), so skip by index.
        start = max(0, seq - self._records[0]["seq"] + 1)
        stop = None if limit is None else start + limit
        return list(itertools.islice(self._records, start, stop))

    def clear(self) -> None:
        self._records.clear()

    def resize(self, limit: int) -> None:
        if limit != self._records.maxlen:
            self._records = deque(self._records, maxlen=limit)

    def mirror_to(self, path: str | None) -> None:
        if path == self._path:
            return
        self.close()
        self._path = path
        if path is not None:
            self._file = open(path, "ab")  # noqa: SIM115 - held open for the server's lifetime

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path = None


class CallStats:
    """Counts per api, model and outcome, plus current and peak concurrent provider calls."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_api: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.by_model: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.by_outcome: Counter[str] = Counter()
        # The peak restarts from what is running now, so a benchmark can reset between phases.
        self.max_in_flight = self.in_flight

    def enter(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def leave(self) -> None:
        self.in_flight -= 1

    def count(self, api: str, model: str, outcome: str) -> None:
        self.requests += 1
        self.by_api[api][outcome] += 1
        self.by_model[model][outcome] += 1
        self.by_outcome[outcome] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "by_api": {api: dict(counts) for api, counts in self.by_api.items()},
            "by_model": {model: dict(counts) for model, counts in self.by_model.items()},
            "by_outcome": dict(self.by_outcome),
        }
