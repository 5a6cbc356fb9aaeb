"""Rendering a finished query as an output line (SPEC §11): OpenAI's batch output and error
lines, and Anthropic's Message Batches result lines. Pure: a row in, a dict out.

A row is one query as the results read model holds it (``shared.files.views.ROW_COLUMNS``):
``id``, ``custom_id``, ``status``, ``result``, ``error``, ``input_tokens``, ``output_tokens``,
``finished_at`` and ``model`` (what the line asked for). Every id in a line is derived from the
query's id and every time from the row, so rendering a finished batch twice gives the same bytes:
that is what lets output files be views with a size that holds (``shared.files.views``).
"""

from __future__ import annotations

from typing import Any

from shared.lifecycle.statuses import QueryStatus

COUNCIL = "council"
# HTTP status a failed query's response carries, by provider error category (SPEC §4.2).
STATUS_BY_ERROR = {
    "invalid_request": 400,
    "content_filter": 400,
    "auth": 401,
    "rate_limited": 429,
    "overloaded": 503,
    "timeout": 504,
}
# Anthropic's error types for the same categories.
ANTHROPIC_ERROR = {
    "invalid_request": "invalid_request_error",
    "content_filter": "invalid_request_error",
    "auth": "authentication_error",
    "rate_limited": "rate_limit_error",
    "overloaded": "overloaded_error",
    "timeout": "timeout_error",
}


def _tail(query_id: str) -> str:
    return query_id.partition("_")[2] or query_id


def is_council(model: str) -> bool:
    return model == COUNCIL or model.startswith(COUNCIL + ":")


def _council(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "members": [
            {
                "model": m["model"],
                **({"requested_model": m["requested_model"]} if m.get("requested_model") else {}),
                "status": m["status"],
                "error": m.get("error"),
                "latency_ms": m.get("latency_ms"),
            }
            for m in result.get("members", [])
        ],
        "aggregate_ranking": result.get("aggregate_ranking", []),
        "synthesis": result.get("synthesis"),
        "chairman": result.get("chairman"),
        "citations": result.get("citations", []),
    }


def chat_completion(row: Any) -> dict[str, Any]:
    """A succeeded query as OpenAI's ``chat.completion`` body (plus ``council`` for council lines)."""
    result = row.result or {}
    tail = _tail(row.id)
    body: dict[str, Any] = {
        "id": f"chatcmpl-{tail}",
        "object": "chat.completion",
        "created": row.finished_at or 0,
        "model": row.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.get("answer"), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": row.input_tokens,
            "completion_tokens": row.output_tokens,
            "total_tokens": row.input_tokens + row.output_tokens,
        },
    }
    if is_council(row.model):
        body["council"] = _council(result)
    if result.get("simulated"):
        body["simulated"] = True
    return body


def openai_line(row: Any) -> dict[str, Any]:
    """The output line (succeeded) or error line (anything else) of one finished query."""
    tail = _tail(row.id)
    line: dict[str, Any] = {"id": f"batch_req_{tail}", "custom_id": row.custom_id}
    if row.status == QueryStatus.SUCCEEDED:
        line["response"] = {"status_code": 200, "request_id": f"req_{tail}", "body": chat_completion(row)}
        line["error"] = None
        return line
    error = row.error or {}
    if row.status in (QueryStatus.CANCELLED, QueryStatus.EXPIRED):
        line["response"] = None
        line["error"] = {
            "code": f"batch_{row.status}",
            "message": error.get("message") or f"the batch was {row.status} before this request ran",
        }
        return line
    category = error.get("type") or "server"
    line["response"] = {
        "status_code": STATUS_BY_ERROR.get(category, 500),
        "request_id": f"req_{tail}",
        "body": {
            "error": {
                "message": error.get("message") or "the request failed",
                "type": category,
                "param": None,
                "code": category,
            }
        },
    }
    line["error"] = None
    return line


def anthropic_result(row: Any) -> dict[str, Any]:
    """Anthropic's result line: ``succeeded | errored | canceled | expired``."""
    if row.status == QueryStatus.SUCCEEDED:
        result = row.result or {}
        message: dict[str, Any] = {
            "id": f"msg_{_tail(row.id)}",
            "type": "message",
            "role": "assistant",
            "model": row.model,
            "content": [{"type": "text", "text": result.get("answer") or ""}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": row.input_tokens, "output_tokens": row.output_tokens},
        }
        if is_council(row.model):
            message["council"] = _council(result)
        outcome: dict[str, Any] = {"type": "succeeded", "message": message}
    elif row.status == QueryStatus.CANCELLED:
        outcome = {"type": "canceled"}
    elif row.status == QueryStatus.EXPIRED:
        outcome = {"type": "expired"}
    else:
        error = row.error or {}
        category = error.get("type") or "server"
        outcome = {
            "type": "errored",
            "error": {
                "type": "error",
                "error": {
                    "type": ANTHROPIC_ERROR.get(category, "api_error"),
                    "message": error.get("message") or "the request failed",
                },
            },
        }
    return {"custom_id": row.custom_id, "result": outcome}
