"""JSON log lines carry the query, batch and trace they belong to."""

from __future__ import annotations

import logging

import orjson
from opentelemetry.sdk.trace import TracerProvider

from shared.logs import JsonFormatter, batch_id_var, query_context


def line(message: str, *args: object) -> dict[str, object]:
    record = logging.LogRecord("conclave.test", logging.WARNING, __file__, 1, message, args, None)
    return orjson.loads(JsonFormatter("conclave-test").format(record))


def test_plain_line_is_one_json_object() -> None:
    entry = line("hello %s", "world")
    assert entry["message"] == "hello world" and entry["level"] == "warning"
    assert entry["service"] == "conclave-test" and str(entry["ts"]).endswith("Z")
    assert "query_id" not in entry and "trace_id" not in entry


def test_query_batch_and_trace_ids_are_attached_and_reset() -> None:
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("query") as span, query_context("query_1", "batch_1"):
        entry = line("working")
        assert entry["query_id"] == "query_1" and entry["batch_id"] == "batch_1"
        assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")
        batch_id_var.set("batch_2")
    after = line("idle")
    assert "query_id" not in after and "batch_id" not in after and "trace_id" not in after
