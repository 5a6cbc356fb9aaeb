"""Request and response shapes of the HTTP API (pydantic), used for validation and OpenAPI.

Field rules that need the configuration or the whole batch (known models, unique
``custom_id``s, batch size against the tier) live in ``shared/batches.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class QueryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=64)
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[MessageIn] | None = Field(default=None, min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)


class CouncilIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["council", "single", "auto"] = "council"
    members: list[str] | None = Field(default=None, min_length=1, max_length=12)
    chairman: str | None = None


class KnowledgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domain: str | None = Field(default=None, max_length=64)
    top_k: int = Field(default=3, ge=1, le=20)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[QueryIn] = Field(min_length=1)
    priority: Literal["high", "normal", "low"] = "normal"
    council: CouncilIn | None = None
    knowledge: KnowledgeIn | None = None
    webhook_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://[^/?#\s]+")
    metadata: dict[str, str] | None = None
    completion_window: str | None = None


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
