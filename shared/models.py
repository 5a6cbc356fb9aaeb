"""SQLModel tables: the database is the source of truth for every accepted query.

Timestamps are Unix seconds (ints), as the batch object exposes them. JSON columns hold
request and result documents that are read whole and never queried into.

What a worker needs to be recovered by reconciliation lives on ``Query``: ``worker_id``,
``lease_expires_at`` and ``attempts`` say who holds a query and until when.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Column, Index, LargeBinary, Table, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.lifecycle.statuses import DeliveryStatus, QueryStatus


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=128, unique=True)
    tier: str = Field(default="free", max_length=32)
    is_operator: bool = False
    # Needed in clear to sign webhooks (HMAC); never logged, only shown to the tenant's admins.
    webhook_secret: str = Field(max_length=128)
    # After a rotation the old secret still signs (beside the new one) until this time.
    previous_webhook_secret: str | None = Field(default=None, max_length=128)
    previous_secret_expires_at: int | None = None
    # Overrides the tier's monthly budget; None = the tier's.
    monthly_budget_usd: float | None = None
    # Overrides of the tier's limits (TierLimits field names), e.g. {"requests_per_minute": 120}.
    limits: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: int


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=40)
    role: str = Field(max_length=16)
    # SHA-256 of the full key: keys are 256-bit random, so a fast hash is enough (no brute force).
    key_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16)
    created_at: int
    revoked_at: int | None = None
    # SPEC §17: a free-form label usage groups by, and the key's own monthly budget (None: none;
    # the tenant's budget holds as well either way).
    project: str | None = Field(default=None, max_length=64)
    monthly_budget_usd: float | None = None


def _creating_key() -> str | None:
    """The key of the API request creating a batch: ``shared.audit`` already holds the request's
    caller in a context variable for every state-changing request (None outside the API)."""
    from shared.audit import CURRENT  # here: shared.audit imports shared.db, which imports this

    request = CURRENT.get()
    fields = request.fields() if request is not None else None
    return fields["key_id"] if fields else None


class Batch(SQLModel, table=True):
    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_batches_tenant_idempotency"),
        Index("ix_batches_tenant_status", "tenant_id", "status"),
        Index("ix_batches_tenant_created", "tenant_id", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=40)
    status: str = Field(max_length=16)
    priority: str = Field(max_length=8)
    council: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    knowledge: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    webhook_url: str | None = Field(default=None, max_length=2048)
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    completion_window: str = Field(max_length=8)
    input_file_id: str | None = Field(default=None, max_length=40)
    # "/v1/council" for inline batches, "/v1/chat/completions" for OpenAI file batches (SPEC §11).
    endpoint: str = Field(
        default="/v1/council", max_length=64, sa_column_kwargs={"server_default": "/v1/council"}
    )
    # The batch's output and error files: views of its results (``shared.files``), named at
    # creation and shown once the batch has ended.
    output_file_id: str | None = Field(default=None, max_length=40)
    error_file_id: str | None = Field(default=None, max_length=40)
    errors: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    total: int
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_hash: str | None = Field(default=None, max_length=64)
    # The creating request's trace context (W3C carrier): every query's trace links to it.
    trace: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))
    # Why queued queries are not starting, e.g. {"reason": "budget", ...} (shared/budget.py).
    waiting: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # The API key that created the batch (SPEC §17: key budgets, usage by key and project).
    key_id: str | None = Field(default_factory=_creating_key, max_length=40, index=True)

    created_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    expires_at: int
    expired_at: int | None = None
    failed_at: int | None = None


class Query(SQLModel, table=True):
    __tablename__ = "queries"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id", name="uq_queries_batch_custom_id"),
        Index("ix_queries_batch_status", "batch_id", "status"),
        # Results and output files page through a batch in input order (WHERE batch_id, seq > n).
        Index("ix_queries_batch_seq", "batch_id", "seq"),
        Index("ix_queries_status_lease", "status", "lease_expires_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    batch_id: str = Field(foreign_key="batches.id", max_length=40)
    tenant_id: str = Field(max_length=40, index=True)
    seq: int
    custom_id: str = Field(max_length=64)
    status: str = Field(default=QueryStatus.QUEUED, max_length=16)
    priority: str = Field(max_length=8)
    # {"messages": [...], "max_tokens": int|None, "temperature": float|None}
    request: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))

    worker_id: str | None = Field(default=None, max_length=64)
    lease_expires_at: int | None = None
    attempts: int = 0
    # Runs that only waited out an open circuit (they sent nothing): not counted against
    # CONCLAVE_QUERY_MAX_RUNS.
    circuit_waits: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    enqueued_at: int | None = None
    started_at: int | None = None
    finished_at: int | None = None

    # The council's full record (answers, reviews, ranking, synthesis) once terminal.
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    routing: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: int | None = None


class ProviderCall(SQLModel, table=True):
    """One attempt at one provider call (SPEC §5.3); batch and tenant totals derive from these."""

    __tablename__ = "provider_calls"
    __table_args__ = (Index("ix_provider_calls_tenant_created", "tenant_id", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    # Written before the request is sent (status in_flight) and completed by this key, so a call
    # whose worker died is still in the ledger (then marked abandoned).
    call_key: str | None = Field(default=None, max_length=40, unique=True, index=True)
    worker_id: str | None = Field(default=None, max_length=64, index=True)
    query_id: str = Field(max_length=40, index=True)
    batch_id: str = Field(max_length=40, index=True)
    tenant_id: str = Field(max_length=40)
    model: str = Field(max_length=128)
    stage: str = Field(max_length=16)
    attempt: int
    status: str = Field(max_length=16)
    error_category: str | None = Field(default=None, max_length=32)
    latency_ms: int
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # A ``cached`` row: what the call would have cost at the model's price (shared/cache.py).
    saved_usd: float = Field(default=0.0, sa_column_kwargs={"server_default": "0"})
    created_at: int


class BatchUsage(SQLModel, table=True):
    """A batch's totals, kept with the ledger: every change to a call row of the batch changes
    these in the same transaction, so they equal the ledger's sums exactly (SPEC §5.3, §17)."""

    __tablename__ = "batch_usage"

    batch_id: str = Field(primary_key=True, max_length=40)
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # ``cached`` ledger rows: calls answered from the exact cache, and what they would have cost.
    cache_hits: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    saved_usd: float = Field(default=0.0, sa_column_kwargs={"server_default": "0"})


class BatchCounts(SQLModel, table=True):
    """A batch's finished queries by status, kept by the transitions that finish them
    (``shared.lifecycle.transitions``: outcomes, cancel, expiry) in the same transaction, so they
    equal a count of its query rows exactly. A batch's row is created by its first finished
    query (an upsert): none yet means zeros. Queued and running are not kept here: running is
    counted from ``ix_queries_batch_status`` (bounded by what is in flight, not by the batch)
    and queued is the rest of ``batches.total`` (``shared.batches.read.counts_for``)."""

    __tablename__ = "batch_counts"

    batch_id: str = Field(primary_key=True, max_length=40)
    succeeded: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    failed: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    cancelled: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    expired: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class WebhookEndpoint(SQLModel, table=True):
    """A tenant-wide endpoint that receives its subscribed events (SPEC §3.2)."""

    __tablename__ = "webhook_endpoints"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=40)
    url: str = Field(max_length=2048)
    events: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    enabled: bool = True
    disabled_reason: str | None = Field(default=None, max_length=256)
    created_at: int


class WebhookDelivery(SQLModel, table=True):
    """One event for one target URL; its id is the ``webhook-id``, stable across retries."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_tenant", "tenant_id", "id"),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(max_length=40)
    endpoint_id: str | None = Field(default=None, max_length=40)
    batch_id: str | None = Field(default=None, max_length=40, index=True)
    url: str = Field(max_length=2048)
    event_type: str = Field(max_length=64)
    body: str  # the exact bytes signed and sent, so every retry is identical
    status: str = Field(default=DeliveryStatus.PENDING, max_length=16)
    attempts: int = 0
    next_attempt_at: int
    last_attempt_at: int | None = None
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=512)
    delivered_at: int | None = None
    created_at: int


class Notice(SQLModel, table=True):
    """Marks a once-per-period event as sent: the unique key makes "once" hold under races."""

    __tablename__ = "notices"
    __table_args__ = (UniqueConstraint("tenant_id", "kind", "period", name="uq_notices_once"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(max_length=40)
    kind: str = Field(max_length=64)
    period: str = Field(max_length=16)
    created_at: int


class Feed(SQLModel, table=True):
    """An RSS/Atom feed a tenant's admins follow (SPEC §8); imported on its interval."""

    __tablename__ = "feeds"
    __table_args__ = (Index("ix_feeds_due", "next_fetch_at"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=40)
    url: str = Field(max_length=2048)
    domain: str = Field(max_length=64)
    interval_minutes: int
    etag: str | None = Field(default=None, max_length=512)
    last_modified: str | None = Field(default=None, max_length=128)
    last_fetched_at: int | None = None
    last_success_at: int | None = None
    last_error: str | None = Field(default=None, max_length=512)
    consecutive_failures: int = 0
    next_fetch_at: int
    created_at: int


class Article(SQLModel, table=True):
    __tablename__ = "articles"
    __table_args__ = (
        UniqueConstraint("feed_id", "guid", name="uq_articles_feed_guid"),
        Index("ix_articles_tenant_domain", "tenant_id", "domain"),
        Index("ix_articles_feed_hash", "feed_id", "content_hash"),
    )

    id: str = Field(primary_key=True, max_length=40)
    feed_id: str = Field(foreign_key="feeds.id", max_length=40)
    tenant_id: str = Field(max_length=40)
    domain: str = Field(max_length=64)
    guid: str = Field(max_length=1000)
    title: str
    link: str | None = Field(default=None, max_length=2048)
    published_at: int | None = None
    content: str
    content_hash: str = Field(max_length=64)
    created_at: int
    updated_at: int


class ArticleVersion(SQLModel, table=True):
    """Every content an article has had, oldest first; the article row holds the latest."""

    __tablename__ = "article_versions"

    id: int | None = Field(default=None, primary_key=True)
    article_id: str = Field(foreign_key="articles.id", index=True, max_length=40)
    content: str
    content_hash: str = Field(max_length=64)
    fetched_at: int


class StoredFile(SQLModel, table=True):
    """A file of SPEC §11 (``/v1/files``). An uploaded file's bytes are ``FileChunk`` rows; a
    batch's output or error file (``batch_id`` and ``kind`` set) has none: it is rendered from the
    batch's results when downloaded (``shared.files.views``)."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_tenant_id", "tenant_id", "id"),
        Index("ix_files_expires_at", "expires_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenants.id", max_length=40)
    purpose: str = Field(max_length=32)
    filename: str = Field(max_length=255)
    # None for a view whose size is not known yet (it is measured once, after the batch ends).
    bytes: int | None = None
    lines: int = 0
    batch_id: str | None = Field(default=None, max_length=40, index=True)
    kind: str | None = Field(default=None, max_length=8)  # "output" | "error" for views
    created_at: int
    expires_at: int | None = None


class FileChunk(SQLModel, table=True):
    """One piece (up to ``shared.files.store.CHUNK_BYTES``) of an uploaded file, in order."""

    __tablename__ = "file_chunks"

    file_id: str = Field(foreign_key="files.id", primary_key=True, max_length=40)
    seq: int = Field(primary_key=True)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


# Core table handles for bulk statements (typed: SQLModel does not declare ``__table__``).
QUERIES: Table = Query.__table__  # type: ignore[attr-defined]
BATCHES: Table = Batch.__table__  # type: ignore[attr-defined]
PROVIDER_CALLS: Table = ProviderCall.__table__  # type: ignore[attr-defined]
DELIVERIES: Table = WebhookDelivery.__table__  # type: ignore[attr-defined]
BATCH_USAGE: Table = BatchUsage.__table__  # type: ignore[attr-defined]
BATCH_COUNTS: Table = BatchCounts.__table__  # type: ignore[attr-defined]
FILES: Table = StoredFile.__table__  # type: ignore[attr-defined]
FILE_CHUNKS: Table = FileChunk.__table__  # type: ignore[attr-defined]


# ---------------------------------------------------------------- council analytics (SPEC §13)
# Rollups kept by ``shared.analytics.rollups`` (folded by the scheduler from finished queries);
# every counter is additive, so one fold is one upsert per row and a range is a sum over days.


class AnalyticsCursor(SQLModel, table=True):
    """How far the fold has gone: the last (finished_at, query id) folded. One row per fold."""

    __tablename__ = "analytics_cursor"

    name: str = Field(primary_key=True, max_length=32)
    finished_at: int = 0
    query_id: str = Field(default="", max_length=40)
    folded: int = 0
    updated_at: int = 0


class ModelDayRollup(SQLModel, table=True):
    """One model's day in one tenant: its calls, its stage 1 answers and how its peers ranked them."""

    __tablename__ = "analytics_model_day"

    tenant_id: str = Field(primary_key=True, max_length=40)
    day: int = Field(primary_key=True)  # Unix seconds of 00:00 UTC
    model: str = Field(primary_key=True, max_length=128)
    calls: int = 0
    call_failures: int = 0
    call_timeouts: int = 0
    answers: int = 0
    answer_failures: int = 0
    rank_sum: int = 0
    rank_votes: int = 0
    first_places: int = 0
    cost_usd: float = 0.0


class ModelLatencyRollup(SQLModel, table=True):
    """Succeeded calls of one model per latency bucket (``shared.analytics.fitting.BUCKET_RATIO``)."""

    __tablename__ = "analytics_model_latency"

    tenant_id: str = Field(primary_key=True, max_length=40)
    day: int = Field(primary_key=True)
    model: str = Field(primary_key=True, max_length=128)
    bucket: int = Field(primary_key=True)
    calls: int = 0


class PairRollup(SQLModel, table=True):
    """How often a valid review ranked ``winner`` above ``loser`` (every ordered pair of a ranking)."""

    __tablename__ = "analytics_pairs"

    tenant_id: str = Field(primary_key=True, max_length=40)
    day: int = Field(primary_key=True)
    winner: str = Field(primary_key=True, max_length=128)
    loser: str = Field(primary_key=True, max_length=128)
    wins: int = 0


class BatchRollup(SQLModel, table=True):
    """What a batch's councils say about its reviewers and chairmen (``GET /v1/batches/{id}/report``)."""

    __tablename__ = "analytics_batch"

    batch_id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(max_length=40)
    queries: int = 0
    reviews: int = 0
    reviews_valid: int = 0
    reviews_invalid: int = 0
    reviews_failed: int = 0
    # Kendall's W of each query whose reviews form a complete balanced design, summed.
    agreement_sum: float = 0.0
    # What W would average if the reviewers ranked at random (it depends on the council's size).
    agreement_chance_sum: float = 0.0
    agreement_queries: int = 0
    synthesis_chairman: int = 0
    synthesis_fallback_chairman: int = 0
    synthesis_top_ranked: int = 0
    synthesis_single: int = 0


class BatchPositionRollup(SQLModel, table=True):
    """Valid reviews of a batch that saw ``shown`` answers, and how many ranked the first shown first."""

    __tablename__ = "analytics_batch_position"

    batch_id: str = Field(primary_key=True, max_length=40)
    shown: int = Field(primary_key=True)
    reviews: int = 0
    first_ranked_first: int = 0


class BatchStageRollup(SQLModel, table=True):
    """A batch's provider calls per council stage."""

    __tablename__ = "analytics_batch_stage"

    batch_id: str = Field(primary_key=True, max_length=40)
    stage: str = Field(primary_key=True, max_length=16)
    calls: int = 0
    failures: int = 0
    cost_usd: float = 0.0


class BatchStageLatency(SQLModel, table=True):
    """A batch's succeeded calls of one stage per latency bucket."""

    __tablename__ = "analytics_batch_latency"

    batch_id: str = Field(primary_key=True, max_length=40)
    stage: str = Field(primary_key=True, max_length=16)
    bucket: int = Field(primary_key=True)
    calls: int = 0


class QueryFeedback(SQLModel, table=True):
    """A user's rating of a query's answer (SPEC §13): one per key and query, a new one replaces it.

    ``model`` is the model that wrote the answer rated (the chairman, or the member whose answer
    stood), so the leaderboard can credit it."""

    __tablename__ = "query_feedback"
    __table_args__ = (
        UniqueConstraint("query_id", "key_id", name="uq_query_feedback_key"),
        Index("ix_query_feedback_tenant_model", "tenant_id", "model", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    query_id: str = Field(max_length=40)
    key_id: str = Field(max_length=40)
    tenant_id: str = Field(max_length=40)
    model: str | None = Field(default=None, max_length=128)
    rating: int
    comment: str | None = Field(default=None, max_length=2000)
    created_at: int
    updated_at: int


# The fold reads finished queries in (finished_at, id) order.
Index("ix_queries_finished", QUERIES.c.finished_at, QUERIES.c.id)

MODEL_DAY: Table = ModelDayRollup.__table__  # type: ignore[attr-defined]
MODEL_LATENCY: Table = ModelLatencyRollup.__table__  # type: ignore[attr-defined]
PAIRS: Table = PairRollup.__table__  # type: ignore[attr-defined]
BATCH_ROLLUP: Table = BatchRollup.__table__  # type: ignore[attr-defined]
BATCH_POSITION: Table = BatchPositionRollup.__table__  # type: ignore[attr-defined]
BATCH_STAGE: Table = BatchStageRollup.__table__  # type: ignore[attr-defined]
BATCH_LATENCY: Table = BatchStageLatency.__table__  # type: ignore[attr-defined]
FEEDBACK: Table = QueryFeedback.__table__  # type: ignore[attr-defined]


# The audit log keeps its table with its writes (shared/audit.py), and experiments theirs with their
# statistics (shared/analytics/experiments.py); imported here so the schema is whole.
from shared.analytics.experiments import ASSIGNMENTS as ASSIGNMENTS  # noqa: E402
from shared.analytics.experiments import EXPERIMENTS as EXPERIMENTS  # noqa: E402
from shared.audit import AUDIT as AUDIT  # noqa: E402
