"""The FastAPI app factory: builds the per-process state once and mounts one router per resource.

The API is thin: validate, persist, enqueue, read. Run it with
``uvicorn --factory api.main:create_app``.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from api import dashboard
from api.audit import AuditTrail
from api.deps import AppState
from api.errors import install_error_handlers
from api.middleware import Guards
from api.ratelimit import SlidingWindow
from api.routes import (
    admin,
    analytics,
    audit,
    batch_data,
    batches,
    cache,
    events,
    experiments,
    feedback,
    files,
    health,
    keys,
    knowledge,
    message_batches,
    metrics,
    queries,
    usage,
    webhooks,
)
from shared.db import make_engine, make_sessionmaker
from shared.logs import configure_logging
from shared.metrics import MetricsBuffer
from shared.providers.config import load_catalog
from shared.queue.broker import make_broker
from shared.settings import Settings, get_settings
from shared.tracing import setup_tracing


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, "conclave-api")
    setup_tracing(settings, "conclave-api")
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size)
    broker = make_broker(settings.redis_url, settings.queue_namespace)
    limiter = SlidingWindow(broker.client, settings.queue_namespace) if settings.rate_limits_enabled else None
    metrics_buffer = MetricsBuffer(broker.client, settings.queue_namespace)
    state = AppState(
        settings=settings,
        sessions=make_sessionmaker(engine),
        broker=broker,
        catalog=load_catalog(settings.providers_file, settings.sim_provider_url),
        limiter=limiter,
        metrics=metrics_buffer,
    )
    app = FastAPI(
        title="Conclave",
        version="0.1.0",
        description="Batches of LLM council queries.",
    )
    # The audit log (SPEC §17) innermost: it reads the client IP that Guards sets.
    app.add_middleware(AuditTrail)
    # Starlette counts the bytes of a body that declares no length (its 413 reaches our handler
    # through FastAPI); Guards, outside it, refuses a declared length over the cap in SPEC's shape.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_request_bytes)
    app.add_middleware(Guards, settings=settings, limiter=limiter, metrics=metrics_buffer)
    app.state.conclave = state
    install_error_handlers(app)
    for module in (health, metrics, batches, queries, webhooks, usage, keys, knowledge, admin, cache, audit):
        app.include_router(module.router)
    app.include_router(events.router)
    app.include_router(files.router)
    app.include_router(batch_data.router)
    app.include_router(message_batches.router)
    app.include_router(dashboard.router)
    app.include_router(analytics.router)
    app.include_router(experiments.router)
    app.include_router(feedback.router)
    return app
