"""The scheduler process: APScheduler jobs, run only by the replica holding the leader lock.

``python -m scheduler`` (Procfile ``scheduler``). Every replica schedules every job; a job body
runs only on the leader, and every job is idempotent, so a leadership change in the middle of
one is harmless.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import redis
from apscheduler.schedulers.background import BackgroundScheduler

from scheduler.jobs.analytics import fold_analytics
from scheduler.jobs.anomalies import AnomalyDetector
from scheduler.jobs.costs import budget_checks, daily_summaries
from scheduler.jobs.deadlines import promote_at_risk
from scheduler.jobs.expiry import expire_batches
from scheduler.jobs.reconcile import Reconciler
from scheduler.jobs.retention import purge_old_batches
from scheduler.jobs.webhooks import Dispatcher
from scheduler.leader import LeaderLock
from shared import keys
from shared.db import make_engine, make_sessionmaker, upgrade
from shared.files.store import purge_expired
from shared.files.views import measure_ended_views
from shared.knowledge.feeds import import_due_feeds
from shared.logs import configure_logging
from shared.metrics import MetricsBuffer
from shared.providers.config import load_catalog
from shared.queue.broker import make_broker
from shared.settings import Settings, get_settings

log = logging.getLogger("conclave.scheduler")

# Seconds between runs of each job.
INTERVALS = {
    "webhooks": 1,
    "reconcile": 5,
    "deadlines": 5,
    "expiry": 10,
    "budgets": 60,
    "daily_summary": 300,
    "feeds": 5,
    "files": 10,
    "analytics": 5,
    "anomalies": 10,
    "retention": 60,
}


def leader_only(lock: LeaderLock, name: str, job: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        if not lock.is_leader:
            return
        try:
            job()
        except Exception:
            log.exception("job %s failed", name)

    return run


def build(settings: Settings) -> tuple[BackgroundScheduler, LeaderLock]:
    sessions = make_sessionmaker(make_engine(settings.database_url, pool_size=4))
    broker = make_broker(settings.redis_url, settings.queue_namespace)
    lock = LeaderLock(
        redis.Redis.from_url(settings.redis_url), key=keys.scheduler_leader(settings.queue_namespace)
    )
    jobs: dict[str, Callable[[], Any]] = {
        "webhooks": Dispatcher(
            sessions,
            schedule=settings.webhook_retry_schedule,
            allow_private=settings.webhook_allow_private,
            metrics=MetricsBuffer(broker.client, settings.queue_namespace),
        ).run,
        "reconcile": Reconciler(sessions, broker).run,
        "deadlines": lambda: promote_at_risk(sessions, broker),
        "expiry": lambda: expire_batches(sessions, broker=broker),
        "budgets": lambda: budget_checks(sessions, settings),
        "daily_summary": lambda: daily_summaries(sessions),
        "files": lambda: (purge_expired(sessions), measure_ended_views(sessions)),
        "analytics": lambda: fold_analytics(sessions),
        "anomalies": AnomalyDetector(
            sessions,
            broker.client,
            settings.queue_namespace,
            load_catalog(settings.providers_file, settings.sim_provider_url),
        ).run,
        "retention": lambda: purge_old_batches(sessions, broker, settings.retention_days),
        "feeds": lambda: import_due_feeds(
            sessions,
            allow_private=settings.webhook_allow_private,
            timeout_s=settings.feed_fetch_timeout_s,
            max_bytes=settings.feed_max_bytes,
        ),
    }
    scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
    # Every second: the leader renews (its lock lives 15 s), a follower tries to take over, so a
    # dead leader is replaced within a second of its lock running out.
    scheduler.add_job(lock.tick, "interval", seconds=1, id="leader")
    for name, job in jobs.items():
        scheduler.add_job(leader_only(lock, name, job), "interval", seconds=INTERVALS[name], id=name)
    return scheduler, lock


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level, "conclave-scheduler")
    upgrade(settings.database_url)
    scheduler, lock = build(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    lock.tick()
    scheduler.start()
    log.info("scheduler %s started (leader: %s)", lock.identity, lock.is_leader)
    stop.wait()
    scheduler.shutdown(wait=True)
    lock.release()


if __name__ == "__main__":
    main()
