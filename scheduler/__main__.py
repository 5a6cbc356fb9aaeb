"""The scheduler process: APScheduler jobs, run only by the replica holding the leader lock.

``python -m scheduler`` (Procfile ``scheduler``). Jobs are idempotent, so a leadership change
in the middle of one is harmless.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import redis
from apscheduler.schedulers.background import BackgroundScheduler

from scheduler.jobs.expiry import expire_batches
from scheduler.jobs.reconcile import reconcile
from scheduler.leader import LeaderLock
from shared.db import make_engine, make_sessionmaker, upgrade
from shared.settings import get_settings
from workers.broker import make_broker

log = logging.getLogger("conclave.scheduler")


def leader_only(lock: LeaderLock, job: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        if not lock.is_leader:
            return
        try:
            job()
        except Exception:
            log.exception("job %s failed", getattr(job, "__name__", job))

    return run


def main() -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level)
    upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url, pool_size=4))
    broker = make_broker(settings.redis_url, settings.queue_namespace)
    lock = LeaderLock(
        redis.Redis.from_url(settings.redis_url), key=f"{settings.queue_namespace}:scheduler:leader"
    )

    scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
    scheduler.add_job(lock.tick, "interval", seconds=lock.ttl_ms / 3000, id="leader")
    scheduler.add_job(
        leader_only(lock, lambda: reconcile(sessions, broker)), "interval", seconds=15, id="reconcile"
    )
    scheduler.add_job(
        leader_only(lock, lambda: expire_batches(sessions)), "interval", seconds=30, id="expiry"
    )

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
