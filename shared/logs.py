"""Logs as one JSON object per line (SPEC §9), with ``batch_id``, ``query_id`` and ``trace_id``
whenever the code running knows them.

Context travels in ``contextvars`` (set by the worker around a query), the trace id comes from the
current OpenTelemetry span. Secrets never reach a log line because no code logs them: keys are
headers, and provider errors are redacted at the provider boundary.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
from opentelemetry import trace

batch_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("batch_id", default=None)
query_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("query_id", default=None)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": self.service,
            "message": record.getMessage(),
        }
        batch_id, query_id = batch_id_var.get(), query_id_var.get()
        if batch_id:
            entry["batch_id"] = batch_id
        if query_id:
            entry["query_id"] = query_id
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, service: str) -> None:
    """Route every logger of this process through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())


@contextmanager
def query_context(query_id: str, batch_id: str | None = None) -> Iterator[None]:
    # Worker threads run one query after another: both are reset so nothing leaks to the next.
    query_token = query_id_var.set(query_id)
    batch_token = batch_id_var.set(batch_id)
    try:
        yield
    finally:
        query_id_var.reset(query_token)
        batch_id_var.reset(batch_token)
