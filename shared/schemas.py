"""Request schemas the batch service consumes (pydantic): validation and the OpenAPI document.

Field rules that need the configuration or the whole batch (known models, unique
``custom_id``s, batch size against the tier) live in ``shared/batches/admission.py``.
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
    """An inline batch (``queries``), or OpenAI's create body for a file batch (``input_file_id``
    and ``endpoint``, SPEC §11): one body, so both reach ``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    # Required for an inline batch (admission says so when it is missing); empty for a file batch.
    queries: list[QueryIn] = Field(default_factory=list, min_length=1)
    input_file_id: str | None = Field(default=None, min_length=1, max_length=64)
    endpoint: str | None = Field(default=None, max_length=64)
    # OpenAI's expiry of the output files; accepted, and files follow CONCLAVE_FILE_EXPIRY_DAYS.
    output_expires_after: dict[str, Any] | None = None
    priority: Literal["high", "normal", "low"] = "normal"
    council: CouncilIn | None = None
    knowledge: KnowledgeIn | None = None
    webhook_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://[^/?#\s]+")
    metadata: dict[str, str] | None = None
    completion_window: str | None = None
    # SPEC §14: reuse answers of identical calls ("semantic": and of close single-turn questions);
    # None = the tenant's setting (its tier's, else off).
    cache: Literal["off", "exact", "semantic"] | None = None
    # SPEC §13: run each query with its variant's council of this experiment (by name).
    experiment: str | None = Field(default=None, min_length=1, max_length=64)


class MessageBatchCreate(BaseModel):
    """Anthropic's Message Batches create body (SPEC §11); each request is checked by
    ``shared.files.anthropic.parse_requests`` so it reports every problem with its index."""

    model_config = ConfigDict(extra="forbid")

    requests: list[dict[str, Any]] = Field(min_length=1)
    # Conclave's own, as on an inline batch.
    priority: Literal["high", "normal", "low"] = "normal"
    webhook_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://[^/?#\s]+")
    metadata: dict[str, str] | None = None
