"""OpenTelemetry tracing (SPEC §9): one trace per query, from the queue to every provider call,
linked to the ``POST /v1/batches`` that created it.

A batch is not one trace: a 50,000-query batch would be some 400,000 spans in it. The API
request is a trace of its own; its span context (a W3C ``traceparent`` carrier) travels in each
query's dramatiq message and is stored with the batch (``Batch.trace``). Each run of a query is
a ``query`` span, with one span per council stage and one per provider call beneath it
(provider, model, stage, attempt, tokens, cost, error category), in the query's own trace and
linked (an OpenTelemetry span link) to the request's span.

A query's trace is the same on every run (reconciliation, a circuit wait, a dead worker's
hand-back), with no context stored per query: ``query_parent`` derives it from the query id.
SHA-256 of ``conclave-query-trace:<query id>`` gives the trace id (its first 16 bytes) and the
span id of a parent that is never recorded (the next 8): every run's ``query`` span is a child of
that same parent, so a trace backend shows the runs side by side under one (missing) root. The
link comes from the message, or, for a message re-sent without one, from the batch.

Export: ``CONCLAVE_OTLP_ENDPOINT`` (or the standard ``OTEL_EXPORTER_OTLP_*`` variables) sends
spans over OTLP/HTTP when the ``opentelemetry-exporter-otlp-proto-http`` package is installed;
``CONCLAVE_TRACE_FILE`` writes them as JSON lines (one file per process) for local debugging and
the tests. With neither, nothing is recorded and tracing costs next to nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags

from shared.settings import Settings

log = logging.getLogger("conclave.tracing")
_configured = False
_lock = threading.Lock()


class JsonLinesExporter(SpanExporter):
    """Spans as JSON lines in ``<path>.<pid>``: a file per process, so processes never interleave."""

    def __init__(self, path: str):
        self.path = f"{path}.{os.getpid()}"
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [span.to_json(indent=None) + "\n" for span in spans]
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.writelines(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def setup_tracing(settings: Settings, service: str) -> None:
    """Install the tracer provider for this process (once)."""
    global _configured
    endpoint = settings.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    trace_file = os.environ.get("CONCLAVE_TRACE_FILE")
    if not endpoint and not trace_file:
        return
    with _lock:
        if _configured:
            return
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if trace_file:
            provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(trace_file)))
        if endpoint:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.warning("OTLP endpoint set but opentelemetry-exporter-otlp-proto-http is not installed")
            else:
                url = endpoint.rstrip("/")
                url = url if url.endswith("/v1/traces") else f"{url}/v1/traces"
                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        trace.set_tracer_provider(provider)
        _configured = True


def tracer() -> trace.Tracer:
    return trace.get_tracer("conclave")


def carrier() -> dict[str, str]:
    """The current span context as message headers (``traceparent``); empty when not tracing."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, Any] | None) -> Context:
    return propagate.extract(dict(headers or {}))


def request_links(headers: Mapping[str, Any] | None) -> list[Link]:
    """A link to the span a carrier names (the request that created a query); none without one."""
    context = trace.get_current_span(extract(headers)).get_span_context()
    return [Link(context)] if context.is_valid else []


def query_ids(query_id: str) -> tuple[int, int]:
    """The trace id of query ``query_id`` and the span id of its runs' parent (see the module doc)."""
    digest = hashlib.sha256(f"conclave-query-trace:{query_id}".encode()).digest()
    # Zero is the invalid id in both cases (a 1-in-2^64 draw at worst).
    return int.from_bytes(digest[:16]) or 1, int.from_bytes(digest[16:24]) or 1


def query_parent(query_id: str, links: Sequence[Link] = ()) -> Context:
    """The context a run of query ``query_id`` starts its span in: the query's own trace, the same
    on every run. Sampled as the request it is linked to was (sampled when none is known)."""
    trace_id, span_id = query_ids(query_id)
    flags = links[0].context.trace_flags if links else TraceFlags(TraceFlags.SAMPLED)
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(parent))
