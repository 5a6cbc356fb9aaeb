"""Request schemas the batch service consumes (pydantic): validation and the OpenAPI document.

Field rules that need the configuration or the whole batch (known models, unique
``custom_id``s, batch size against the tier) live in ``shared/batches/admission.py``.
"""

from __future__ import annotations

from typing import Literal

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
