"""OpenTelemetry tracing (SPEC §9): one trace from ``POST /v1/batches`` through the queue to every
provider call.

The API request's span context travels in each query's dramatiq message (``traceparent``); the
worker continues it with a ``query`` span, one span per council stage and one per provider call
(provider, model, stage, attempt, tokens, cost, error category).

Export: ``CONCLAVE_OTLP_ENDPOINT`` (or the standard ``OTEL_EXPORTER_OTLP_*`` variables) sends
spans over OTLP/HTTP when the ``opentelemetry-exporter-otlp-proto-http`` package is installed;
``CONCLAVE_TRACE_FILE`` writes them as JSON lines (one file per process) for local debugging and
the tests. With neither, nothing is recorded and tracing costs next to nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

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


def extract(headers: dict[str, Any] | None) -> Any:
    return propagate.extract(headers or {})
