"""Anthropic's Message Batches shapes (SPEC §11) over Conclave's batches. Pure.

A Message Batch is a view of a batch: ``processing_status`` folds our statuses into Anthropic's
three, ``request_counts`` renames ours, times are RFC 3339. Requests (``{custom_id, params}``) go
through the same checks as OpenAI file lines (``shared.files.lines``), so ``params.model`` picks
the work the same way: ``council``, ``council:<preset>`` or one model.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from shared.files.lines import CUSTOM_ID_MAX, LineRules, ParsedLine, check_body, is_text
from shared.lifecycle.statuses import BATCH_TERMINAL, BatchStatus
from shared.providers.config import Catalog

PROCESSING_STATUS: dict[str, str] = {BatchStatus.CANCELLING: "canceling"}


def rfc3339(ts: int | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def processing_status(status: str) -> str:
    if status in BATCH_TERMINAL:
        return "ended"
    return PROCESSING_STATUS.get(status, "in_progress")


def message_batch(batch: dict[str, Any], results_url: str) -> dict[str, Any]:
    """The Message Batch object for a batch object (``shared.batches`` read model)."""
    counts = batch["request_counts"]
    ended = processing_status(batch["status"]) == "ended"
    ended_at = batch.get("completed_at") or batch.get("cancelled_at") or batch.get("expired_at")
    ended_at = ended_at or batch.get("failed_at")
    return {
        "id": batch["id"],
        "type": "message_batch",
        "processing_status": processing_status(batch["status"]),
        "request_counts": {
            "processing": counts["queued"] + counts["running"],
            "succeeded": counts["completed"],
            "errored": counts["failed"],
            "canceled": counts["cancelled"],
            "expired": counts["expired"],
        },
        "created_at": rfc3339(batch["created_at"]),
        "expires_at": rfc3339(batch["expires_at"]),
        "ended_at": rfc3339(ended_at) if ended else None,
        "cancel_initiated_at": rfc3339(batch.get("cancelling_at")),
        "archived_at": None,
        "results_url": results_url if ended else None,
    }


def parse_requests(
    requests: Any, catalog: Catalog, rules: LineRules
) -> tuple[list[ParsedLine], list[tuple[str, str]]]:
    """The requests as parsed lines, and (param, why) for every problem."""
    if not isinstance(requests, list) or not requests:
        return [], [("requests", "must be a non-empty array")]
    parsed: list[ParsedLine] = []
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(requests):
        here = f"requests[{i}]"
        if not isinstance(item, dict):
            problems.append((here, "must be an object with 'custom_id' and 'params'"))
            continue
        custom_id = item.get("custom_id")
        if not is_text(custom_id) or not custom_id or len(custom_id) > CUSTOM_ID_MAX:
            problems.append((f"{here}.custom_id", f"must be a string of 1 to {CUSTOM_ID_MAX} characters"))
            custom_id = None
        elif custom_id in seen:
            problems.append(
                (f"{here}.custom_id", f"{custom_id!r} is used by requests[{seen[custom_id]}] too")
            )
        else:
            seen[custom_id] = i
        params = item.get("params")
        if not isinstance(params, dict):
            problems.append((f"{here}.params", "must be an object"))
            continue
        if params.get("max_tokens") is None:
            problems.append((f"{here}.params.max_tokens", "is required"))
        request, body_problems = check_body(
            params, f"{here}.params", catalog, rules, system=params.get("system")
        )
        problems.extend((p, why) for _code, p, why in body_problems)
        if body_problems:
            continue
        try:
            # The body was parsed by the standard library, which lets lone surrogates through;
            # no database driver stores them (a file's lines are parsed by orjson, which refuses them).
            orjson.dumps(request)
        except TypeError:
            problems.append((f"{here}.params", "holds text that is not valid Unicode"))
            continue
        if custom_id is not None:
            parsed.append(ParsedLine(i + 1, custom_id, request))
    return parsed, problems
