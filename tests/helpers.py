"""Test helpers: polling with a deadline (never a bare sleep), batch bodies, result parsing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import httpx
import orjson
import pytest

T = TypeVar("T")
TERMINAL = {"completed", "failed", "cancelled", "expired"}


def poll(check: Callable[[], T | None], timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def counts_add_up(batch: dict[str, Any]) -> bool:
    c = batch["request_counts"]
    return (
        c["completed"] + c["failed"] + c["queued"] + c["running"] + c["cancelled"] + c["expired"]
        == c["total"]
    )


def tagged_queries(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    # Fixed-width tags: no tag is a substring of another, so a provider log can be searched for one.
    return [
        {"custom_id": f"{prefix}-{i}", "prompt": f"[tag:{prefix}-{i:06d}] What is {i} squared?"}
        for i in range(n)
    ]


def wait_for_batch(
    client: httpx.Client,
    batch_id: str,
    timeout: float,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if on_poll:
            on_poll(batch)
        return batch if batch["status"] in TERMINAL else None

    return poll(check, timeout, interval=0.25, what=f"batch {batch_id} to end")


class _Body(Protocol):
    @property
    def content(self) -> bytes: ...


def jsonl(response: _Body) -> list[dict[str, Any]]:
    """The objects of a JSON Lines body (an httpx response, or a TestClient's)."""
    return [orjson.loads(line) for line in response.content.splitlines() if line.strip()]


def sim_log(sim_url: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    since = 0
    while True:
        page = httpx.get(f"{sim_url}/_sim/log", params={"since": since, "limit": 5000}, timeout=30).json()
        records.extend(page["data"])
        if not page["data"] or page["next"] == since:
            return records
        since = page["next"]


def error_body(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        pytest.fail(
            f"HTTP {response.status_code} is not in SPEC's JSON error shape: "
            f"{response.headers.get('content-type')!r} {response.text[:200]!r}"
        )
    assert isinstance(body, dict), body
    return body
