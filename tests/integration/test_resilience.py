"""Providers that misbehave, against real worker processes: injected faults, a provider that
refuses connections (shared circuit breaker), a shared rpm limit, unreachable chairmen.

Each test starts its own API and workers with its own ``providers.toml`` and Redis namespace.
"""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select

from shared.models import ProviderCall
from shared.settings import Settings
from shared.sim import SimConfig, SimServer
from shared.stack import Stack, free_port
from tests.conftest import new_key, settings_env
from tests.helpers import jsonl, poll, sim_log, tagged_queries, wait_for_batch
from tests.leaks import remember_secret

pytestmark = pytest.mark.integration

StackFactory = Callable[..., tuple[Stack, httpx.Client, str]]


@pytest.fixture
def make_stack(settings: Settings, sessions: Any, tmp_path: Path) -> Iterator[StackFactory]:
    """Start an API and workers with the given providers.toml in a fresh Redis namespace."""
    started: list[tuple[Stack, httpx.Client, str]] = []

    def start(
        providers_toml: str, *, processes: int = 2, threads: int = 32
    ) -> tuple[Stack, httpx.Client, str]:
        namespace = f"ctest-res-{uuid.uuid4().hex[:8]}"
        providers = tmp_path / f"providers-{namespace}.toml"
        providers.write_text(providers_toml)
        env = {
            **os.environ,
            **settings_env(settings),
            "CONCLAVE_PROVIDERS_FILE": str(providers),
            "CONCLAVE_QUEUE_NAMESPACE": namespace,
            "SIM_API_KEY": remember_secret("sk-sim-test"),
        }
        stack = Stack(env=env, logs=tmp_path / f"logs-{namespace}")
        stack.logs.mkdir()
        url = stack.start_api()
        stack.start_workers(processes=processes, threads=threads)
        key, _ = new_key(sessions)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        started.append((stack, client, namespace))
        return stack, client, namespace

    yield start
    rdb = redis.Redis.from_url(settings.redis_url)
    for stack, client, namespace in started:
        client.close()
        stack.stop()
        keys = list(rdb.scan_iter(f"{namespace}:*"))
        if keys:
            rdb.delete(*keys)
    rdb.close()


class RefusingServer:
    """Accepts a TCP connection and closes it at once, noting when: a provider that is down."""

    def __init__(self, port: int = 0):
        self.accepts: list[float] = []
        accepts = self.accepts

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                accepts.append(time.time())
                self.request.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            # With the default backlog of 5, a burst of connects has SYNs dropped and retried by
            # the kernel a second later: the calls would look late though they were made early.
            request_queue_size = 1024

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sim_provider(name: str, url: str, **extra: object) -> str:
    lines = [f"[providers.{name}]", 'api = "openai"', f'base_url = "{url}/v1"', 'api_key_env = "SIM_API_KEY"']
    lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines).replace("'", '"') + "\n"


def set_sim(sim: SimServer, **config: object) -> None:
    httpx.post(f"{sim.url}/_sim/config", json=config).raise_for_status()


def test_injected_faults_leave_at_least_99_5_percent_succeeded_and_a_full_ledger(
    make_stack: StackFactory, sim: SimServer, sessions: Any
) -> None:
    toml = (
        sim_provider("sim", sim.url, timeout_s=1.0, max_concurrency=512)
        + """
[models."sim:alpha"]
input_usd_per_mtok = 1.0
output_usd_per_mtok = 2.0
[models."sim:beta"]
input_usd_per_mtok = 1.0
output_usd_per_mtok = 2.0
[models."sim:gamma"]
input_usd_per_mtok = 1.0
output_usd_per_mtok = 2.0
[models."sim:chairman"]
input_usd_per_mtok = 5.0
output_usd_per_mtok = 10.0
[council]
members = ["sim:alpha", "sim:beta", "sim:gamma"]
chairman = "sim:chairman"
"""
    )
    _, client, _ = make_stack(toml, processes=2, threads=64)
    # 20% HTTP 500, 10% 429 with retry-after, 5% hangs past the 1 s timeout.
    set_sim(
        sim,
        error_rate=0.35,
        error_kinds=["server"] * 4 + ["rate_limited"] * 2 + ["timeout"],
        hang_s=3,
        retry_after_s=1,
        seed=42,
    )
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(1000, prefix="fault")}).json()["id"]
    final = wait_for_batch(client, batch_id, timeout=600)
    set_sim(sim, error_rate=0)

    counts = final["request_counts"]
    assert final["status"] == "completed"
    failed = jsonl(client.get(f"/v1/batches/{batch_id}/results", params={"status": "failed"}))
    print(f"fault mix: {counts['completed']} of 1000 succeeded")
    assert counts["completed"] >= 995, (counts, [r["error"] for r in failed[:3]])

    with sessions() as s:
        calls = s.scalars(select(ProviderCall).where(ProviderCall.batch_id == batch_id)).all()
    categories = {c.error_category for c in calls if c.status == "failed"}
    assert {"server", "rate_limited", "timeout"} <= categories
    # Every attempt that reached the provider is in the ledger, and nothing else is.
    reached = [c for c in calls if c.error_category != "circuit_open"]
    requests = [r for r in sim_log(sim.url) if "[tag:fault-" in r["text"]]
    assert len(reached) == len(requests)
    # Only calls that returned usage cost anything; the batch's cost is their sum.
    assert all(c.cost_usd == 0 and c.input_tokens == 0 for c in calls if c.status == "failed")
    paid = sum(c.cost_usd for c in calls if c.status == "succeeded")
    assert paid > 0
    assert final["cost_usd"] == pytest.approx(paid, rel=1e-6)
    assert final["usage"]["input_tokens"] == sum(c.input_tokens for c in calls)


def test_circuit_opens_for_every_worker_and_closes_when_the_provider_returns(
    make_stack: StackFactory, sim: SimServer, settings: Settings
) -> None:
    down = RefusingServer()
    cooldown = 4.0
    toml = (
        sim_provider("p1", sim.url)
        + sim_provider("p2", sim.url)
        + f"""
[providers.p3]
api = "openai"
base_url = "http://127.0.0.1:{down.port}/v1"
api_key_env = "SIM_API_KEY"
timeout_s = 2
breaker_failures = 3
breaker_cooldown_s = {cooldown}

[council]
members = ["p1:alpha", "p2:beta", "p3:gamma"]
chairman = "p1:chairman"
"""
    )
    _, client, namespace = make_stack(toml, processes=2, threads=32)
    set_sim(sim, latency_ms=50)
    rdb = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    breaker_key = f"{namespace}:breaker:p3"
    try:
        batch_id = client.post("/v1/batches", json={"queries": tagged_queries(300, prefix="cb")}).json()["id"]
        opened = poll(
            lambda: rdb.hget(breaker_key, "state") == "open" and rdb.hget(breaker_key, "opened_at"),
            timeout=60,
            interval=0.05,
            what="the circuit to open",
        )
        opened_at = float(str(opened)) / 1000
        final = wait_for_batch(client, batch_id, timeout=180)
        sample = jsonl(client.get(f"/v1/batches/{batch_id}/results"))[:1]
        assert final["status"] == "completed" and final["request_counts"]["completed"] == 300, str(sample)
        # Within a second of opening, no worker process calls the provider any more, until the
        # cooldown lets a single probe through.
        late = [t for t in down.accepts if opened_at + 1.0 < t < opened_at + cooldown]
        assert late == [], f"connections {[round(t - opened_at, 2) for t in late]} s after the circuit opened"
        assert len([t for t in down.accepts if t <= opened_at + 1.0]) >= 3
        for record in jsonl(client.get(f"/v1/batches/{batch_id}/results")):
            assert record["status"] == "succeeded"
            gamma = next(m for m in record["members"] if m["model"] == "p3:gamma")
            assert gamma["status"] == "failed" and gamma["error"]["type"] in ("network", "circuit_open"), (
                gamma
            )
            assert sum(1 for m in record["members"] if m["status"] == "succeeded") == 2

        # The provider comes back on the same port: the circuit half-opens, a probe succeeds, it closes.
        port = down.port
        down.stop()
        with SimServer(SimConfig(), port=port):

            def closed() -> bool:
                client.post(
                    "/v1/batches", json={"queries": tagged_queries(5, prefix=f"cb2-{time.time_ns()}")}
                )
                return rdb.hget(breaker_key, "state") == "closed"

            poll(closed, timeout=90, interval=1.0, what="the circuit to close again")
            batch_id = client.post("/v1/batches", json={"queries": tagged_queries(20, prefix="cb3")}).json()[
                "id"
            ]
            final = wait_for_batch(client, batch_id, timeout=60)
            for record in jsonl(client.get(f"/v1/batches/{batch_id}/results")):
                assert all(m["status"] == "succeeded" for m in record["members"])
    finally:
        rdb.close()
        down.stop()


def test_rpm_limit_holds_across_four_worker_processes(make_stack: StackFactory, sim: SimServer) -> None:
    rpm = 600
    toml = (
        sim_provider("sim", sim.url, rpm=rpm)
        + """
[council]
members = ["sim:alpha", "sim:beta", "sim:gamma"]
chairman = "sim:chairman"
"""
    )
    _, client, _ = make_stack(toml, processes=4, threads=16)
    set_sim(sim, latency_ms=20)
    # 100 queries × 7 calls = 700 calls: more than a minute's allowance, so the limit must bite.
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(100, prefix="rpm")}).json()["id"]
    final = wait_for_batch(client, batch_id, timeout=240)
    assert final["status"] == "completed"
    assert final["request_counts"]["completed"] == 100  # nothing failed because of the limiter

    times = sorted(r["ts"] for r in sim_log(sim.url) if "[tag:rpm-" in r["text"])
    assert len(times) == 700
    busiest, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 60.0:
            j += 1
        busiest = max(busiest, i - j + 1)
    assert busiest <= rpm, f"{busiest} requests in one 60 s window"
    span = times[-1] - times[0]
    print(f"rpm {rpm}: busiest 60 s window held {busiest} of {len(times)} requests over {span:.1f} s")


def test_unreachable_chairman_falls_back_then_top_ranked(make_stack: StackFactory, sim: SimServer) -> None:
    closed_port = free_port()
    toml = (
        sim_provider("sim", sim.url)
        + f"""
[providers.down]
api = "openai"
base_url = "http://127.0.0.1:{closed_port}/v1"
timeout_s = 2

[models."down:chair"]
fallbacks = ["sim:chairman"]

[models."down:chair2"]
fallbacks = ["down:chair3"]

[council]
members = ["sim:alpha", "sim:beta", "sim:gamma"]
chairman = "down:chair"
"""
    )
    _, client, _ = make_stack(toml, processes=1, threads=16)
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(10, prefix="ch")}).json()["id"]
    assert wait_for_batch(client, batch_id, timeout=120)["status"] == "completed"
    for record in jsonl(client.get(f"/v1/batches/{batch_id}/results")):
        assert record["synthesis"] == "fallback_chairman"
        assert record["answer"].startswith("[simulated chairman] Council synthesis for:")

    body = {"queries": tagged_queries(10, prefix="top"), "council": {"chairman": "down:chair2"}}
    batch_id = client.post("/v1/batches", json=body).json()["id"]
    assert wait_for_batch(client, batch_id, timeout=120)["status"] == "completed"
    for record in jsonl(client.get(f"/v1/batches/{batch_id}/results", params={"include": "stages"})):
        assert record["status"] == "succeeded"
        assert record["synthesis"] == "top_ranked"
        best = record["aggregate_ranking"][0]["model"]
        answers = {a["model"]: a["answer"] for a in record["stages"]["answers"]}
        assert record["answer"] == answers[best]
        assert "Error" not in record["answer"]
