"""``GET /v1/batches/{id}/events`` against the real system (SPEC §12): two API replicas, two
worker processes, the simulated provider over HTTP.

Three clients follow one 2,000-query batch with ``?queries=true``: one on each replica that
never disconnects, and one that drops its connection mid-batch on the first replica and resumes
on the second with ``Last-Event-ID``. All three must see the same ``query`` events in the same
order, every query once, stage counts that never decrease, and an ``end`` equal to the batch
object the API serves afterwards.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from shared.progress import STAGES, parse_event_stream
from shared.sim import SimServer
from shared.stack import Stack
from tests.conftest import new_key, settings_env
from tests.helpers import tagged_queries

pytestmark = pytest.mark.integration

QUERIES = 2000


@pytest.fixture(scope="module")
def second_api(stack: Stack) -> str:
    return stack.start_api()


def set_sim(sim: SimServer, **config: object) -> None:
    httpx.post(f"{sim.url}/_sim/config", json=config).raise_for_status()


def follow(
    url: str, key: str, batch_id: str, last_event_id: str | None = None, stop_after: int | None = None
) -> Iterator[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    with (
        httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=30)) as client,
        client.stream("GET", f"/v1/batches/{batch_id}/events?queries=true", headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for n, event in enumerate(parse_event_stream(response.iter_lines()), start=1):
            yield event
            if event["event"] == "end" or (stop_after is not None and n >= stop_after):
                return


class Recorder(threading.Thread):
    """Follows the stream in a thread; on ``hop_after`` events, disconnects and resumes on ``hop_to``."""

    def __init__(self, url: str, key: str, batch_id: str, hop_after: int | None = None, hop_to: str = ""):
        super().__init__(daemon=True)
        self.url, self.key, self.batch_id = url, key, batch_id
        self.hop_after, self.hop_to = hop_after, hop_to
        self.events: list[dict[str, Any]] = []
        self.hopped_at: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.hop_after is None:
                self.events.extend(follow(self.url, self.key, self.batch_id))
                return
            self.events.extend(follow(self.url, self.key, self.batch_id, stop_after=self.hop_after))
            self.hopped_at = self.events[-1]["id"]
            self.events.extend(follow(self.hop_to, self.key, self.batch_id, last_event_id=self.hopped_at))
        except BaseException as exc:
            self.error = exc


def queries_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [orjson.loads(e["data"]) for e in events if e["event"] == "query"]


def stages_of(events: list[dict[str, Any]]) -> list[dict[str, int]]:
    return [
        {s: v["done"] for s, v in orjson.loads(e["data"])["stages"].items()}
        for e in events
        if e["event"] == "progress"
    ]


def test_followers_on_two_replicas_and_a_resumed_one_see_the_same_events(
    stack: Stack, second_api: str, client: httpx.Client, tenant_key: tuple[str, str], sim: SimServer
) -> None:
    assert stack.api_url
    set_sim(sim, latency_ms=30, latency_jitter_ms=20)
    created = client.post("/v1/batches", json={"queries": tagged_queries(QUERIES, prefix="ev")})
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    key = tenant_key[0]

    steady = Recorder(stack.api_url, key, batch_id)
    other_replica = Recorder(second_api, key, batch_id)
    # Drops after its first few hundred events (mid-batch) and resumes on the other replica.
    resumed = Recorder(stack.api_url, key, batch_id, hop_after=300, hop_to=second_api)
    for r in (steady, other_replica, resumed):
        r.start()
    for r in (steady, other_replica, resumed):
        r.join(timeout=280)
        assert not r.is_alive(), "the stream did not end"
        assert r.error is None, r.error

    final = client.get(f"/v1/batches/{batch_id}").json()
    assert final["status"] == "completed"
    assert resumed.hopped_at is not None
    before_hop = stages_of(resumed.events[:300])
    assert before_hop and before_hop[-1]["synthesis"] < QUERIES, "the client must drop out mid-batch"

    expected = queries_of(steady.events)
    assert len(expected) == QUERIES and len({q["query_id"] for q in expected}) == QUERIES
    assert {q["status"] for q in expected} == {"succeeded"}
    for r in (other_replica, resumed):
        assert queries_of(r.events) == expected

    for r in (steady, other_replica, resumed):
        assert r.events[-1]["event"] == "end"
        assert orjson.loads(r.events[-1]["data"]) == final
        ids = [e.get("id") for e in r.events]
        assert all(ids), "every event has an id"
        stages = stages_of(r.events)
        assert len(stages) >= 2
        for stage in STAGES:
            seen = [s[stage] for s in stages]
            assert seen == sorted(seen), f"{stage} went backwards: {seen}"
        assert stages[-1] == dict.fromkeys(STAGES, QUERIES)
        last_progress = [orjson.loads(e["data"]) for e in r.events if e["event"] == "progress"][-1]
        assert last_progress["request_counts"] == final["request_counts"]
        assert last_progress["status"] == "completed" and last_progress["cost_usd"] == final["cost_usd"]


def test_a_stream_reconnecting_after_the_end_gets_the_end_again_and_nothing_twice(
    stack: Stack, client: httpx.Client, tenant_key: tuple[str, str], sim: SimServer
) -> None:
    assert stack.api_url
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(20, prefix="ev-end")}).json()["id"]
    first = list(follow(stack.api_url, tenant_key[0], batch_id))
    again = list(follow(stack.api_url, tenant_key[0], batch_id, last_event_id=first[-1]["id"]))
    assert [e["event"] for e in again] == ["end"]
    assert again[-1]["data"] == first[-1]["data"]


def test_another_tenants_batch_has_no_stream(stack: Stack, client: httpx.Client, sessions: Any) -> None:
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(2, prefix="ev-x")}).json()["id"]
    stranger, _ = new_key(sessions)
    with httpx.Client(base_url=stack.api_url or "", headers={"Authorization": f"Bearer {stranger}"}) as other:
        for path in (f"/v1/batches/{batch_id}/events", f"/v1/batches/{batch_id}/events?queries=true"):
            r = other.get(path)
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        unknown = other.get("/v1/batches/batch_doesnotexist/events")
        assert unknown.status_code == 404
    assert httpx.get(f"{stack.api_url}/v1/batches/{batch_id}/events").status_code == 401


def test_an_api_shutting_down_ends_its_streams_at_once(
    settings: Any, tmp_path: Any, tenant_key: tuple[str, str], rclient: Any
) -> None:
    """Before sse-starlette ended them, uvicorn waited for every open stream to close (58 s with
    one stream until the client gave up): a rolling restart stalled behind its own clients."""
    # A queue namespace no worker consumes: the batch stays in progress, its stream open.
    own_settings = settings.model_copy(update={"queue_namespace": f"{settings.queue_namespace}-stop"})
    own = Stack(env={**os.environ, **settings_env(own_settings)}, logs=tmp_path)
    try:
        url = own.start_api()
        api = own.procs[-1]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tenant_key[0]}"}) as c:
            batch_id = c.post("/v1/batches", json={"queries": tagged_queries(2, prefix="ev-stop")}).json()[
                "id"
            ]
        events = follow(url, tenant_key[0], batch_id)
        assert next(events)["event"] == "progress"
        started = time.monotonic()
        api.send_signal(signal.SIGTERM)
        with pytest.raises(StopIteration):  # the server closed the stream
            while True:
                assert next(events)["event"] != "end", "the batch cannot end: nothing runs it"
        api.wait(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        own.stop()
        for key in rclient.scan_iter(f"{own_settings.queue_namespace}:*"):
            rclient.delete(key)
