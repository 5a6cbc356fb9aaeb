"""The worker's part of a query's trace: a ``query`` span continuing the API request's trace,
with one span per council stage and one per provider call beneath it.

Stage and call spans are written after the council has run, from the recorded attempts (each
knows its stage, end time and latency), so the pure council needs no tracing code and a
query that is not traced costs nothing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from shared.ledger import CallRecord
from shared.lifecycle.statuses import CallStatus
from shared.tracing import tracer

STAGE_ORDER = {"answer": 0, "review": 1, "synthesis": 2}


def record_call_spans(query_span: Span, calls: list[CallRecord]) -> None:
    if not query_span.is_recording() or not calls:
        return
    by_stage: dict[str, list[CallRecord]] = defaultdict(list)
    for call in calls:
        by_stage[call.stage].append(call)
    t = tracer()
    parent = trace.set_span_in_context(query_span)
    for stage in sorted(by_stage, key=lambda s: STAGE_ORDER.get(s, 9)):
        stage_calls = by_stage[stage]
        start = min(_start_ns(c) for c in stage_calls)
        end = max(c.ended_ns for c in stage_calls)
        stage_span = t.start_span(
            f"stage {stage}",
            context=parent,
            start_time=start,
            attributes={"conclave.stage": stage, "conclave.calls": len(stage_calls)},
        )
        stage_context = trace.set_span_in_context(stage_span)
        for call in stage_calls:
            provider = call.model.partition(":")[0]
            attributes: dict[str, Any] = {
                "conclave.provider": provider,
                "conclave.model": call.model,
                "conclave.stage": call.stage,
                "conclave.attempt": call.attempt,
                "conclave.status": call.status,
                "conclave.input_tokens": call.input_tokens,
                "conclave.output_tokens": call.output_tokens,
                "conclave.cost_usd": call.cost_usd,
                "conclave.latency_ms": call.latency_ms,
            }
            if call.error_category:
                attributes["conclave.error_category"] = call.error_category
            span = t.start_span(
                f"provider {call.model}",
                context=stage_context,
                start_time=_start_ns(call),
                attributes=attributes,
            )
            if call.status == CallStatus.FAILED:
                span.set_status(Status(StatusCode.ERROR, call.error_category or "failed"))
            span.end(end_time=call.ended_ns)
        stage_span.end(end_time=end)


def _start_ns(call: CallRecord) -> int:
    return call.ended_ns - call.latency_ms * 1_000_000
