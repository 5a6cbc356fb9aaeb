"""The client commands of SPEC §2 (``submit``, ``status``, ``results``, ``cancel``) and ``keys create``,
run as a user runs them: separate processes talking to the session's real API and workers.

Every command runs in an empty working directory (no ``.env``) with only the ``CONCLAVE_*``
variables the test sets, so nothing of the test process's configuration leaks in.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.models import Tenant
from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from tests.conftest import new_key
from tests.helpers import TERMINAL, counts_add_up, poll, tagged_queries
from tests.leaks import remember_secret

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "shared.cli.main"]


def clean_env(**conclave: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCLAVE_")}
    return {**env, **conclave}


def one_line(text: str) -> str:
    """Console output with its line wrapping undone (rich wraps at the terminal width)."""
    return " ".join(text.split())


class Conclave:
    """Runs ``conclave …`` for one API key against one API."""

    def __init__(self, api_url: str, key: str | None, cwd: Path) -> None:
        self.env = clean_env(CONCLAVE_API_URL=api_url, **({"CONCLAVE_API_KEY": key} if key else {}))
        self.cwd = cwd

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=timeout
        )

    def ok(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = self(*args, timeout=timeout)
        assert result.returncode == 0, f"conclave {' '.join(args)}: {result.stdout}\n{result.stderr}"
        return result

    def status(self, batch_id: str) -> dict[str, Any]:
        batch: dict[str, Any] = json.loads(self.ok("status", batch_id).stdout)
        return batch


@pytest.fixture
def user_key(sessions: sessionmaker[Session]) -> str:
    return new_key(sessions, role="user")[0]


@pytest.fixture
def conclave(stack: Stack, user_key: str, tmp_path: Path) -> Conclave:
    assert stack.api_url
    return Conclave(stack.api_url, user_key, tmp_path)


@pytest.fixture
def api(stack: Stack, user_key: str) -> Iterator[httpx.Client]:
    assert stack.api_url
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {user_key}"}, timeout=60
    ) as client:
        yield client


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def submitted_id(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.split()
    assert len(lines) == 1 and lines[0].startswith("batch_"), result.stdout
    return lines[0]


def test_submit_wait_status_and_results(conclave: Conclave, sim: SimServer, tmp_path: Path) -> None:
    queries = tagged_queries(12, prefix="cli")
    queries[3] = {
        "custom_id": "cli-3",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "[tag:cli-000003] Why is the sky blue?"},
        ],
        "max_tokens": 200,
    }
    # A blank line in the file is not a query.
    path = write_jsonl(tmp_path / "queries.jsonl", queries)
    path.write_text(path.read_text() + "\n")

    submitted = conclave.ok("submit", str(path), "--priority", "high", "--wait")
    batch_id = submitted_id(submitted)
    assert f"batch {batch_id}: completed" in one_line(submitted.stderr)

    batch = conclave.status(batch_id)
    assert batch["id"] == batch_id and batch["object"] == "batch"
    assert batch["status"] == "completed" and batch["priority"] == "high"
    assert batch["request_counts"]["total"] == 12 and batch["request_counts"]["completed"] == 12
    assert counts_add_up(batch)

    out = tmp_path / "out.jsonl"
    conclave.ok("results", batch_id, "-o", str(out))
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert len(records) == 12
    assert sorted(r["custom_id"] for r in records) == sorted(q["custom_id"] for q in queries)
    for r in records:
        assert r["status"] == "succeeded" and r["error"] is None
        assert r["synthesis"] == "chairman"
        assert r["answer"].startswith("[simulated chairman]")
        assert {"query_id", "members", "aggregate_ranking", "usage", "cost_usd", "latency_ms"} <= set(r)
    by_id = {r["custom_id"]: r for r in records}
    assert "[tag:cli-000003] Why is the sky blue?" in by_id["cli-3"]["answer"]

    out_csv = tmp_path / "out.csv"
    conclave.ok("results", batch_id, "--format", "csv", "-o", str(out_csv))
    with out_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = reader.fieldnames or []
    assert len(rows) == 12
    assert {"custom_id", "query_id", "status", "answer", "synthesis", "error_type"} <= set(fields)
    assert {row["custom_id"] for row in rows} == set(by_id)
    assert {row["status"] for row in rows} == {"succeeded"}
    assert all(row["answer"] == by_id[row["custom_id"]]["answer"] for row in rows)

    # Without -o the results go to stdout.
    streamed = conclave.ok("results", batch_id)
    assert len([line for line in streamed.stdout.splitlines() if line.strip()]) == 12


def test_submit_accepts_openai_batch_lines(
    conclave: Conclave, api: httpx.Client, sim: SimServer, tmp_path: Path
) -> None:
    lines: list[dict[str, Any]] = [
        {
            "custom_id": f"oa-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": f"[tag:oa-{i:06d}] What is {i} plus {i}?"},
                ],
                "max_tokens": 300,
            },
        }
        for i in range(5)
    ]
    path = write_jsonl(tmp_path / "openai-batch.jsonl", lines)
    batch_id = submitted_id(conclave.ok("submit", str(path), "--wait"))
    assert conclave.status(batch_id)["status"] == "completed"

    records = [json.loads(line) for line in conclave.ok("results", batch_id).stdout.splitlines()]
    assert sorted(r["custom_id"] for r in records) == [f"oa-{i}" for i in range(5)]
    assert all(r["status"] == "succeeded" for r in records)
    detail = api.get(f"/v1/queries/{records[0]['query_id']}").json()
    i = int(records[0]["custom_id"].split("-")[1])
    assert detail["request"]["messages"] == lines[i]["body"]["messages"]
    assert detail["request"]["max_tokens"] == 300


def test_cancel_a_running_batch(
    conclave: Conclave, api: httpx.Client, sim: SimServer, tmp_path: Path
) -> None:
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 200}).raise_for_status()
    path = write_jsonl(tmp_path / "big.jsonl", tagged_queries(1500, prefix="cx"))
    batch_id = submitted_id(conclave.ok("submit", str(path)))

    def under_way() -> bool:
        return bool(api.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] >= 1)

    poll(under_way, timeout=60, interval=0.1, what="the batch to be under way")
    cancelled = conclave.ok("cancel", batch_id)
    message = one_line(cancelled.stderr)
    assert f"batch {batch_id}: cancelling" in message or f"batch {batch_id}: cancelled" in message

    def ended() -> dict[str, Any] | None:
        batch: dict[str, Any] = api.get(f"/v1/batches/{batch_id}").json()
        return batch if batch["status"] in TERMINAL else None

    poll(ended, timeout=120, interval=0.25, what="the cancelled batch to end")
    batch = conclave.status(batch_id)
    assert batch["status"] == "cancelled"
    assert batch["cancelling_at"] and batch["cancelled_at"]
    counts = batch["request_counts"]
    assert counts_add_up(batch)
    assert counts["queued"] == 0 and counts["running"] == 0
    assert counts["cancelled"] > 0 and counts["completed"] >= 1
    assert counts["completed"] + counts["failed"] + counts["cancelled"] == 1500

    # Cancelling again is harmless and says so.
    again = conclave.ok("cancel", batch_id)
    assert f"batch {batch_id}: cancelled" in one_line(again.stderr)


def test_a_bad_file_is_refused_with_the_api_error_and_creates_nothing(
    conclave: Conclave, api: httpx.Client, tmp_path: Path
) -> None:
    path = write_jsonl(
        tmp_path / "dup.jsonl",
        [
            {"custom_id": "a", "prompt": "first"},
            {"custom_id": "b", "prompt": "second"},
            {"custom_id": "a", "prompt": "again"},
        ],
    )
    result = conclave("submit", str(path))
    assert result.returncode != 0
    assert result.stdout.strip() == ""
    err = one_line(result.stderr)
    assert "422" in err
    assert "custom_id 'a' is used by queries[0] too" in err
    assert "(queries[2].custom_id)" in err
    assert "Traceback" not in result.stderr
    assert api.get("/v1/batches").json()["data"] == []

    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"custom_id": "a", "prompt": "fine"}\n{not json\n')
    result = conclave("submit", str(not_json))
    assert result.returncode != 0
    assert f"{not_json}:2" in one_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert api.get("/v1/batches").json()["data"] == []


def test_unknown_batch_is_a_clear_error(conclave: Conclave) -> None:
    result = conclave("status", "batch_doesnotexist")
    assert result.returncode != 0
    assert "404" in result.stderr and "batch_doesnotexist" in one_line(result.stderr)
    assert result.stdout.strip() == ""


def test_client_commands_need_an_api_key(stack: Stack, tmp_path: Path) -> None:
    assert stack.api_url
    keyless = Conclave(stack.api_url, None, tmp_path)
    path = write_jsonl(tmp_path / "q.jsonl", tagged_queries(1, prefix="nokey"))
    for args in (("submit", str(path)), ("status", "batch_x"), ("cancel", "batch_x")):
        result = keyless(*args)
        assert result.returncode != 0, args
        assert "CONCLAVE_API_KEY" in one_line(result.stderr), args
        assert "Traceback" not in result.stderr, args
        assert result.stdout.strip() == "", args


def test_keys_create_prints_a_working_key(
    stack: Stack, settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    assert stack.api_url
    env = clean_env(CONCLAVE_DATABASE_URL=settings.database_url)
    tenant = f"cli-{uuid.uuid4().hex[:8]}"

    def keys_create(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "keys", "create", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    created = keys_create("--tenant", tenant, "--role", "user", "--tier", "pro", "--json")
    assert created.returncode == 0, created.stdout + created.stderr
    issued = json.loads(created.stdout)
    remember_secret(issued["api_key"], issued["webhook_secret"])
    assert set(issued) == {"api_key", "tenant_id", "webhook_secret"}
    assert issued["api_key"].startswith("cnk_") and issued["webhook_secret"].startswith("whsec_")
    assert issued["tenant_id"].startswith("tenant_")
    with sessions() as s:
        row = s.scalars(select(Tenant).where(col(Tenant.name) == tenant)).one()
    assert (row.id, row.tier) == (issued["tenant_id"], "pro")

    listed = httpx.get(
        f"{stack.api_url}/v1/batches", headers={"Authorization": f"Bearer {issued['api_key']}"}, timeout=30
    )
    assert listed.status_code == 200, listed.text
    assert listed.json()["object"] == "list" and listed.json()["data"] == []

    # A second key for the same tenant: same tenant, new key, both work.
    second = keys_create("--tenant", tenant, "--role", "viewer", "--tier", "pro", "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    issued2 = json.loads(second.stdout)
    assert issued2["tenant_id"] == issued["tenant_id"] and issued2["api_key"] != issued["api_key"]
    for key in (issued["api_key"], issued2["api_key"]):
        r = httpx.get(f"{stack.api_url}/v1/batches", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200

    refused_tenant = f"cli-{uuid.uuid4().hex[:8]}"
    refused = keys_create("--tenant", refused_tenant, "--role", "superuser", "--tier", "pro", "--json")
    assert refused.returncode != 0
    assert "role must be one of" in one_line(refused.stdout + refused.stderr)
    assert "api_key" not in refused.stdout
    with sessions() as s:
        assert s.scalars(select(Tenant).where(col(Tenant.name) == refused_tenant)).first() is None


def test_submit_wait_with_a_free_tier_key_completes_a_200_query_batch(
    stack: Stack, settings: Settings, sim: SimServer, tmp_path: Path
) -> None:
    # The free tier allows 60 requests a minute per key; `--wait` polls for as long as the batch
    # runs, and the user has just spent most of the minute (a dashboard, a `status` loop).
    assert stack.api_url
    created = subprocess.run(
        [
            *CLI,
            "keys",
            "create",
            "--tenant",
            f"free-{uuid.uuid4().hex[:8]}",
            "--role",
            "user",
            "--tier",
            "free",
            "--json",
        ],
        env=clean_env(CONCLAVE_DATABASE_URL=settings.database_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    key = json.loads(created.stdout)["api_key"]
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as api:
        spent = [api.get("/v1/batches") for _ in range(40)]
    assert {r.status_code for r in spent} == {200} and spent[-1].headers["RateLimit-Limit"] == "60"
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 1500}).raise_for_status()

    path = write_jsonl(tmp_path / "free.jsonl", tagged_queries(200, prefix="free"))
    started = time.monotonic()
    submitted = Conclave(stack.api_url, key, tmp_path)("submit", str(path), "--wait", timeout=240)
    elapsed = time.monotonic() - started
    waits = one_line(submitted.stderr).count("waiting")
    print(f"\nsubmit --wait, 200 queries, free tier, 40 of 60/min spent: {elapsed:.1f} s, {waits} 429 waits")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    batch_id = submitted_id(submitted)
    assert f"batch {batch_id}: completed" in one_line(submitted.stderr)
    assert "Traceback" not in submitted.stderr
    batch = Conclave(stack.api_url, key, tmp_path).status(batch_id)
    assert batch["request_counts"]["total"] == 200 and batch["request_counts"]["completed"] == 200

    # The key's minute all spent: a command started now gets a 429 and waits it out.
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as api:
        poll(
            lambda: api.get("/v1/batches").status_code == 429, timeout=30, interval=0, what="the key's limit"
        )
    waited = Conclave(stack.api_url, key, tmp_path)("status", batch_id, timeout=180)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert json.loads(waited.stdout)["id"] == batch_id
    assert "this key is limited to 60 requests per minute: waiting" in one_line(waited.stderr)
