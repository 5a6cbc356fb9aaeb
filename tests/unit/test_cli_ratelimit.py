"""The client commands' one rate-limit layer (SPEC §18), driven over ``httpx.MockTransport`` with a
fake clock: a 429 it can wait out is waited out and the request sent again; ``RateLimit-*`` paces
the next request so that a long ``--wait`` never runs into the limit at all."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable

import httpx
import pytest

from shared.cli.client import api_client
from shared.cli.ratelimit import MAX_WAIT_S, RateLimitTransport


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 3))
        self.now += seconds


def limited(retry_after: str | None = None, **headers: str) -> httpx.Response:
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    body = {"error": {"type": "rate_limit_error", "message": "slow down", "param": None}}
    return httpx.Response(429, headers=headers, json=body)


def ok(remaining: int = 50, reset: int = 60) -> httpx.Response:
    return httpx.Response(
        200, json={"ok": True}, headers={"RateLimit-Remaining": str(remaining), "RateLimit-Reset": str(reset)}
    )


def client_for(
    answers: list[httpx.Response], clock: Clock, waits: list[tuple[float, str]] | None = None
) -> tuple[httpx.Client, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answers.pop(0)

    def on_wait(seconds: float, why: str) -> None:
        if waits is not None:
            waits.append((seconds, why))

    transport = RateLimitTransport(
        httpx.MockTransport(handler), sleep=clock.sleep, clock=clock.time, on_wait=on_wait
    )
    return httpx.Client(transport=transport, base_url="http://api.test"), sent


def test_a_429_is_waited_out_and_the_request_sent_again_body_and_all() -> None:
    clock, waits = Clock(), list[tuple[float, str]]()
    client, sent = client_for([limited("3"), limited("2"), ok()], clock, waits)
    response = client.post("/v1/batches", json={"queries": [{"custom_id": "a", "prompt": "hi"}]})
    assert response.status_code == 200
    assert clock.slept == [3.0, 2.0]
    assert [w for w, _ in waits] == [3.0, 2.0] and "slow down" in waits[0][1]
    assert len(sent) == 3 and all(json.loads(r.content)["queries"][0]["custom_id"] == "a" for r in sent)


def test_an_http_date_retry_after_is_honoured() -> None:
    clock = Clock()
    when = email.utils.formatdate(time.time() + 30, usegmt=True)  # a date is wall-clock time
    client, _ = client_for([limited(when), ok()], clock)
    assert client.get("/v1/batches/b").status_code == 200
    assert len(clock.slept) == 1 and 20 < clock.slept[0] <= 30  # whole seconds, and time passes


def test_without_retry_after_the_ratelimit_reset_says_how_long() -> None:
    clock = Clock()
    client, _ = client_for(
        [limited(None, **{"RateLimit-Remaining": "0", "RateLimit-Reset": "7"}), ok()], clock
    )
    assert client.get("/v1/batches/b").status_code == 200
    assert clock.slept == [7.0]


def test_without_any_hint_it_backs_off_exponentially() -> None:
    clock = Clock()
    client, _ = client_for([limited(), limited(), limited(), ok()], clock)
    assert client.get("/v1/batches/b").status_code == 200
    assert clock.slept == [1.0, 2.0, 4.0]


def test_a_wait_longer_than_it_is_worth_is_returned_to_the_command() -> None:
    # A daily quota resets at midnight: a command should say so rather than hang for hours.
    clock = Clock()
    client, sent = client_for([limited(str(int(MAX_WAIT_S) + 1))], clock)
    response = client.get("/v1/batches/b")
    assert response.status_code == 429 and len(sent) == 1 and clock.slept == []


def test_ratelimit_headers_pace_the_next_request() -> None:
    clock = Clock()
    client, _ = client_for(
        [ok(remaining=9, reset=50), ok(remaining=0, reset=12), ok(), ok(remaining=5000)], clock
    )
    client.get("/a")  # nothing known yet: no wait
    assert clock.slept == []
    client.get("/b")  # 9 left for the next 50 s: one every 5 s
    client.get("/c")  # none left: wait for the window to free one
    client.get("/d")  # plenty: no wait beyond what has passed
    assert clock.slept == [5.0, 12.0, pytest.approx(60 / 51, abs=0.01)]


def test_time_spent_between_requests_counts_towards_the_pace() -> None:
    clock = Clock()
    client, _ = client_for([ok(remaining=9, reset=50), ok()], clock)
    client.get("/a")
    clock.now += 4  # the caller did something else for 4 of the 5 s
    client.get("/b")
    assert clock.slept == [1.0]


def test_the_client_commands_use_it() -> None:
    transports: list[Callable[..., object]] = []
    with api_client("http://api.test", "cnk_test") as client:
        transports.append(type(client._transport))
    assert transports == [RateLimitTransport]
