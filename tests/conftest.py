"""Shared fixtures: real Redis, a real database (SQLite, or PostgreSQL with CONCLAVE_TEST_DB=postgresql),
the simulated provider over real HTTP, and the real processes of a deployment.

A service a test needs is skipped locally when absent and required when ``CI`` is set.
Every session uses its own Redis key namespace and its own database, so runs never collide.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from shared.db import make_engine, make_sessionmaker, upgrade
from shared.settings import Settings
from shared.sim import SimConfig, SimServer
from shared.stack import Stack, redis_reachable
from shared.tenants import issue_key
from tests.leaks import CREATED_SECRETS, Leak, find_leaks, leaks_in_files, remember_secret
from tests.leaks import report as leak_report
from tests.receivers import WebhookReceiver

IN_CI = bool(os.environ.get("CI"))
REDIS_URL = os.environ.get("CONCLAVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "CONCLAVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
DB_KIND = os.environ.get("CONCLAVE_TEST_DB", "sqlite")


# ---------------------------------------------------------------- secrets never in logs

# CREATED_SECRETS (tests/leaks.py) holds every API key, webhook secret and provider key the suite
# creates (remember_secret adds one). After the last test, every log file under the session's base
# directory and everything pytest captured from each test (in-process apps log their JSON lines to
# stderr) is searched for them and for anything shaped like a key; one found fails the run. It is
# reported in the terminal summary rather than as a test error, because pytest prints a failing
# test's captured output, which would show the secret whole.
_LEAKS: list[Leak] = []
_SEEN_SECTIONS: set[tuple[str, str]] = set()
_BASETEMP: list[Path] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # A test's later reports repeat the sections of its earlier phases: each is searched once.
    for section, captured in report.sections:
        if (report.nodeid, section) not in _SEEN_SECTIONS:
            _SEEN_SECTIONS.add((report.nodeid, section))
            where = f"{report.nodeid} ({section.lower()})"
            _LEAKS.extend(find_leaks(where, captured.splitlines(), CREATED_SECRETS))


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where the session's processes write their logs (``Stack(logs=...)`` under ``tmp_path``)."""
    _BASETEMP.append(tmp_path_factory.getbasetemp())


def pytest_sessionfinish(session: pytest.Session) -> None:
    # After every fixture's teardown: each process has stopped and written its last line.
    for root in _BASETEMP[:1]:
        _LEAKS.extend(leaks_in_files(root, CREATED_SECRETS))
    if _LEAKS:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _LEAKS:
        terminalreporter.section("secrets in logs", red=True)
        terminalreporter.line(leak_report(_LEAKS), red=True)


def require(available: bool, what: str) -> None:
    if available:
        return
    if IN_CI:
        raise RuntimeError(f"{what} is required when CI is set")
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="session")
def redis_url() -> str:
    require(redis_reachable(REDIS_URL), f"Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture(scope="session")
def namespace(redis_url: str) -> Iterator[str]:
    ns = f"ctest-{uuid.uuid4().hex[:10]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{ns}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])
    client.close()


def _postgres_available() -> bool:
    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@contextmanager
def migrated_database(kind_prefix: str, sqlite_dir: Path) -> Iterator[str]:
    """A new, migrated database of the session's kind, dropped afterwards (SQLite: a file)."""
    if DB_KIND != "postgresql":
        url = f"sqlite:///{sqlite_dir / f'{kind_prefix}.db'}"
        upgrade(url)
        yield url
        return
    require(_postgres_available(), f"PostgreSQL at {POSTGRES_URL}")
    name = f"conclave_{kind_prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
        upgrade(url)
        yield url
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with migrated_database("test", tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture
def private_database_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database of the session's kind, for tests whose processes scan the
    whole database (scheduler jobs) and must not see other tests' rows."""
    with migrated_database("private", tmp_path) as url:
        yield url


@pytest.fixture
def own_database_url(private_database_url: str) -> str:
    return private_database_url


@pytest.fixture
def own_sessions(private_database_url: str) -> Iterator[Any]:
    """Sessions on the test's private database."""
    engine = make_engine(private_database_url, pool_size=4)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def sim_server() -> Iterator[SimServer]:
    with SimServer(SimConfig(seed=1234)) as server:
        yield server


@pytest.fixture
def sim(sim_server: SimServer) -> Iterator[SimServer]:
    """The simulated provider, reset to a fast, fault-free configuration for each test."""
    default = {
        "latency_ms": 0,
        "latency_jitter_ms": 0,
        "error_rate": 0,
        "error_kinds": ["server"],
        "models": {},
        "messy_ranking_rate": 0,
    }
    httpx.post(f"{sim_server.url}/_sim/config", json=default).raise_for_status()
    httpx.delete(f"{sim_server.url}/_sim/log").raise_for_status()
    yield sim_server


@pytest.fixture(scope="session")
def settings(
    database_url: str,
    redis_url: str,
    namespace: str,
    sim_server: SimServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        queue_namespace=namespace,
        sim_provider_url=sim_server.url,
        providers_file=tmp_path_factory.mktemp("cfg") / "absent-providers.toml",
        environment="test",
        # Every test request comes from 127.0.0.1: the per-IP limits are tested on their own.
        ip_requests_per_minute=1_000_000,
        auth_failures_per_minute=1_000_000,
        _env_file=None,  # type: ignore[call-arg]
    )


def settings_env(settings: Settings) -> dict[str, str]:
    return {
        "CONCLAVE_DATABASE_URL": settings.database_url,
        "CONCLAVE_REDIS_URL": settings.redis_url,
        "CONCLAVE_QUEUE_NAMESPACE": settings.queue_namespace,
        "CONCLAVE_SIM_PROVIDER_URL": settings.sim_provider_url,
        "CONCLAVE_PROVIDERS_FILE": str(settings.providers_file),
        "CONCLAVE_ENVIRONMENT": "test",
        # INFO, so the secrets check below reads what an operator's logs would hold.
        "CONCLAVE_LOG_LEVEL": "INFO",
        # Test receivers listen on 127.0.0.1; refusal of private addresses is tested in-process.
        "CONCLAVE_WEBHOOK_ALLOW_PRIVATE": "true",
        "CONCLAVE_IP_REQUESTS_PER_MINUTE": str(settings.ip_requests_per_minute),
        "CONCLAVE_AUTH_FAILURES_PER_MINUTE": str(settings.auth_failures_per_minute),
        # Several stacks run at once against one PostgreSQL (max_connections 100): keep each
        # process to 8 connections.
        "CONCLAVE_DB_POOL_SIZE": "4",
    }


@pytest.fixture(scope="session")
def sessions(settings: Settings) -> Any:
    engine = make_engine(settings.database_url, pool_size=4)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real processes: one API (uvicorn) and two worker processes on real Redis."""
    stack = Stack(env={**os.environ, **settings_env(settings)}, logs=tmp_path_factory.mktemp("logs"))
    try:
        stack.start_api()
        stack.start_workers(processes=2, threads=32)
        yield stack
    finally:
        stack.stop()
        if stack.dead():
            print(stack.log_text())


def new_key(sessions: Any, tenant: str | None = None, role: str = "admin") -> tuple[str, str]:
    with sessions.begin() as session:
        issued = issue_key(
            session, tenant_name=tenant or f"t-{uuid.uuid4().hex[:8]}", role=role, tier="enterprise"
        )
    remember_secret(issued.api_key, issued.webhook_secret)
    return issued.api_key, issued.tenant_id


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A webhook receiver on 127.0.0.1 (tests/receivers.py): 200, or what its ``script`` says."""
    with WebhookReceiver() as r:
        yield r


@pytest.fixture
def tenant_key(sessions: Any) -> tuple[str, str]:
    return new_key(sessions)


@pytest.fixture
def client(stack: Stack, tenant_key: tuple[str, str]) -> Iterator[httpx.Client]:
    assert stack.api_url
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {tenant_key[0]}"}, timeout=60
    ) as c:
        yield c
