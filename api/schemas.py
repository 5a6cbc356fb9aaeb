"""Response shapes of the HTTP API (pydantic), for the OpenAPI document.

Request schemas live in ``shared/schemas.py``: the services consume them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ErrorBody(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int
    queued: int
    running: int
    cancelled: int
    expired: int


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class BatchObject(BaseModel):
    """A superset of OpenAI's Batch object, so OpenAI's SDK can read it."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str = "/v1/council"
    status: str
    priority: str
    council: dict[str, Any]
    knowledge: dict[str, Any] | None = None
    webhook_url: str | None
    metadata: dict[str, str]
    completion_window: str
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    errors: dict[str, Any] | None
    request_counts: RequestCounts
    usage: Usage
    cost_usd: float
    eta_seconds: int | None
    created_at: int
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    expires_at: int
    expired_at: int | None
    failed_at: int | None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    has_more: bool
    first_id: str | None
    last_id: str | None
