"""The one settings object (SPEC §1): environment variables prefixed ``CONCLAVE_``, ``.env`` supported.

Each process builds it once (``get_settings()``) and hands the parts it needs down to
constructors; nothing deep in the code reads the environment itself.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.keys import DEFAULT_NAMESPACE

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
PRIORITY_RANK: dict[str, int] = {"low": 0, "normal": 1, "high": 2}


class TierLimits(BaseModel):
    """What a tier allows; a tenant's ``limits`` may override any field."""

    requests_per_minute: int = Field(ge=1)  # per API key
    queries_per_day: int | None = Field(default=None, ge=1)  # None = unlimited
    max_batch_queries: int = Field(ge=1)
    max_priority: Priority = "normal"
    # A batch's cache when it names none (SPEC §14); a tenant's ``limits`` may set its own.
    cache: Literal["off", "exact", "semantic"] = "off"
    # The tenant's share of the workers within a priority against other backlogged tenants
    # (SPEC §15; shared/queue/fair.py): a tenant of weight 2 runs twice as many queries at once.
    weight: float = Field(default=1.0, gt=0, le=1000)


DEFAULT_TIERS = {
    "free": TierLimits(
        requests_per_minute=60, queries_per_day=1_000, max_batch_queries=1_000, max_priority="normal"
    ),
    "pro": TierLimits(
        requests_per_minute=600, queries_per_day=200_000, max_batch_queries=50_000, max_priority="high"
    ),
    "enterprise": TierLimits(
        requests_per_minute=6_000, queries_per_day=None, max_batch_queries=50_000, max_priority="high"
    ),
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONCLAVE_", env_file=".env", extra="ignore")

    # SPEC §1
    database_url: str = "sqlite:///./conclave.db"
    redis_url: str = "redis://localhost:6379/0"
    providers_file: Path = Path("./providers.toml")
    webhook_allow_private: bool = False
    webhook_retry_schedule: Annotated[list[int], NoDecode] = Field(
        default=[0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]
    )
    otlp_endpoint: str | None = None

    # Client side of the CLI (SPEC §2)
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None

    # Where the built-in simulated provider listens when no providers file exists.
    sim_provider_url: str = "http://127.0.0.1:8900"

    # Intake limits
    max_batch_queries: int = Field(default=50_000, ge=1)
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_prompt_chars: int = Field(default=200_000, ge=1)
    default_completion_window: str = "24h"
    # Files (SPEC §11): an uploaded file's size and lines; how long files are kept.
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    max_file_lines: int = Field(default=50_000, ge=1)
    file_expiry_days: int = Field(default=30, ge=1)
    # Days an ended batch's content is kept before the scheduler deletes it as DELETE
    # /v1/batches/{id} does (SPEC §17, scheduler/jobs/retention.py); the cost ledger stays.
    retention_days: int = Field(default=30, ge=1)

    # Database connections per process (and as many again in overflow).
    db_pool_size: int = Field(default=8, ge=1)

    # Knowledge feeds: limits of one fetch.
    feed_fetch_timeout_s: float = Field(default=20.0, gt=0)
    feed_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)

    # Workers
    queue_namespace: str = DEFAULT_NAMESPACE
    # How long a worker holds a query before someone else may take it over (reconciliation).
    # dramatiq's time limit for a query follows it, 30 s inside (shared/queue/contract.py), so a
    # query is stopped before its lease can pass to another worker.
    query_lease_seconds: int = Field(default=900, ge=60)
    # Runs of one query that may end without an outcome (worker killed, time limit) before it
    # fails with ``attempts_exhausted``; waits behind an open circuit do not count.
    query_max_runs: int = Field(default=3, ge=1)
    # Retries of transient provider errors: per query (all calls together) and per call.
    query_retry_budget: int = Field(default=16, ge=0)
    call_max_attempts: int = Field(default=5, ge=1)
    min_answers: int = Field(default=2, ge=1)
    # Output budgets of a review (stage 2) and of the synthesis (stage 3); a query's max_tokens
    # is for its answers only, and a small one would cut off a review's FINAL RANKING.
    review_max_tokens: int = Field(default=2048, ge=64)
    synthesis_max_tokens: int = Field(default=2048, ge=64)

    # Limits per tier (JSON in CONCLAVE_TIERS); each tenant may override fields.
    tiers: dict[str, TierLimits] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    # Per client IP, all requests; and what to trust for the IP.
    ip_requests_per_minute: int = Field(default=1200, ge=1)
    # Failed authentications per client IP; past it, only requests whose key fails get 429.
    auth_failures_per_minute: int = Field(default=60, ge=1)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    rate_limits_enabled: bool = True

    # Monthly budget per tier in USD (None = unlimited); a tenant's own budget overrides it.
    tier_monthly_budget_usd: dict[str, float | None] = Field(
        default={"free": 10.0, "pro": 1000.0, "enterprise": None}
    )

    # Exact cache of calls (SPEC §14, shared/cache.py): how long an answer is reused; how long one
    # identical call in flight holds the others back (its lock's TTL: past it, they call too).
    cache_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    cache_lock_ttl_s: float = Field(default=30.0, gt=0)
    # ``cache: "semantic"``: how close (cosine) a question must be to one answered before to reuse
    # its answers; 0.85 keeps false hits at 0 of 111 hard negatives (shared/semantic_cache.py).
    semantic_cache_threshold: float = Field(default=0.85, gt=0, le=1)
    # A query whose tenant's budget cannot take it goes back to the queue for 2 s, doubling with
    # each wait up to this long (shared/budget.py): how soon a raised budget or a new month resumes it.
    budget_recheck_max_s: int = Field(default=60, ge=1)

    environment: Literal["development", "production", "test"] = "development"
    log_level: str = "INFO"

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            return [int(p) for p in parts]
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule_non_negative(cls, value: list[int]) -> list[int]:
        if not value or any(v < 0 for v in value):
            raise ValueError("needs at least one delay, none negative")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value

    @field_validator("default_completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        parse_window(value)
        return value

    @model_validator(mode="after")
    def _production_sanity(self) -> Settings:
        if self.environment == "production" and self.webhook_allow_private:
            raise ValueError("CONCLAVE_WEBHOOK_ALLOW_PRIVATE must not be set in production")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def parse_window(value: str) -> int:
    """``"24h"`` → seconds. Accepts s/m/h/d suffixes; between 1 minute and 7 days."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = value.strip().lower()
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise ValueError(f"completion_window must look like '24h', got {value!r}")
    seconds = int(text[:-1]) * units[text[-1]]
    if not 60 <= seconds <= 7 * 86400:
        raise ValueError("completion_window must be between 1m and 7d")
    return seconds


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
