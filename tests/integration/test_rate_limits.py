"""Rate limits (SPEC §6): the per-key sliding window held in Redis across two real API processes,
the per-IP window, the per-address budget of failed authentications (which never refuses a valid
key), and which address counts as the client's behind trusted proxies."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.main import create_app
from api.ratelimit import client_ip
from shared.settings import Settings
from shared.stack import Stack
from shared.tenants import issue_key
from tests.conftest import new_key, settings_env
from tests.helpers import error_body

pytestmark = pytest.mark.integration

KEY_LIMIT = 60  # the free tier's requests per minute per key
BURST = 200


def drop_namespace(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def assert_error(response: Any, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = error_body(response)
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}, body
    assert body["error"]["type"] == type_ and body["error"]["message"], body
    return dict(body["error"])


def assert_limited(response: Any, limit: int) -> None:
    """A 429 as SPEC §6 has it: Retry-After and the RateLimit-* triple, in the error shape."""
    assert_error(response, 429, "rate_limit_error")
    h = response.headers
    assert 1 <= int(h["Retry-After"]) <= 60, dict(h)
    assert h["RateLimit-Limit"] == str(limit), dict(h)
    assert h["RateLimit-Remaining"] == "0", dict(h)
    assert 0 < int(h["RateLimit-Reset"]) <= 60, dict(h)


# ---------------------------------------------------------------- per key, two API processes


@pytest.fixture
def two_apis(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, str]]:
    namespace = f"{settings.queue_namespace}-rl-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        **settings_env(settings),
        "CONCLAVE_IP_REQUESTS_PER_MINUTE": "1000000",
        "CONCLAVE_QUEUE_NAMESPACE": namespace,
    }
    stack = Stack(env=env, logs=tmp_path)
    try:
        first = stack.start_api()
        second = stack.start_api()
        yield first, second
    finally:
        stack.stop()
        if stack.dead():
            print(stack.log_text())
        drop_namespace(settings.redis_url, namespace)


def test_key_limit_is_shared_by_api_processes(two_apis: tuple[str, str], sessions: Any) -> None:
    with sessions.begin() as s:
        key = issue_key(s, tenant_name=f"free-{uuid.uuid4().hex[:10]}", role="admin", tier="free").api_key
    headers = {"Authorization": f"Bearer {key}"}
    clients = [httpx.Client(base_url=url, headers=headers, timeout=30) for url in two_apis]
    try:
        # A few in a row first: Remaining counts down one by one.
        sequential = [clients[i % 2].get("/v1/batches") for i in range(3)]
        assert [r.status_code for r in sequential] == [200, 200, 200]
        assert [int(r.headers["RateLimit-Remaining"]) for r in sequential] == [
            KEY_LIMIT - 1,
            KEY_LIMIT - 2,
            KEY_LIMIT - 3,
        ]

        def fire(i: int) -> tuple[int, httpx.Response]:
            return i % 2, clients[i % 2].get("/v1/batches")

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            burst = list(pool.map(fire, range(BURST - len(sequential))))
        elapsed = time.monotonic() - started
    finally:
        for c in clients:
            c.close()

    responses = [(i % 2, r) for i, r in enumerate(sequential)] + burst
    ok = [(proc, r) for proc, r in responses if r.status_code == 200]
    limited = [r for _, r in responses if r.status_code == 429]
    per_process = [sum(1 for proc, _ in ok if proc == p) for p in (0, 1)]
    print(
        f"\nper-key limit {KEY_LIMIT}/min over 2 API processes: {len(responses)} requests in "
        f"{elapsed + 0.0:.2f} s -> {len(ok)} x 200 (process 1: {per_process[0]}, process 2: "
        f"{per_process[1]}), {len(limited)} x 429"
    )
    assert elapsed < 30, "the burst must fit well inside one window"
    assert len(ok) + len(limited) == BURST, {r.status_code for _, r in responses}
    assert KEY_LIMIT - 1 <= len(ok) <= KEY_LIMIT  # never more than the limit in a window
    assert all(n > 0 for n in per_process), "both processes served: the window is shared in Redis"

    remaining = sorted(int(r.headers["RateLimit-Remaining"]) for _, r in ok)
    assert len(set(remaining)) == len(remaining), "every admitted request took its own slot"
    assert remaining[0] >= 0 and remaining[-1] == KEY_LIMIT - 1
    for _, r in ok:
        assert r.headers["RateLimit-Limit"] == str(KEY_LIMIT)
        assert 0 < int(r.headers["RateLimit-Reset"]) <= 60
    for r in limited:
        assert_limited(r, KEY_LIMIT)


# ---------------------------------------------------------------- per IP, in process


@pytest.fixture
def fresh(settings: Settings) -> Iterator[dict[str, Any]]:
    """Settings updates for an app with its own Redis namespace (so its windows start empty)."""
    namespace = f"{settings.queue_namespace}-ip-{uuid.uuid4().hex[:6]}"
    apps: list[FastAPI] = []
    yield {"queue_namespace": namespace, "_apps": apps}
    for app in apps:
        app.state.conclave.broker.client.close()
        app.state.conclave.sessions.kw["bind"].dispose()
    drop_namespace(settings.redis_url, namespace)


def make_app(settings: Settings, fresh: dict[str, Any], **update: Any) -> FastAPI:
    app = create_app(settings.model_copy(update={"queue_namespace": fresh["queue_namespace"], **update}))
    fresh["_apps"].append(app)
    return app


def test_ip_limit_refuses_the_31st_request_but_never_healthz(
    settings: Settings, fresh: dict[str, Any], sessions: Any
) -> None:
    app = make_app(settings, fresh, ip_requests_per_minute=30)
    key, _ = new_key(sessions)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as api:
        for _ in range(40):
            assert api.get("/healthz").status_code == 200
        statuses = [api.get("/v1/batches").status_code for _ in range(30)]
        assert statuses == [200] * 30
        refused = api.get("/v1/batches")
        assert_error(refused, 429, "rate_limit_error")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["RateLimit-Limit"] == "30"
        assert refused.headers["RateLimit-Remaining"] == "0"
        assert 0 < int(refused.headers["RateLimit-Reset"]) <= 60
        # Unauthenticated and authenticated alike: the address is out of requests.
        assert api.get("/v1/batches", headers={"Authorization": "Bearer cnk_nope"}).status_code == 429
        for _ in range(40):
            assert api.get("/healthz").status_code == 200
        assert api.get("/readyz").status_code == 200


def test_failed_authentications_lock_out_neither_valid_keys_nor_other_addresses(
    settings: Settings, fresh: dict[str, Any], sessions: Any
) -> None:
    # As a user met it: a fuzzer (or a misconfigured job) behind a NAT sends ~70 requests with
    # bad keys; everyone else behind that address must keep working. Production limits.
    app = make_app(settings, fresh, ip_requests_per_minute=1200, auth_failures_per_minute=60)
    key, _ = new_key(sessions)
    good = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as api:
        bad = [api.get("/v1/batches", headers={"Authorization": f"Bearer cnk_guess-{i}"}) for i in range(70)]
        assert [r.status_code for r in bad] == [401] * 60 + [429] * 10
        for r in bad[60:]:
            assert_error(r, 429, "rate_limit_error")
            assert 1 <= int(r.headers["Retry-After"]) <= 60
            assert r.headers["RateLimit-Limit"] == "60" and r.headers["RateLimit-Remaining"] == "0"
        # Meanwhile a valid key from the same address is served, and counted against its own limit.
        served = [api.get("/v1/batches", headers=good) for _ in range(5)]
        assert [r.status_code for r in served] == [200] * 5
        assert served[-1].headers["RateLimit-Limit"] == "6000"  # the key's (enterprise) limit
        # The guesser is still refused, the valid key still served, interleaved.
        for i in range(3):
            assert (
                api.get("/v1/batches", headers={"Authorization": f"Bearer cnk_again-{i}"}).status_code == 429
            )
            assert api.get("/v1/batches", headers=good).status_code == 200
    with TestClient(app, client=("192.0.2.60", 40003)) as elsewhere:
        # Another address has its own failure budget.
        assert elsewhere.get("/v1/batches", headers={"Authorization": "Bearer cnk_typo"}).status_code == 401


def test_a_failure_budget_of_one_refuses_the_second_guess(settings: Settings, fresh: dict[str, Any]) -> None:
    app = make_app(settings, fresh, ip_requests_per_minute=1200, auth_failures_per_minute=1)
    with TestClient(app) as api:
        statuses = [
            api.get("/v1/batches", headers={"Authorization": f"Bearer cnk_guess-{i}"}).status_code
            for i in range(4)
        ]
        assert statuses == [401, 429, 429, 429]
        # Refused guesses are not charged to the address's general budget beyond the request itself.
        assert api.get("/healthz").status_code == 200
        assert api.get("/openapi.json").status_code == 200


def test_each_client_behind_a_trusted_proxy_has_its_own_budget(
    settings: Settings, fresh: dict[str, Any], sessions: Any
) -> None:
    app = make_app(settings, fresh, ip_requests_per_minute=5, trusted_proxies=["127.0.0.0/8"])
    key, _ = new_key(sessions)
    headers = {"Authorization": f"Bearer {key}"}

    def run(client: TestClient, forwarded_for: str | None, n: int) -> list[int]:
        extra = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
        return [client.get("/v1/batches", headers={**headers, **extra}).status_code for _ in range(n)]

    with TestClient(app, client=("127.0.0.1", 40001)) as proxy:
        assert run(proxy, "203.0.113.10", 6) == [200] * 5 + [429]
        # Another client behind the same proxy: its own window; a spoofed left-most hop changes nothing.
        assert run(proxy, "198.51.100.7, 203.0.113.11", 5) == [200] * 5
        assert run(proxy, "1.2.3.4, 203.0.113.11", 1) == [429]
    with TestClient(app, client=("192.0.2.50", 40002)) as direct:
        # An untrusted peer's X-Forwarded-For is ignored: rotating it does not buy more requests.
        statuses = [
            direct.get("/v1/batches", headers={**headers, "X-Forwarded-For": f"10.9.8.{i}"}).status_code
            for i in range(6)
        ]
        assert statuses == [200] * 5 + [429]


def test_client_ip_without_trusted_proxies_is_the_peer() -> None:
    assert client_ip("192.0.2.1", None, []) == "192.0.2.1"
    assert client_ip("192.0.2.1", "203.0.113.5", []) == "192.0.2.1"
    assert client_ip("127.0.0.1", "203.0.113.5", []) == "127.0.0.1"
    assert client_ip(None, "203.0.113.5", ["0.0.0.0/0"]) == "unknown"


def test_client_ip_behind_a_trusted_proxy_is_the_right_most_untrusted_hop() -> None:
    trusted = ["127.0.0.0/8", "10.0.0.0/8"]
    assert client_ip("127.0.0.1", "203.0.113.5", trusted) == "203.0.113.5"
    # The client may have sent its own X-Forwarded-For: only what our proxies appended counts.
    assert client_ip("127.0.0.1", "198.51.100.9, 203.0.113.5", trusted) == "203.0.113.5"
    assert client_ip("127.0.0.1", "198.51.100.9, 203.0.113.5, 10.1.2.3", trusted) == "203.0.113.5"
    assert client_ip("10.0.0.7", " 203.0.113.5 ,10.0.0.8 ", trusted) == "203.0.113.5"
    # Nothing untrusted in the chain: the peer itself.
    assert client_ip("127.0.0.1", "10.1.1.1, 127.0.0.2", trusted) == "127.0.0.1"
    assert client_ip("127.0.0.1", None, trusted) == "127.0.0.1"
    assert client_ip("127.0.0.1", "", trusted) == "127.0.0.1"
    # IPv6 works the same way.
    assert client_ip("::1", "2001:db8::1", ["::1/128"]) == "2001:db8::1"


def test_client_ip_ignores_forwarded_for_from_an_untrusted_peer() -> None:
    trusted = ["127.0.0.0/8"]
    assert client_ip("198.51.100.20", "127.0.0.1", trusted) == "198.51.100.20"
    assert client_ip("198.51.100.20", "203.0.113.5, 10.0.0.1", trusted) == "198.51.100.20"
    # A peer that is not an IP address at all (the test client's "testclient") is never trusted.
    assert client_ip("testclient", "203.0.113.5", trusted) == "testclient"
