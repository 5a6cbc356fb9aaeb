"""The query rows a new batch stores, column by column: the batch service writes them below
SQLAlchemy (PostgreSQL ``COPY``, SQLite's ``executemany``), so what it writes is checked here
against what the model says a new query is, with text that COPY's format must escape."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlmodel import col

from api.main import create_app
from shared import keys
from shared.models import Query
from shared.settings import Settings
from tests.conftest import new_key

pytestmark = pytest.mark.integration

# Tabs, newlines, backslashes, quotes, a COPY end-of-data marker, non-ASCII and an emoji.
AWKWARD = [
    "tab\there, newline\nthere, carriage\rreturn",
    'back\\slash \\N \\. and "quotes"',
    "\\.\n\\.",
    "naïve café — 日本語 🎲",
]


@pytest.fixture(scope="module")
def app_settings(settings: Settings) -> Iterator[Settings]:
    # Queues of its own: no worker of the session consumes these messages.
    namespace = f"{settings.queue_namespace}-rows-{uuid.uuid4().hex[:6]}"
    yield settings.model_copy(update={"queue_namespace": namespace})
    client = redis.Redis.from_url(settings.redis_url)
    found = list(client.scan_iter(f"{namespace}:*", count=1000))
    for i in range(0, len(found), 1000):
        client.delete(*found[i : i + 1000])
    client.close()


@pytest.fixture
def api(app_settings: Settings, sessions: Any) -> Iterator[TestClient]:
    key, _ = new_key(sessions)
    with TestClient(create_app(app_settings), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def test_stored_query_rows_hold_every_column_a_new_query_has(
    api: TestClient, sessions: Any, app_settings: Settings
) -> None:
    queries: list[dict[str, Any]] = [
        {"custom_id": f"p-{i}", "prompt": text, "max_tokens": 7, "temperature": 0.5}
        for i, text in enumerate(AWKWARD)
    ]
    queries.append(
        {
            "custom_id": "m\t1",
            "messages": [
                {"role": "system", "content": AWKWARD[1]},
                {"role": "user", "content": AWKWARD[0]},
            ],
        }
    )
    response = api.post("/v1/batches", json={"queries": queries, "priority": "high"})
    assert response.status_code == 202, response.text
    batch = response.json()

    with sessions() as s:
        rows = list(
            s.scalars(select(Query).where(col(Query.batch_id) == batch["id"]).order_by(col(Query.seq)))
        )
    assert [r.seq for r in rows] == list(range(len(queries)))
    assert [r.custom_id for r in rows] == [q["custom_id"] for q in queries]
    assert [r.id for r in rows] == sorted(r.id for r in rows)  # ids follow input order
    for row, sent in zip(rows[:-1], queries, strict=False):
        assert row.request == {
            "messages": [{"role": "user", "content": sent["prompt"]}],
            "max_tokens": 7,
            "temperature": 0.5,
        }
    assert rows[-1].request == {
        "messages": queries[-1]["messages"],
        "max_tokens": None,
        "temperature": None,
    }
    for row in rows:
        assert (row.status, row.priority, row.tenant_id) == ("queued", "high", rows[0].tenant_id)
        assert (row.attempts, row.circuit_waits, row.input_tokens, row.output_tokens) == (0, 0, 0, 0)
        assert row.cost_usd == 0.0
        assert row.enqueued_at == batch["created_at"]
        assert row.worker_id is row.started_at is row.finished_at is row.result is row.error is None

    # Stored first, then enqueued: every row's message body is in Redis under the row's id.
    client = redis.Redis.from_url(app_settings.redis_url)
    try:
        bodies = client.hmget(keys.queue_messages(app_settings.queue_namespace, "high"), [r.id for r in rows])
    finally:
        client.close()
    assert all(body is not None for body in bodies)
