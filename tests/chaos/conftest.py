"""Chaos fixtures: a private deployment per test, and the means to break it.

Each test gets its own API, worker pools and scheduler, on a private database and on a Redis
database index of its own (``CHAOS_REDIS_DB``), so wiping Redis or killing processes touches
nothing else on the machine. ``CONCLAVE_CHAOS_QUERIES`` sets the batch size; without it, 2,000
queries per batch locally and ``CI_QUERIES`` when ``CI`` is set (CI runs the whole suite).
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.db import make_engine, make_sessionmaker
from shared.models import Query
from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from shared.tenants import issue_key
from tests.conftest import IN_CI, REDIS_URL, settings_env
from tests.helpers import poll

CI_QUERIES = 400
QUERIES = int(os.environ.get("CONCLAVE_CHAOS_QUERIES") or (CI_QUERIES if IN_CI else 2000))
# Seconds a test may take: the global 300 s is enough for the reduced size, not for 2,000 queries
# on a shared two-core machine.
TEST_TIMEOUT = 300 if QUERIES <= 500 else 900
CHAOS_REDIS_DB = 13


def set_sim(sim: SimServer, **config: object) -> None:
    httpx.post(f"{sim.url}/_sim/config", json=config).raise_for_status()


def sim_requests(sim: SimServer) -> int:
    return int(httpx.get(f"{sim.url}/_sim/stats").json()["requests"])


class Chaos:
    """One private deployment: its processes, an API client of its tenant, its Redis and database.

    Worker pools are ``dramatiq`` main processes, each with ``processes`` worker children. When a
    child dies, dramatiq's main process stops the pool's other children (SIGTERM, a graceful stop)
    and exits with status 1; bringing the pool back is the supervisor's job (Kubernetes, systemd),
    which ``start_pool`` stands in for.
    """

    def __init__(
        self,
        stack: Stack,
        client: httpx.Client,
        redis_client: redis.Redis,
        sessions: sessionmaker[Session],
        tenant_id: str,
        namespace: str,
    ):
        self.namespace = namespace
        self.stack = stack
        self.client = client
        self.redis = redis_client
        self.sessions = sessions
        self.tenant_id = tenant_id
        self.pools: list[subprocess.Popen[bytes]] = []
        # Pools that lost a child and are expected to exit: not a broken stack.
        self.doomed: list[subprocess.Popen[bytes]] = []

    def start_pool(self, *, processes: int = 1, threads: int = 32) -> subprocess.Popen[bytes]:
        pool = self.stack.start_workers(processes=processes, threads=threads, name=f"pool{len(self.pools)}")
        self.pools.append(pool)
        return pool

    def live_pools(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.pools if p not in self.doomed and p.poll() is None]

    def workers_of(self, pool: subprocess.Popen[bytes]) -> list[int]:
        """The pool's worker processes (forked children running the same command line)."""
        try:
            children = Path(f"/proc/{pool.pid}/task/{pool.pid}/children").read_text().split()
            own = Path(f"/proc/{pool.pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return []
        pids = []
        for child in map(int, children):
            try:
                if Path(f"/proc/{child}/cmdline").read_bytes() == own:
                    pids.append(child)
            except FileNotFoundError:
                continue
        return pids

    def kill_worker(self, pool: subprocess.Popen[bytes], batch_id: str) -> tuple[int, frozenset[str]]:
        """SIGKILL one worker process of ``pool``; returns its pid and the custom ids it held.

        It is frozen first (SIGSTOP) so what it holds cannot change between the look and the kill:
        only those queries may have reached the provider twice.
        """
        victim = poll(lambda: self.workers_of(pool)[:1], timeout=60, what=f"pool {pool.pid} to fork")[0]
        os.kill(victim, signal.SIGSTOP)
        with self.sessions() as session:
            held = frozenset(
                session.scalars(
                    select(col(Query.custom_id)).where(
                        col(Query.batch_id) == batch_id,
                        col(Query.status) == "running",
                        col(Query.worker_id).contains(f":{victim}:"),
                    )
                ).all()
            )
        os.kill(victim, signal.SIGKILL)
        self.doomed.append(pool)
        return victim, held

    def broken(self) -> str | None:
        """Why the deployment is broken (a process that was not killed on purpose exited), or None."""
        for proc in self.stack.procs:
            if proc not in self.doomed and proc.poll() is not None:
                what = " ".join(str(a) for a in list(proc.args)[1:4])  # type: ignore[arg-type]
                return f"{what} exited with {proc.returncode}; logs in {self.stack.logs}"
        return None


Launch = Callable[..., Chaos]


@pytest.fixture
def launch(settings: Settings, private_database_url: str, sim: SimServer, tmp_path: Path) -> Iterator[Launch]:
    """``launch(pools=2, processes=1, threads=32, env={}, providers_toml=None)`` starts a deployment."""
    redis_url = REDIS_URL.rsplit("/", 1)[0] + f"/{CHAOS_REDIS_DB}"
    wipe = redis.Redis.from_url(redis_url)
    wipe.flushdb()
    engines: list[Any] = []
    started: list[Chaos] = []

    def start(
        *,
        pools: int = 2,
        processes: int = 1,
        threads: int = 32,
        env: dict[str, str] | None = None,
        providers_toml: str | None = None,
    ) -> Chaos:
        assert not started, "one deployment per test"
        namespace = f"chaos-{uuid.uuid4().hex[:6]}"
        full_env = {
            **os.environ,
            **settings_env(settings),
            "CONCLAVE_REDIS_URL": redis_url,
            "CONCLAVE_DATABASE_URL": private_database_url,
            "CONCLAVE_QUEUE_NAMESPACE": namespace,
            **(env or {}),
        }
        if providers_toml is not None:
            providers = tmp_path / "providers.toml"
            providers.write_text(providers_toml)
            full_env["CONCLAVE_PROVIDERS_FILE"] = str(providers)
        engine = make_engine(private_database_url, pool_size=2)
        engines.append(engine)
        sessions = make_sessionmaker(engine)
        with sessions.begin() as session:
            issued = issue_key(session, tenant_name="chaos", role="admin", tier="enterprise")
        stack = Stack(env=full_env, logs=tmp_path / "logs")
        stack.logs.mkdir()
        client = httpx.Client(
            base_url=stack.start_api(), headers={"Authorization": f"Bearer {issued.api_key}"}, timeout=60
        )
        chaos = Chaos(stack, client, redis.Redis.from_url(redis_url), sessions, issued.tenant_id, namespace)
        started.append(chaos)
        for _ in range(pools):
            chaos.start_pool(processes=processes, threads=threads)
        stack.start_scheduler()
        return chaos

    try:
        yield start
    finally:
        for chaos in started:
            chaos.client.close()
            chaos.stack.stop()
            chaos.redis.close()
        for engine in engines:
            engine.dispose()
        wipe.flushdb()
        wipe.close()


@pytest.fixture
def chaos(launch: Launch) -> Chaos:
    """The default deployment: two worker pools of one process × 32 threads, and a scheduler."""
    return launch()
